# Set-up is part of every target: a fresh machine needs only python3 (3.11+) and make.
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip -q --disable-pip-version-check

.PHONY: demo test bench install browser
install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PIP) install --upgrade pip
	$(PIP) install torch==2.13.0
	$(PIP) install -e ".[test,train,server,quant,ray]"
	touch $@

demo: install
	$(VENV)/bin/fluxion generate "a red circle left of a blue square" --seed 0 --out demo.png

# the web page test drives Debian's headless Chromium through its driver (never a downloaded browser)
browser:
	@command -v chromium >/dev/null 2>&1 && command -v chromedriver >/dev/null 2>&1 || { \
		sudo=$$([ "$$(id -u)" = 0 ] || echo sudo); \
		$$sudo apt-get update -qq && \
		$$sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium chromium-driver; }

test: install browser
	$(PY) -m pytest -q -n 2 tests

bench: install
	$(PY) benchmarks/transformer_step.py
