# PLACE-TF developer commands. Everything runs in the project environment via tools/run,
# which picks the host .venv or, for TFX commands on glibc < 2.39, the Debian 13 root
# filesystem (README "Supported hosts").
# PLACE_ENV=auto|venv|split|rootfs chooses the environment kind (auto: venv when
# glibc >= 2.39, else split); GPU=1|0 forces TensorFlow's CUDA wheels in or out (default:
# in when nvidia-smi lists a GPU).
PLACE_ENV ?= auto
GPU ?=
PYTEST_ARGS ?=
RUN := tools/run

.PHONY: setup setup-tfx test test-fast test-tfx lint lock train pipeline compare benchmark bench-vs-pytorch bazel-test gpu-check clean-env

setup:
	PLACE_ENV=$(PLACE_ENV) GPU=$(GPU) bash tools/setup_env.sh

# The TFX environment now rather than on the first TFX command (root on glibc < 2.39).
setup-tfx:
	PLACE_ENV=$(PLACE_ENV) GPU=$(GPU) bash tools/setup_env.sh tfx

lint:
	$(RUN) ruff check .
	$(RUN) ruff format --check .

# Two runs: the main job's tests in the host venv, then the TFX tests in the TFX
# environment (the same venv on glibc >= 2.39; the root filesystem otherwise, skipped
# with a notice for a non-root user there).
test: lint
	$(RUN) python -m pytest tests -m "not tfx" $(PYTEST_ARGS)
	$(MAKE) --no-print-directory test-tfx

test-fast: lint
	$(RUN) python -m pytest tests -m "not slow and not tfx" $(PYTEST_ARGS)

test-tfx:
	@if tools/tfx_available; then \
	  $(RUN) --tfx python -m pytest tests -m tfx $(PYTEST_ARGS); \
	else \
	  echo "make test: TFX tests skipped: TFX needs glibc >= 2.39 or root for the Debian 13 root filesystem (README 'Supported hosts')"; \
	fi

# Re-resolve the exact pins (with hashes) of requirements/*.lock from pyproject.toml.
lock:
	bash tools/lock.sh

train:
	$(RUN) python -m place_tf.train --flagfile=configs/quickstart.flags

# The TFX CLI registers the pipeline under $LOCAL_HOME: kept in this clone's tfx_root (not
# in ~/tfx, shared by every clone), created on the first run and updated on later ones.
pipeline: export LOCAL_HOME = $(CURDIR)/tfx_root/cli
pipeline:
	$(RUN) --tfx tfx pipeline $$(test -d tfx_root/cli/place && echo update || echo create) \
	  --pipeline_path=$(CURDIR)/pipelines/local_runner.py --engine=local
	$(RUN) --tfx tfx run create --pipeline_name=place --engine=local

compare:
	$(RUN) python tools/compare.py --config configs/compare_synth.yaml

benchmark:
	$(RUN) python tools/benchmark.py all

# Alternating head-to-head with the eager PyTorch reference (../shared/bench); ~15 min.
bench-vs-pytorch:
	tools/bench_vs_pytorch.sh

bazel-test:
	$(RUN) --tfx bash tools/bazel_test.sh

# On a GPU host: 50 pretrain-size PLACE steps (bf16, XLA) printing img/s and MFU, and a
# MirroredStrategy run when there are >= 2 GPUs.
gpu-check:
	bash tools/gpu_check.sh

# Remove the repo venv and the cached root filesystem.
clean-env:
	rm -rf .venv .place-env "$${PLACE_TF_CACHE:-$${XDG_CACHE_HOME:-$$HOME/.cache}/place-tf}"
