# One project-local virtual environment with pinned packages (requirements.lock), and Debian's
# Chromium + its driver for the page's browser test (tests/serve/test_page.py), installed when missing.
# `make install` is idempotent: the venv re-runs only when the lock or pyproject changes.
SHELL := /bin/bash
PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
STAMP := $(VENV)/.installed
PYTEST_ARGS ?=
KEEP ?=
CHROMIUM := /usr/bin/chromium
CHROMEDRIVER := /usr/bin/chromedriver

.PHONY: install browser test demo reproduce clean

install: $(STAMP) browser

# The browser of the page's test: Debian's packages, never a browser download.
browser:
	@if [ ! -x $(CHROMIUM) ] || [ ! -x $(CHROMEDRIVER) ]; then \
	  echo "installing Debian's chromium and chromium-driver (the page's browser test)"; \
	  SUDO=$$([ "$$(id -u)" = 0 ] || echo sudo); \
	  $$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq chromium chromium-driver; \
	fi

$(STAMP): requirements.lock pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	# torch first: deepspeed's build needs it importable (no build isolation,
	# so no second multi-GB torch is fetched into a build environment).
	$(PIP) install --quiet torch==2.14.1 torchvision==0.29.1
	$(PIP) install --quiet --no-build-isolation -r requirements.lock
	$(PIP) install --quiet --no-build-isolation --no-deps -e .
	touch $(STAMP)

# The whole test suite. Exit code 5 (no tests collected) is a failure.
test: install
	$(VENV)/bin/python -m pytest $(PYTEST_ARGS); rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "pytest collected no tests: failing"; exit 1; fi; exit $$rc

# The main job end to end on one machine (local Ray, file:// store, sample subjects of two owners).
# KEEP=1: the chat service, its web page and upload queue stay up at the printed address (Ctrl-C stops).
demo: install
	$(PY) -m serve.demo --workdir runs/demo $(if $(KEEP),--keep)

# The paper's comparison on the miniature model and the sample subjects (~15 min on 2 cores).
reproduce: install
	$(PY) -m miniworld.reproduce --out runs/reproduce

clean:
	rm -rf $(VENV) .pytest_cache
