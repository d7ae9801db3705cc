# Fresh machine:  make run   (set up, then the whole stack: Redis, worker, web UI, bot with a token)
#                 make test  (run the tests; make test-fast: the fast ones alone)
VENV ?= .venv
PY := $(VENV)/bin/python
# Every install takes its versions from docker/constraints.txt (the images too), torch included:
# the project's one torch version. CPU build by default (a local wheel here); on a GPU host:
# make setup TORCH=torch (the CUDA build of the same version).
CONSTRAINTS := docker/constraints.txt
TORCH ?= torch==$(shell sed -n 's/^torch==//p' $(CONSTRAINTS))

.PHONY: setup test test-fast run tiny-model bench-gpu constraints secrets pin-images smoke-image
setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml $(CONSTRAINTS)
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -c $(CONSTRAINTS) "$(TORCH)"
	$(PY) -m pip install -q -c $(CONSTRAINTS) -e '.[test]'
	touch $@

# Two pytest processes, one test module each at a time (a module's processes and Redis stay
# together): most tests wait on real processes, so two cores run the suite in about half the time.
test: setup
	$(PY) -m pytest -q -n 2 --dist loadfile

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

# GPU benchmark of the four seed architectures (random weights; no download), in stages of a
# few minutes each (bench/gpu.sh says which): round one's seed table, then round two's speed
# options, profile and cold start. JSON after every model and logs in out/.
#   make bench-gpu                      (on a CUDA host; installs a CUDA torch into .venv)
#   make bench-gpu STAGES=round2        (or any stage names; DEADLINE=540 ends within 9 min)
STAGES ?=
bench-gpu:
	$(MAKE) setup TORCH=torch
	OUT_DIR=out PYTHON=$(PY) bench/gpu.sh $(STAGES)

# Freeze the tested venv into docker/constraints.txt (after changing pyproject.toml); the
# dashboard's pins (after "# dashboard") are kept.
constraints: setup
	{ sed -n '1,/^accelerate==/p' $(CONSTRAINTS) | grep '^#'; \
	  $(PY) -m pip freeze --exclude-editable | grep -viE '^(imagine|pip|setuptools|wheel)[=@ ]' \
	    | sed -E 's/^(torch==[0-9.]+)\+[a-z0-9]+$$/\1/'; \
	  sed -n '/^# dashboard/,$$p' $(CONSTRAINTS); } > $(CONSTRAINTS).new && mv $(CONSTRAINTS).new $(CONSTRAINTS)

# Docker secrets for docker/compose.yaml: a random Redis password, and files for the Discord and
# Hugging Face tokens to fill in (an empty HF token file means none). Never committed.
secrets:
	@mkdir -p secrets && chmod 700 secrets
	@[ -s secrets/redis_password ] || (python3 -c "import secrets; print(secrets.token_hex(32))" > secrets/redis_password)
	@touch secrets/discord_token secrets/hf_token && chmod 644 secrets/redis_password secrets/discord_token secrets/hf_token
	@echo "secrets/: redis_password set; write the bot token to secrets/discord_token (and an HF token to secrets/hf_token if needed)"

# Print the current digest of each base image (needs docker with network): paste them into the
# Dockerfiles' PYTHON_IMAGE and compose's redis image.
pin-images:
	@for image in python:3.11-slim redis:7.4-alpine; do \
	  printf '%s@' $$image; docker buildx imagetools inspect $$image --format '{{json .Manifest.Digest}}' | tr -d '"'; done

# Build the worker image and check it end to end on a CPU (Docker needed; no GPU): docker/smoke.sh.
smoke-image:
	docker/smoke.sh
