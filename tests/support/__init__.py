"""Test support that tests and ``bench/`` share: a local fake Discord (``fake_discord``: REST +
gateway on 127.0.0.1), the process stack (``stack``: a real redis-server, bot, worker and
launcher processes, and ``Processes`` behind conftest's ``processes`` fixture), the chaos
scenario (``chaos``) and the four seed models' architectures with random weights
(``architectures``).

The dependency runs one way: ``bench/`` may import this package; ``tests/`` never imports
``bench/`` (``tests/test_architecture.py`` checks it).
"""
