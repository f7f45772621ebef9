# Quick start:  make demo   (train on the embedded digits)   |   make test   (the test suite)
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

demo: env
	$(PY) -m hmar_jax.train_tokenizer --config configs/tokenizer_digits.py --workdir $(WORKDIR)

test: env
	$(PY) -m pytest -q $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) workdirs .pytest_cache
