"""Discord front end: discord.py adapters (client, command tree, commands, components, error
mapping) around :mod:`core`. Never imports torch or diffusers; talks to workers only through
Redis."""
