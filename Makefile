# leafkd: `make demo` runs the main job on its embedded default; `make test` runs the tests.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
EXTRAS ?= cpu,server,eval,onnx,milvus,test
export HF_HUB_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: install demo lint test clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	# torch is pinned in the same command as the rest: an unpinned install pulls a multi-GB CUDA build.
	$(PY) -m pip install -q torch==2.13.0 -e ".[$(EXTRAS)]"
	touch $@

install: $(VENV)/.installed

models/all-MiniLM-L6-v2/modules.json: $(VENV)/.installed
	$(VENV)/bin/leafkd models install all-MiniLM-L6-v2

demo: models/all-MiniLM-L6-v2/modules.json
	$(VENV)/bin/leafkd demo

# Lint and type checks of the library run before the tests (and fail them).
lint: $(VENV)/.installed
	$(VENV)/bin/ruff check leafkd
	$(VENV)/bin/mypy

test: lint
	$(PY) -m pytest -q tests

clean:
	rm -rf $(VENV) runs
