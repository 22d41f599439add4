# PLACE-TF developer commands. Everything runs inside the project environment via tools/run.
# PLACE_ENV=auto|venv|rootfs chooses the environment kind (auto: venv when glibc >= 2.39).
PLACE_ENV ?= auto
PYTEST_ARGS ?=
RUN := tools/run

.PHONY: setup test test-fast lint lock train pipeline compare benchmark bench-vs-pytorch bazel-test clean-env

setup:
	PLACE_ENV=$(PLACE_ENV) bash tools/setup_env.sh

lint:
	$(RUN) ruff check .
	$(RUN) ruff format --check .

test: lint
	$(RUN) python -m pytest tests $(PYTEST_ARGS)

test-fast: lint
	$(RUN) python -m pytest tests -m "not slow" $(PYTEST_ARGS)

# Re-resolve the exact pins (with hashes) from requirements.txt for the target platform.
lock:
	uv pip compile requirements.txt --python-version 3.13 \
	  --python-platform x86_64-manylinux_2_39 --generate-hashes --no-header \
	  -o requirements.lock

train:
	$(RUN) python -m place_tf.train --flagfile=configs/quickstart.flags

pipeline:
	$(RUN) tfx pipeline create --pipeline_path=$(CURDIR)/pipelines/local_runner.py --engine=local
	$(RUN) tfx run create --pipeline_name=place --engine=local

compare:
	$(RUN) python tools/compare.py --config configs/compare_synth.yaml

benchmark:
	$(RUN) python tools/benchmark.py all

# Alternating head-to-head with the eager PyTorch reference (../shared/bench); ~15 min.
bench-vs-pytorch:
	tools/bench_vs_pytorch.sh

bazel-test:
	$(RUN) bash tools/bazel_test.sh

# Remove the cached environment (rootfs kind) and the repo venv.
clean-env:
	rm -rf .venv .place-env "$${PLACE_TF_CACHE:-$${XDG_CACHE_HOME:-$$HOME/.cache}/place-tf}"
