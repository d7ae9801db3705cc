"""GPU worker: resident diffusers pipelines behind an in-process RQ worker.

Never imports the Discord gateway client; results go out over Discord's REST webhooks.
"""
