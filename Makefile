# The two set-up commands of the README:
#   make demo  - create .venv if missing, install MedVeil, run `medveil demo` on the shipped samples
#   make test  - create .venv if missing, install MedVeil with its test extras, run the test suite
# Every install goes through constraints.txt (torch==2.13.0: the CPU wheel, not GBs of CUDA).

PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV   ?= .venv
PIP    := $(VENV)/bin/python -m pip
PIP_FLAGS := --disable-pip-version-check -q -c constraints.txt
DEMO_OUT ?= runs/demo

.PHONY: demo test install install-dev bench-quick clean

$(VENV)/bin/python:
	$(PYTHON) -m venv $(VENV)

$(VENV)/.installed: $(VENV)/bin/python pyproject.toml constraints.txt
	$(PIP) install $(PIP_FLAGS) -e .
	touch $@

$(VENV)/.installed-dev: $(VENV)/.installed
	$(PIP) install $(PIP_FLAGS) -e '.[dev,flower,dicom,dp]'
	touch $@

install: $(VENV)/.installed
install-dev: $(VENV)/.installed-dev

demo: $(VENV)/.installed
	$(VENV)/bin/medveil demo --out $(DEMO_OUT)

test: $(VENV)/.installed-dev
	$(VENV)/bin/python -m pytest

clean:
	rm -rf $(VENV) runs .pytest_cache
