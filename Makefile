# Fresh machine:  make run   (set up, then the whole stack: Redis, worker, web UI, bot with a token)
#                 make test  (run the tests; make test-fast: the fast ones alone)
VENV ?= .venv
PY := $(VENV)/bin/python
# CPU build by default (served from local disk here); on a GPU host: make setup TORCH=torch
TORCH ?= torch==2.13.0

.PHONY: setup test test-fast run tiny-model bench-gpu
setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH)"
	$(PY) -m pip install -q -e '.[test]'
	touch $@

test: setup
	$(PY) -m pytest -q

# Without the tests that start real processes or a browser (e2e) or compile (slow): seconds.
test-fast: setup
	$(PY) -m pytest -q -m "not e2e and not slow"

models/tiny-sd/model_index.json: | setup
	$(PY) -m worker.tiny models/tiny-sd

tiny-model: models/tiny-sd/model_index.json

# Redis (started if not reachable), one worker (tiny model unless IMAGINE_WORKER_MODELS is set),
# the web UI, and the bot when IMAGINE_DISCORD_TOKEN is set. Ctrl-C stops everything.
run: setup
	$(PY) -m launch

# GPU benchmark of the four seed architectures (random weights; no download), ~10 min on an
# H100: the eager table, then the 512² models with CUDA graphs. JSON and logs in out/.
#   make bench-gpu            (on a CUDA host; installs a CUDA torch into .venv)
bench-gpu:
	$(MAKE) setup TORCH=torch
	OUT_DIR=out PYTHON=$(PY) bench/gpu.sh
