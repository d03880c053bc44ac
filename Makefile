# One entry point per stage; every target installs the environment first when it is missing.
#   make demo                    LOST on the embedded demo photos
#   make test                    the test suite
#   make mine ARGS="dataset=voc07 backbone=dino_vits16"
#   make report ARGS="dataset=voc07"  HTML page of an experiment: outputs/<dataset>/<backbone>/report/index.html
# ARGS is passed to the stage as Hydra overrides (use -m for a multirun sweep).
# FORCE=1 (or true, yes) redoes a stage even if its results are complete.

PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
ARGS ?=
NPROC ?= 1
FORCE ?= 0
DATA_ROOT ?= data

# The variables this Makefile reads; anything else given on the command line that looks like a Hydra
# override (a dotted name, a config group or a top-level config key) is refused: `make mine dataset=voc07`
# would otherwise run on the default dataset. The keys conf/*.yaml does not set (their values are the
# dataclasses' defaults: stages.config.PipelineConf) are listed here.
MAKE_VARS := PYTHON ARGS NPROC FORCE DATA_ROOT PYTEST_ARGS
HYDRA_KEYS := $(sort $(notdir $(patsubst %/,%,$(wildcard conf/*/))) \
                     $(shell sed -n 's/^\([A-Za-z_][A-Za-z0-9_]*\):.*/\1/p' conf/*.yaml 2>/dev/null) \
                     dataset backbone miner detector schedule cluster paths experiment \
                     device num_workers progress force seed mine train_cag self_train eval viz report)
CLI_VARS := $(foreach v,$(.VARIABLES),$(if $(filter command line,$(origin $(v))),$(v)))
HYDRA_LIKE := $(foreach v,$(filter-out $(MAKE_VARS),$(CLI_VARS)),\
                $(if $(or $(findstring .,$(v)),$(filter $(HYDRA_KEYS) +% ~%,$(v))),$(v)))
ifneq ($(strip $(HYDRA_LIKE)),)
$(error error: $(foreach v,$(HYDRA_LIKE),$(v)=$($(v))) $(if $(word 2,$(HYDRA_LIKE)),are not make variables,is not a make variable); pass Hydra overrides as ARGS="$(strip $(foreach v,$(HYDRA_LIKE),$(v)=$($(v))) $(ARGS))")
endif

FORCE_ON := 1 true yes TRUE True YES Yes on ON
FORCE_OFF := 0 false no FALSE False NO No off OFF
ifneq ($(filter $(FORCE_ON),$(strip $(FORCE))),)
FORCE_ARGS := force=true
else ifeq ($(filter $(FORCE_OFF),$(strip $(FORCE))),)
ifneq ($(strip $(FORCE)),)
$(error error: FORCE=$(FORCE): use FORCE=1 (or true, yes) to redo a stage, FORCE=0 (or false, no) not to)
endif
endif

.PHONY: install demo test test-all mine merge train-cag self-train evaluate-cag cluster train-cad evaluate-cad \
        status report data-voc07 data-voc12 data-coco data-coco20k benchmark clean-outputs help

help:
	@sed -n '1,7p' Makefile

$(STAMP): requirements.txt setup.cfg pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements.txt
	$(PY) -m pip install -q --no-deps --no-build-isolation -e .
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(PY) -m stages.mine dataset=demo backbone.init=auto $(FORCE_ARGS) $(ARGS)

test: $(STAMP)
	$(PY) -m pytest -q -m "not slow" $(PYTEST_ARGS)

test-all: $(STAMP)
	$(PY) -m pytest -q $(PYTEST_ARGS)

mine: $(STAMP)
	$(PY) -m stages.mine $(FORCE_ARGS) $(ARGS)

merge: $(STAMP)
	$(PY) -m stages.mine mine.merge_only=true $(ARGS)

# NPROC>1: DistributedDataParallel through torchrun on this node (NPROC GPUs, or CPU processes with gloo)
ifeq ($(shell test $(NPROC) -gt 1 && echo yes),yes)
TRAIN := $(VENV)/bin/torchrun --standalone --nproc_per_node=$(NPROC) -m
else
TRAIN := $(PY) -m
endif

train-cag: $(STAMP)
	$(TRAIN) stages.train_cag $(FORCE_ARGS) $(ARGS)

# self-training rounds on train-cag's detector (one process: a round predicts, then trains; no DDP)
self-train: $(STAMP)
	$(PY) -m stages.self_train $(FORCE_ARGS) $(ARGS)

evaluate-cag: $(STAMP)
	$(PY) -m stages.evaluate_cag $(FORCE_ARGS) $(ARGS)

train-cad: $(STAMP)
	$(TRAIN) stages.train_cad $(FORCE_ARGS) $(ARGS)

cluster: $(STAMP)
	$(PY) -m stages.cluster $(FORCE_ARGS) $(ARGS)

evaluate-cad: $(STAMP)
	$(PY) -m stages.evaluate_cad $(ARGS)

report: $(STAMP)
	$(PY) -m stages.report $(ARGS)

data-voc07: $(STAMP)
	$(PY) -m pipeline.data.download voc07 --root $(DATA_ROOT)

data-voc12: $(STAMP)
	$(PY) -m pipeline.data.download voc12 --root $(DATA_ROOT)

data-coco data-coco20k: $(STAMP)
	$(PY) -m pipeline.data.download coco20k --root $(DATA_ROOT)/coco

benchmark: $(STAMP)
	$(PY) benchmarks/mine_throughput.py $(ARGS)

clean-outputs:
	rm -rf outputs/*/ outputs/hydra

status: $(STAMP)
	$(PY) -m stages.status $(ARGS)
