# medssl: `make demo` and `make test` work on a fresh machine.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

VIEWPORT := medssl/app/viewport
BUNDLE := $(VIEWPORT)/dist/viewport.js

.PHONY: demo test install clean browser viewport

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

# torch first, pinned to the CPU wheel on disk; a bare `torch` would pull a multi-GB CUDA build.
$(STAMP): $(BIN)/python pyproject.toml
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -e ".[test]"
	touch $(STAMP)

# The clinician app's viewer: NiiVue from npm, bundled with the component's source by esbuild (never committed).
$(BUNDLE): $(VIEWPORT)/package.json $(VIEWPORT)/package-lock.json $(VIEWPORT)/build.mjs $(VIEWPORT)/src/viewport.js
	cd $(VIEWPORT) && npm ci --no-audit --no-fund --loglevel=error && npm run build

viewport: $(BUNDLE)

install: $(STAMP) $(BUNDLE)

demo: $(STAMP) $(BUNDLE)
	$(BIN)/medssl demo -o demo_out

# Debian's chromium for the app's end-to-end test; where it cannot be installed (no apt-get, not root, no
# registry) the test is skipped and says why.
browser:
	@command -v chromium >/dev/null 2>&1 || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1 && \
	  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium) >/dev/null 2>&1; } || \
	  echo "note: chromium is not installed and could not be (needs root and apt-get): the browser test will be skipped"

test: $(STAMP) $(BUNDLE) browser
	$(BIN)/python -m pytest -q

clean:
	rm -rf demo_out .pytest_cache $(VIEWPORT)/dist $(VIEWPORT)/node_modules
