# Every target sets itself up: a fresh clone needs only python3 (3.10+) and pip's registries.
# torch is pinned to 2.13.0, the CPU wheel; everything else is locked in requirements/lock.txt.
PY      ?= python3
VENV    := .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.installed
PIP     := $(BIN)/python -m pip install --only-binary=:all: -c requirements/lock.txt

.PHONY: setup demo test notebooks test-slow golden-check bench bench-unet bench-unet-sdxl conformance clean

$(STAMP): pyproject.toml requirements/lock.txt
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(PIP) torch==2.13.0
	$(PIP) -e '.[test,oracle]'
	# Oracles installed without their declared deps (torchvision, wandb, ...), which they don't need here:
	# k-diffusion (samplers, schedules), open_clip_torch (ships the CLIP BPE vocabulary the text goldens use).
	$(PIP) --no-deps k-diffusion open_clip_torch
	touch $(STAMP)

setup: $(STAMP)

# The main job on the packaged demo model, refsd-tiny-shapes: a tiny SD1-architecture checkpoint trained
# here (train/tiny_shapes.py) to draw one coloured shape on a coloured background at 64x64, its native size
# (refsd/data/, docs/demo_model.md). The prompt is a colour/shape/background combination it never saw in
# training. out/ is git-ignored.
DEMO_OUT ?= out/demo.png
DEMO_PROMPT ?= a blue triangle on a red background
demo: setup
	@mkdir -p $(dir $(DEMO_OUT))
	@echo 'refsd demo: "$(DEMO_PROMPT)" with the packaged tiny-shapes model (64x64; docs/demo_model.md) ->'
	@$(BIN)/python -m refsd generate --demo --prompt "$(DEMO_PROMPT)" --seed 7 --steps 20 --out $(DEMO_OUT)
	@echo 'For other pictures, use a checkpoint you have:'
	@echo '  $(BIN)/refsd generate --model sd15.safetensors --prompt "a photo of a cat" --out out.png'

# Default tier: re-capture every golden with the oracle and compare, then the test suite.
test: setup golden-check
	$(BIN)/python -m pytest -q -m "not slow" $(PYTEST_ARGS)

# The teaching notebooks alone (tests/test_notebooks.py runs the same check under make test).
notebooks: setup
	$(BIN)/python -m notebooks.run

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

# One full-size SDXL base UNet CFG step (latent 2x4x128x128 = 1024x1024), refsd-numpy vs torch-CPU;
# ~11 GiB resident per side (one at a time), ~15 minutes on 2 cores (weights are drawn in each process).
bench-unet-sdxl: setup
	$(BIN)/python -m bench unet --model sdxl --latent 128 --warmup 0 --repeats 1

conformance: setup
	$(BIN)/python -m backends numpy
	$(BIN)/python -m backends array-api-strict
	$(BIN)/python -m backends torch

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis build *.egg-info
