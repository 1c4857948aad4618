# Everything goes through the pinned virtualenv that scripts/install.sh builds.
VENV ?= .venv
PY := $(VENV)/bin/python
CRITEO ?= ../shared/data/criteo/criteo_head8k
OUT ?= runs/criteo-2rank

.PHONY: install test lint search retrain bench clean

$(VENV)/.installed: scripts/install.sh requirements-cpu.txt requirements-dev.txt setup.py
	scripts/install.sh
	touch $@

install: $(VENV)/.installed

test: install
	$(PY) -m pytest -q

lint: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy torchrec_dimgrow

# The main job: a DimGrow search sharded over 2 ranks on the real Criteo sample, then a
# retrain of a plain TorchRec model with the found dims.
search: install
	PYTHONHASHSEED=0 OMP_NUM_THREADS=1 $(VENV)/bin/torchrun --nproc_per_node=2 -m torchrec_dimgrow search \
		--data $(CRITEO) --format criteo --out $(OUT) --batch-size 64 --epochs 20 --quiet --overwrite
	$(PY) -m torchrec_dimgrow retrain --dims $(OUT)/dims.json --data $(CRITEO) --format criteo \
		--out $(OUT)/retrain --batch-size 64 --quiet --overwrite

clean:
	rm -rf runs .pytest_cache
