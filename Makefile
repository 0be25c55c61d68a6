# Every target sets itself up: a fresh clone needs only python3 (3.10+) and pip's registries.
# torch is pinned to 2.13.0, the CPU wheel; everything else is locked in requirements/lock.txt.
PY      ?= python3
VENV    := .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.installed
PIP     := $(BIN)/python -m pip install --only-binary=:all: -c requirements/lock.txt

.PHONY: setup demo test test-slow golden-check bench bench-unet conformance clean

$(STAMP): pyproject.toml requirements/lock.txt
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(PIP) torch==2.13.0
	$(PIP) -e '.[test,oracle]'
	# Oracles installed without their declared deps (torchvision, wandb, ...), which they don't need here:
	# k-diffusion (samplers, schedules), open_clip_torch (ships the CLIP BPE vocabulary the text goldens use).
	$(PIP) --no-deps k-diffusion open_clip_torch
	touch $(STAMP)

setup: $(STAMP)

# The main job on an embedded default. Until the generation pipeline lands (issue #5) this runs the
# golden conformance suite on NumPy and prints its table: the numbers every later stage stands on.
demo: setup
	@echo "refsd demo: image generation arrives with the pipeline issue; showing NumPy conformance vs the oracle."
	$(BIN)/python -m backends numpy

# Default tier: re-capture every golden with the oracle and compare, then the test suite.
test: setup golden-check
	$(BIN)/python -m pytest -q -m "not slow"

# Slow tier: full-size SD1.5 / SDXL UNets, VAE decoder, CLIP-L and OpenCLIP-bigG with seeded random
# weights against the oracle (golden/fullsize.py; ~15 GB peak memory, several minutes). CI runs it.
test-slow: setup
	$(BIN)/python -m pytest -q -s -m slow

golden-check: setup
	$(BIN)/python -m golden.capture --check

bench: setup
	$(BIN)/python -m bench ops

bench-unet: setup
	$(BIN)/python -m bench unet

conformance: setup
	$(BIN)/python -m backends numpy
	$(BIN)/python -m backends array-api-strict
	$(BIN)/python -m backends torch

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis build *.egg-info
