# retia: `make demo` runs the main job, `make test` the test suite; both create .venv when it is missing.
PY ?= python3
VENV := .venv
PYTHON := $(VENV)/bin/python
STAMP := $(VENV)/.retia-installed
# crypten 0.4.1 requires the dead PyPI name `sklearn`: install it without deps (its real deps are the `crypten` extra).
CRYPTEN := crypten==0.4.1

.PHONY: demo test test-quick install clean

$(STAMP): setup.cfg pyproject.toml Makefile
	test -x $(PYTHON) || $(PY) -m venv $(VENV)
	$(PYTHON) -m pip install -q --disable-pip-version-check -e ".[all]"
	$(PYTHON) -m pip install -q --disable-pip-version-check --no-deps $(CRYPTEN)
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(PYTHON) experiments/autoformer_search.py

test: $(STAMP)
	$(PYTHON) -m pytest -q -p no:cacheprovider -n 2 --durations=25

test-quick: $(STAMP)
	$(PYTHON) -m pytest -q -p no:cacheprovider -n 2 -m "not slow"

clean:
	rm -rf $(VENV) runs
