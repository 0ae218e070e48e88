# Two commands for a fresh machine (Python >= 3.10 with venv):
#   make demo   install into .venv, encode example texts with a tiny built-in model, print a benchmark table
#   make test   install into .venv with the test extras and run the test suite CI runs
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
RESULTS ?= benchmarks/results/local

.PHONY: demo test wheel clean

$(VENV)/.installed: setup.py pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q -e ".[test,bench]"
	touch $@

demo: $(VENV)/.installed
	$(PY) -m llm2vec_fast.cli demo
	$(PY) benchmarks/run.py --quick --out $(RESULTS)

# TRITON_INTERPRET=1 lets the Triton kernels' tests run on CPU tensors (GPU runs ignore it).
test: $(VENV)/.installed
	TRITON_INTERPRET=1 $(PY) -m pytest -q tests

# A wheel for H100 servers, with the CUDA extension for sm_90a (needs nvcc and a CUDA build of torch).
wheel: $(VENV)/.installed
	$(PY) -m pip install -q wheel
	CUDA_HOME=$${CUDA_HOME:-/usr/local/cuda} TORCH_CUDA_ARCH_LIST=$${TORCH_CUDA_ARCH_LIST:-9.0a} \
		$(PY) -m pip wheel --no-build-isolation --no-deps -w dist .

clean:
	rm -rf $(VENV) build dist *.egg-info
