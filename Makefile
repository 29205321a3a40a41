# medssl: `make demo` and `make test` work on a fresh machine.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test install clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

# torch first, pinned to the CPU wheel on disk; a bare `torch` would pull a multi-GB CUDA build.
$(STAMP): $(BIN)/python pyproject.toml
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -e ".[test,minilm]"
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/medssl demo -o demo_out

test: $(STAMP)
	$(BIN)/python -m pytest -q

clean:
	rm -rf demo_out .pytest_cache
