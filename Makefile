# Two commands on a fresh machine:
#   make demo   -> virtualenv + install + run the main job on the embedded demo model
#   make test   -> virtualenv + install (with the test extras) + the whole test suite
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
PIP    := $(BIN)/python -m pip

.PHONY: demo test venv test-venv lint bench notebooks clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip

$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(PIP) install -q -e .
	touch $@

# torch: the CPU wheel 2.13.0 lies on disk on these machines; asking for that exact
# version keeps pip from pulling a multi-GB CUDA build.
$(VENV)/.installed-test: pyproject.toml $(VENV)/.installed
	$(PIP) install -q -e '.[test]'
	$(PIP) install -q 'torch==2.13.0'
	$(PIP) install -q -e '.[parity]'
	touch $@

venv: $(VENV)/.installed
test-venv: $(VENV)/.installed-test

demo: $(VENV)/.installed
	$(BIN)/pali-kit demo

test: $(VENV)/.installed-test
	$(BIN)/python -m pytest -q tests

# The prompt panel in JupyterLab + headless Chromium (tests/test_browser.py). The
# browser is Debian's chromium (apt-get install chromium), never a download; without
# it the test fails here (make test skips it and says so).
.PHONY: test-browser
$(VENV)/.installed-browser: pyproject.toml $(VENV)/.installed-test
	$(PIP) install -q -e '.[browser]'
	touch $@

test-browser: $(VENV)/.installed-browser
	PALI_KIT_REQUIRE_BROWSER=1 $(BIN)/python -m pytest -q -m browser tests/test_browser.py

lint: $(VENV)/.installed-test
	$(BIN)/ruff check .
	$(BIN)/ruff format --check pali_kit tests bench
	$(BIN)/python -m pytest -q tests/test_notebooks.py -k ipynb_is_generated

notebooks: $(VENV)/.installed-test
	$(BIN)/jupytext --update --to ipynb notebooks/0*.py
	$(BIN)/python -m pytest -q -m notebooks tests/test_notebooks.py

bench: $(VENV)/.installed-test
	$(BIN)/python bench/load.py
	$(BIN)/python bench/generate.py

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
