"""Web front end (Gradio): the same validation, policy and queue as the Discord bot.

Talks to Redis only: never imports torch, diffusers or discord, and never loads a model.
"""
