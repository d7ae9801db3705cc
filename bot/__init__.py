"""Discord front end: validates commands, applies server policy, enqueues jobs.

Never imports torch or diffusers; talks to workers only through Redis.
"""
