"""The Discord-free domain every front end and the worker share: the JSON job contract,
option validation, moderation policy and matcher, policy store and limits, admission, queue
access, job records, fleet statistics and user-facing texts.

Imports neither discord.py, torch nor gradio, and nothing from ``bot``, ``web`` or ``worker``.
"""
