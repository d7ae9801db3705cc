"""Configuration (pydantic-settings) and the model catalog. Nothing else."""
