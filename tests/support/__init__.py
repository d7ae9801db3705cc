"""Test support that tests and ``bench/`` share: a local fake Discord (REST + gateway on
127.0.0.1) and the process stack (a real redis-server, bot and worker processes).

The dependency runs one way: ``bench/`` may import this package; ``tests/`` never imports
``bench/``.
"""
