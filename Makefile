# Two commands on a fresh machine (Python 3.10+, the package registries reachable):
#   make demo      -> .venv + the kit + the demo model on the sample images
#   make test      -> .venv with the test extras (torch CPU + transformers) + the whole suite
# and what CI (.ci/run) adds:
#   make test-isa  -> the numerical tests again under other CPU instruction sets (XLA_FLAGS)
#   make test-min  -> .venv-min with the lowest versions pyproject.toml allows + the core tests
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
PIP    := $(BIN)/python -m pip
# The parity and VAE reference tests fail here, instead of skipping, when torch/transformers
# are missing (tests/conftest.py).
PYTEST := PALI_KIT_REQUIRE_PARITY=1 $(BIN)/python -m pytest

# torch comes from PyTorch's CPU index, at the version the parity extra pins: the CPU wheel is
# ~200 MB, where the default Linux wheel from PyPI pulls several GB of CUDA libraries.
TORCH_INDEX ?= https://download.pytorch.org/whl/cpu
# One quick try at that index: where it cannot be reached, pip goes on with the others at once.
TORCH_PIP   := --retries 1 --timeout 20 --extra-index-url $(TORCH_INDEX)
TORCH       := $(shell grep -o '"torch==[^"]*"' pyproject.toml)

# The tests whose results are float arithmetic (XLA picks kernels per instruction set), run
# again with AVX2 and with SSE4.2 kernels (the default run uses the CPU's best, e.g. AVX-512).
# Under SSE4.2 the float16 cases are skipped: XLA:CPU cannot convert float16 without F16C
# ("Symbols not found: __truncsfhf2"), a limit of XLA, not of the kit (tests/conftest.py).
NUMERICAL := tests/test_model.py tests/test_decode.py tests/test_checkpoints.py \
             tests/test_parity.py tests/test_segmentation.py tests/test_train.py \
             tests/test_hf.py tests/test_demo_vae.py tests/test_cpu_layout.py \
             tests/test_numerics.py tests/test_quant.py tests/test_constrained.py \
             tests/test_accel_layout.py
ISAS      ?= AVX2 SSE4_2

# The lowest declared versions (scripts/lowest_versions.py reads pyproject.toml).
VENV_MIN  ?= .venv-min
CORE      := tests/test_model.py tests/test_decode.py tests/test_checkpoints.py \
             tests/test_tokenizer.py tests/test_parity.py tests/test_widgets.py

.PHONY: demo test test-isa test-min venv test-venv lint bench notebooks clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip

$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(PIP) install -q -e .
	touch $@

$(VENV)/.installed-test: pyproject.toml $(VENV)/.installed
	$(PIP) install -q $(TORCH_PIP) $(TORCH)
	$(PIP) install -q -e '.[test,parity]'
	touch $@

venv: $(VENV)/.installed
test-venv: $(VENV)/.installed-test

demo: $(VENV)/.installed
	$(BIN)/pali-kit demo

test: $(VENV)/.installed-test
	$(PYTEST) -q tests

test-isa: $(VENV)/.installed-test
	@for isa in $(ISAS); do \
	  echo "== numerical tests with XLA_FLAGS=--xla_cpu_max_isa=$$isa"; \
	  XLA_FLAGS="$$XLA_FLAGS --xla_cpu_max_isa=$$isa" $(PYTEST) -q $(NUMERICAL) || exit 1; \
	done

$(VENV_MIN)/.installed: pyproject.toml scripts/lowest_versions.py
	test -x $(VENV_MIN)/bin/python || $(PYTHON) -m venv $(VENV_MIN)
	$(VENV_MIN)/bin/python -m pip install -q --upgrade pip
	$(VENV_MIN)/bin/python scripts/lowest_versions.py --extra parity > $(VENV_MIN)/lowest.txt
	$(VENV_MIN)/bin/python -m pip install -q $(TORCH_PIP) \
	  -c $(VENV_MIN)/lowest.txt $(TORCH)
	$(VENV_MIN)/bin/python -m pip install -q -c $(VENV_MIN)/lowest.txt -e '.[parity]' \
	  pytest hypothesis protobuf
	touch $@

test-min: $(VENV_MIN)/.installed
	$(VENV_MIN)/bin/python -m pip list 2>/dev/null | grep -iE '^(jax|jaxlib|flax|optax|numpy|ipywidgets|torch|transformers) '
	PALI_KIT_REQUIRE_PARITY=1 $(VENV_MIN)/bin/python -m pytest -q $(CORE)

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
	rm -rf $(VENV) $(VENV_MIN) .pytest_cache .ruff_cache build *.egg-info
