# Quick start:  make demo   (HMAR on the embedded digits)   |   make test   (the test suite)
# Both create or reuse the virtual environment in .venv (Python >= 3.12).

VENV    ?= .venv
PY      := $(VENV)/bin/python
WORKDIR ?= workdirs/demo
PYTEST_ARGS ?=

.PHONY: env demo test clean

env: $(VENV)/.installed

$(VENV)/.installed: requirements.txt pyproject.toml
	@bash launch/ensure_python.sh $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check --no-cache-dir -r requirements.txt
	$(PY) -m pip install --quiet --disable-pip-version-check --no-deps -e .
	@touch $@

# The tokenizer (tokenizer/), stage 1 on it (a 10-per-class sample grid), then stage 2 from
# stage 1's export (1,000 samples, scored by the digits classifier).
demo: env
	$(PY) -m hmar_jax.train_tokenizer --config configs/tokenizer_digits.py \
	    --workdir $(WORKDIR)/tokenizer
	$(PY) -m hmar_jax.train --config configs/demo.py --workdir $(WORKDIR)/stage1 \
	    --config.tokenizer.export=$(abspath $(WORKDIR))/tokenizer/tokenizer \
	    --config.sampling.samples_per_class=10
	$(PY) -m hmar_jax.train --config configs/demo.py:stage=2 --workdir $(WORKDIR)/stage2 \
	    --config.tokenizer.export=$(abspath $(WORKDIR))/tokenizer/tokenizer \
	    --config.stage2.parent=$(abspath $(WORKDIR))/stage1/export

test: env
	$(PY) -m pytest -q -n auto --dist loadscope $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) workdirs .pytest_cache
