# Two commands do all set-up on a fresh machine:
#   make demo   generate a phantom, run the demo model, write heatmaps to ./medcam-demo/
#   make test   run the test suite (unit tests and the notebooks)
#   make docs   build the documentation site into ./site (mkdocs build --strict)
# Both create .venv and install what they need. The CPU build torch==2.13.0 is installed first unless the
# venv already has a torch, so a CPU machine never downloads a multi-GB CUDA build.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
PYTEST_WORKERS ?= 2

.PHONY: venv lint test docs demo clean

$(VENV)/.installed: pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -c constraints.txt -e ".[dev,docs]"
	touch $@

venv: $(VENV)/.installed

lint: venv
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy medcam

# The notebooks run even when a unit test failed; the target fails if either run failed.
test: venv
	status=0; \
	$(PY) -m pytest -n $(PYTEST_WORKERS) --durations=25 tests || status=1; \
	$(PY) -m pytest -n $(PYTEST_WORKERS) --nbmake notebooks || status=1; \
	exit $$status

# The documentation site (MkDocs + Material + mkdocstrings) into ./site; --strict: a broken link or a missing API
# reference fails the build.
docs: venv
	NO_MKDOCS_2_WARNING=1 $(VENV)/bin/mkdocs build --strict

demo: venv
	$(VENV)/bin/medcam demo --output medcam-demo

clean:
	rm -rf $(VENV) medcam-demo site
