# microlm: `make pretrain`, `make lora-finetune`, `make test`. Each build target makes .venv first if it is missing.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
NBSTAMP := $(VENV)/.notebooks-installed
ARGS   ?=

.DEFAULT_GOAL := help
.PHONY: help venv pretrain lora-finetune sample notebooks bench test clean

help: ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-14s %s\n", $$1, $$2}'

# A .venv that cannot run pip with Python >= 3.11 (made by an older or since-removed Python, or half
# made) is made again; one whose packages went missing loses its stamp, so they are installed again.
VENV_MODULES := pip torch numpy tiktoken matplotlib safetensors tqdm microlm
VENV_OK := $(shell $(PY) -c 'import sys, importlib.util as u; sys.exit(sys.version_info < (3, 11) or \
  any(u.find_spec(m) is None for m in sys.argv[1:]))' $(VENV_MODULES) 2>/dev/null && echo yes)
ifneq ($(VENV_OK),yes)
$(shell rm -f $(STAMP) $(NBSTAMP))
endif

$(STAMP): requirements.txt pyproject.toml
	@$(PYTHON) -c 'import sys; sys.exit(sys.version_info < (3, 11))' || { \
	  echo "microlm needs Python >= 3.11 ($(PYTHON) is older, or does not run); run e.g. make $(MAKECMDGOALS) PYTHON=python3.12"; exit 1; }
	@$(PY) -c 'import sys, importlib.util as u; sys.exit(sys.version_info < (3, 11) or u.find_spec("pip") is None)' \
	  2>/dev/null || $(PYTHON) -m venv --clear $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -r requirements.txt
	$(PY) -m pip install --quiet --disable-pip-version-check --no-deps --no-build-isolation -e . \
	  || $(PY) -m pip install --quiet --disable-pip-version-check --no-deps -e .
	@touch $(STAMP)

# The notebook runner (nbclient, ipykernel) is only for `make test` and `make notebooks`.
$(NBSTAMP): $(STAMP) requirements-notebooks.txt
	$(PY) -m pip install --quiet --disable-pip-version-check -r requirements-notebooks.txt
	@touch $(NBSTAMP)

venv: $(STAMP) ## create .venv and install the pinned requirements (torch 2.13.0)

pretrain: $(STAMP) ## build the story corpus, train the tokenizer and the GPT into runs/pretrain (ARGS=... for more flags)
	@if [ -f runs/pretrain/summary.json ] && [ -z "$(ARGS)" ]; then \
	  echo "runs/pretrain is already trained (make pretrain ARGS=--overwrite trains it again)"; \
	else $(VENV)/bin/microlm pretrain $(ARGS); fi

lora-finetune: $(STAMP) ## LoRA r=8 on the question set, the full fine-tune baseline, and their comparison (runs/lora, runs/full)
	@test -f runs/pretrain/summary.json || $(MAKE) --no-print-directory pretrain ARGS="$(filter --no-progress,$(ARGS))"
	@if [ -f runs/lora/compare.json ] && [ -z "$(ARGS)" ]; then \
	  echo "runs/lora is already compared (make lora-finetune ARGS=--overwrite runs it again)"; \
	else $(VENV)/bin/microlm lora-finetune $(ARGS) \
	  && $(VENV)/bin/microlm finetune --full $(ARGS) \
	  && $(VENV)/bin/microlm compare $(filter --no-progress,$(ARGS)); fi

sample: $(STAMP) ## print five stories sampled from runs/pretrain, each scored by the world
	$(VENV)/bin/microlm sample --run-dir runs/pretrain $(ARGS)

notebooks: $(NBSTAMP) ## re-execute the teaching notebooks in place (full setting; MICROLM_FAST=1 for a quick run)
	$(PY) notebooks/build_notebooks.py --execute

bench: $(STAMP) ## measure training, generation, LoRA and tokenizer speed side by side -> results/bench.json, results/bench.md and the README's table (ARGS=--quick: a fast check into runs/bench/, README and results/ untouched)
	$(PY) benchmarks/run.py $(ARGS)

test: $(NBSTAMP) ## run the test suite (installs the notebook runner too)
	$(PY) -m pytest

clean: ## delete runs/ and the generated corpus (keeps .venv)
	rm -rf runs data/train.txt data/val.txt data/stats.json data/sft_*.jsonl data/sft_stats.json
