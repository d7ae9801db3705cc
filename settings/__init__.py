"""Configuration, model catalog and the job contract shared by bot and worker.

Nothing here imports torch or discord.py, so both sides can depend on it.
"""
