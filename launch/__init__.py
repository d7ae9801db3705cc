"""One command for the whole local stack: ``python -m launch`` (``make run``)."""
