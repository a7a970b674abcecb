# Set-up is part of every target: a fresh machine needs only python3 (3.11+) and make.
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip -q --disable-pip-version-check

.PHONY: demo test bench install
install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PIP) install --upgrade pip
	$(PIP) install torch==2.13.0
	$(PIP) install -e ".[test,train,server,quant]"
	touch $@

demo: install
	$(VENV)/bin/fluxion generate "a red circle left of a blue square" --seed 0 --out demo.png

test: install
	$(PY) -m pytest -q -n 2 tests

bench: install
	$(PY) benchmarks/transformer_step.py
