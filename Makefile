# `make demo` and `make test` each do all the setup on a fresh machine.
SHELL := /bin/bash
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip install --quiet --disable-pip-version-check -c constraints.txt
STAMP := $(VENV)/.installed
DATA := data
JOBS ?= 2

.PHONY: setup system python test lint demo robust clean

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
	$(VENV)/bin/lint-imports --no-cache

# Two test processes of one thread each: most tests are small models, subprocesses and
# waits, which one process leaves a core idle for. Tests that share a trained model run
# in one process (xdist_group "trained"), so it is trained once.
test: setup lint
	OMP_NUM_THREADS=1 $(VENV)/bin/pytest -q -n $(JOBS) --dist loadgroup

ECHOIC := $(VENV)/bin/echoic
CORPUS := $(DATA)/synth_en

# File targets: a rerun skips what is done, and training resumes where it stopped
# (Ctrl-C saves a checkpoint first).
# lm_text.txt is the last file synth writes: a corpus from before it existed is redone.
# So is one from before test_open.jsonl: its dev and test splits were drawn differently.
ifeq ($(wildcard $(CORPUS)/test_open.jsonl),)
$(shell rm -f $(CORPUS)/lm_text.txt)
endif
$(CORPUS)/lm_text.txt: | python system
	$(ECHOIC) synth --out $(CORPUS) --num-utts 13000 --hotword-test --jobs $(JOBS)

$(CORPUS)/lang_char/cmvn.json: $(CORPUS)/lm_text.txt
	$(ECHOIC) prepare --manifest $(CORPUS)/train.jsonl --tokenizer char --out $(CORPUS)/lang_char \
		--report-on $(CORPUS)/dev.jsonl $(CORPUS)/test.jsonl $(CORPUS)/test_open.jsonl --jobs $(JOBS)

demo: setup $(CORPUS)/lang_char/cmvn.json
	$(ECHOIC) train recipes/synth_en/conf/demo.yaml --exp exp/demo
	$(ECHOIC) decode --exp exp/demo --manifest $(CORPUS)/test.jsonl --method attention_rescoring --beam 20 \
		--lm $(CORPUS)/lm_text.txt --attention-weight 0.25 --ctc-weight 0.5 --out exp/demo/decode_test
	$(ECHOIC) decode --exp exp/demo --manifest $(CORPUS)/test_open.jsonl --method attention_rescoring --beam 20 \
		--lm $(CORPUS)/lm_text.txt --attention-weight 0.25 --ctc-weight 0.5 --out exp/demo/decode_test_open
	@echo
	@echo "Test split, demo model (CTC prefix beam search with a trigram word LM of lm_text.txt,"
	@echo "its 20 best rescored by the attention decoder):"
	@$(ECHOIC) score --ref $(CORPUS)/test.jsonl --hyp exp/demo/decode_test/hyp.jsonl --worst 3
	@echo
	@echo "Open-vocabulary test split (test_open: drawn without the rule that test's words be in train;"
	@echo "16% of its words never occur in train, so no character model gets those exactly right):"
	@$(ECHOIC) score --ref $(CORPUS)/test_open.jsonl --hyp exp/demo/decode_test_open/hyp.jsonl --worst 3
	@echo
	@echo "Transcribe your own recording (any format, rate or channels):"
	@echo "  $(ECHOIC) transcribe --exp exp/demo my_recording.wav"
	@echo "With the word LM, as decoded above:"
	@echo "  $(ECHOIC) transcribe --exp exp/demo --lm $(CORPUS)/lm_text.txt --beam 20 --attention-weight 0.25 my_recording.wav"

# Noisy and telephone copies of dev and test: synth writes them; a corpus made before
# they existed gets them here.
$(CORPUS)/test_tel.jsonl: | $(CORPUS)/lm_text.txt
	$(ECHOIC) synth --out $(CORPUS) --degraded-only

# The demo's model trained with noise, reverberation and telephone-channel augmentation
# (recipes/synth_en/conf/robust.yaml), scored on clean, noisy and telephone test audio.
DECODE_LM := --method attention_rescoring --beam 20 --lm $(CORPUS)/lm_text.txt \
	--attention-weight 0.25 --ctc-weight 0.5
robust: setup $(CORPUS)/lang_char/cmvn.json $(CORPUS)/test_tel.jsonl
	$(ECHOIC) train recipes/synth_en/conf/robust.yaml --exp exp/robust
	@for split in test test_noisy test_tel; do \
		$(ECHOIC) decode --exp exp/robust --manifest $(CORPUS)/$$split.jsonl $(DECODE_LM) \
			--out exp/robust/decode_$$split && \
		echo "$$split:" && $(ECHOIC) score --ref $(CORPUS)/$$split.jsonl \
			--hyp exp/robust/decode_$$split/hyp.jsonl || exit 1; \
	done

clean:
	rm -rf $(VENV) $(DATA) exp .pytest_cache .ruff_cache *.egg-info
