# `make demo` and `make test` each do all the setup on a fresh machine.
SHELL := /bin/bash
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip install --quiet --disable-pip-version-check -c constraints.txt
STAMP := $(VENV)/.installed
DATA := data
JOBS ?= 2

.PHONY: setup system python test lint demo clean

setup: python system

system:
	@bash scripts/setup_system.sh

python: $(STAMP)

$(PY):
	python3 -m venv $(VENV)

# torch first, pinned to the local CPU wheel, so nothing resolves a CUDA build.
$(STAMP): pyproject.toml constraints.txt | $(PY)
	@$(PY) -c "import torch" 2>/dev/null || $(PIP) torch==2.13.0
	$(PIP) -e '.[dev]'
	@touch $(STAMP)

lint: python
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

test: setup lint
	$(VENV)/bin/pytest -q

demo: setup
	$(VENV)/bin/echoic synth --out $(DATA)/synth_en --num-utts 2000 --jobs $(JOBS)
	$(VENV)/bin/echoic prepare --manifest $(DATA)/synth_en/train.jsonl --tokenizer char \
		--out $(DATA)/synth_en/lang_char --report-on $(DATA)/synth_en/dev.jsonl $(DATA)/synth_en/test.jsonl \
		--jobs $(JOBS)

clean:
	rm -rf $(VENV) $(DATA) .pytest_cache .ruff_cache *.egg-info
