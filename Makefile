# Quick start:  make demo   (HMAR on the embedded digits)   |   make test   (the fast test tier)
# make test-all: the whole suite (what CI runs)   |   make bench HMAR_UPSTREAM=...: the GPU results table
# Both create or reuse the virtual environment in .venv (Python >= 3.12).

VENV    ?= .venv
PY      := $(VENV)/bin/python
WORKDIR ?= workdirs/demo
PYTEST_ARGS ?=

.PHONY: env demo test test-all bench clean

env: $(VENV)/.installed

$(VENV)/.installed: requirements.txt pyproject.toml
	@bash launch/ensure_python.sh $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check --no-cache-dir -r requirements.txt
	$(PY) -m pip install --quiet --disable-pip-version-check --no-deps -e .
	@touch $@

# The tokenizer (tokenizer/), the digits encoded once by it (tokens/), stages 1 and 2 trained
# on those tokens (stage 2 draws 1,000 samples and scores them with the digits classifier);
# the last three lines name the sample grid, the scores and the model (configs/demo.py).
TOKENIZER = $(abspath $(WORKDIR))/tokenizer/tokenizer
TOKENS    = $(abspath $(WORKDIR))/tokens
demo: env
	$(PY) -m hmar_jax.train_tokenizer --config configs/tokenizer_digits.py \
	    --workdir $(WORKDIR)/tokenizer
	$(PY) -m hmar_jax.pretokenize --config configs/demo.py --config.tokenizer.export=$(TOKENIZER) \
	    --out $(TOKENS) --overwrite
	$(PY) -m hmar_jax.train --config configs/demo.py --workdir $(WORKDIR)/stage1 \
	    --config.tokenizer.export=$(TOKENIZER) --config.data.pretokenized=$(TOKENS) \
	    --config.sampling.samples_per_class=0
	$(PY) -m hmar_jax.train --config configs/demo.py:stage=2 --workdir $(WORKDIR)/stage2 \
	    --config.tokenizer.export=$(TOKENIZER) --config.data.pretokenized=$(TOKENS) \
	    --config.stage2.parent=$(abspath $(WORKDIR))/stage1/export

# The fast tier leaves out the tests marked slow (multi-process runs, whole training runs,
# the benchmarks' smoke modes); test-all runs everything.
test: env
	$(PY) -m pytest -q -n auto --dist loadscope -m "not slow" $(PYTEST_ARGS)

test-all: env
	$(PY) -m pytest -q -n auto --dist loadscope $(PYTEST_ARGS)

# On a GPU, with a checkout of the official HMAR code: every row of benchmarks/RESULTS.md
# (ours and the official code in one invocation), then the table regenerated.
#   make bench HMAR_UPSTREAM=/path/to/HMAR [ROWS=train_d16_b64,sample_d16_b64]
bench: env
	@test -n "$(HMAR_UPSTREAM)" || { echo "error: make bench needs HMAR_UPSTREAM=<checkout of the official HMAR code>"; exit 2; }
	$(PY) benchmarks/bench.py --rows $(or $(ROWS),all) --upstream "$(HMAR_UPSTREAM)" --out benchmarks/results
	$(PY) benchmarks/results_table.py

clean:
	rm -rf $(VENV) workdirs .pytest_cache
