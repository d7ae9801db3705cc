# Fresh machine:  make run   (set up, then run the main job)    make test   (run the tests)
VENV ?= .venv
PY := $(VENV)/bin/python
# CPU build by default (served from local disk here); on a GPU host: make setup TORCH=torch
TORCH ?= torch==2.13.0

.PHONY: setup test run tiny-model bench-gpu
setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH)"
	$(PY) -m pip install -q -e '.[test]'
	touch $@

test: setup
	$(PY) -m pytest -q

models/tiny-sd/model_index.json: | setup
	$(PY) -m worker.tiny models/tiny-sd

tiny-model: models/tiny-sd/model_index.json

run: setup tiny-model
	IMAGINE_MODELS='{"tiny": {"source": "models/tiny-sd", "pipeline": "StableDiffusionPipeline", "native_size": 64, "default_steps": 4, "variant": null}}' \
	IMAGINE_MIN_SIZE=64 $(PY) -m worker.cli "an orange cat staring off" --model tiny --seed 7 --out out/cat.png

# GPU benchmark of the four seed architectures (random weights; no download):
#   make bench-gpu            (on a CUDA host; installs a CUDA torch into .venv)
bench-gpu:
	$(MAKE) setup TORCH=torch
	$(PY) -m bench.seed_table --json out/seed_table.json
	$(PY) -m bench.seed_table --compile max-autotune --json out/seed_table_compiled.json
