#!/usr/bin/env bash
# First check on a GPU host (`make gpu-check`), after `make setup` (which installs
# TensorFlow's CUDA wheels when nvidia-smi lists a GPU, or with GPU=1):
#   1. TensorFlow sees the GPUs (else: what is missing);
#   2. one GPU: a 50-step pretrain-size PLACE run (configs/pretrain.flags: ViT-B/16 +
#      BERT-6 at 224 px, bf16, XLA) on generated SynthCXR through the real CLI, then the
#      trainer's step in tools/benchmark.py: img/s and MFU against the matmul peak measured
#      on the same GPU;
#   3. with >= 2 GPUs: the same with MirroredStrategy over all of them.
# Outputs (logs, benchmark JSON, run dirs) go to $OUT (default results/bench/gpu_check).
# Overrides: BATCH (per-GPU batch, default 64), STEPS (50), IMAGES (SynthCXR images, 2048),
# PYTHON (interpreter with the stack; default tools/run python).
set -euo pipefail
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$REPO"
OUT="${OUT:-$REPO/results/bench/gpu_check}"
BATCH="${BATCH:-64}" STEPS="${STEPS:-50}" IMAGES="${IMAGES:-2048}"
if [ -n "${PYTHON:-}" ]; then read -r -a PY <<<"$PYTHON"; else PY=("$REPO/tools/run" python); fi
export TF_CPP_MIN_LOG_LEVEL="${TF_CPP_MIN_LOG_LEVEL:-2}"
die() { echo "gpu_check: $*" >&2; exit 1; }

command -v nvidia-smi >/dev/null || die "no nvidia-smi: install the NVIDIA driver (README 'GPU hosts')"
nvidia-smi --query-gpu=index,name,driver_version,memory.total --format=csv,noheader \
  || die "nvidia-smi fails: is the NVIDIA driver loaded?"
mkdir -p "$OUT"
ngpu="$("${PY[@]}" -c 'import tensorflow as tf; print(len(tf.config.list_physical_devices("GPU")))' | tail -1)"
if [ "$ngpu" = 0 ]; then
  die "TensorFlow sees no GPU. Run 'make setup GPU=1' (TensorFlow's CUDA wheels), check the driver version (README 'GPU hosts') and the TensorFlow log: ${PY[*]} -c 'import tensorflow as tf; tf.config.list_physical_devices()'"
fi
echo "gpu_check: TensorFlow sees $ngpu GPU(s)"

train_run() {  # $1 = GPUs, $2 = strategy: the real CLI, 50 steps
  local n="$1" strategy="$2" dir="$OUT/run_${1}gpu"
  rm -rf "$dir"
  echo "gpu_check: $STEPS-step pretrain-size PLACE run on $n GPU(s), strategy $strategy"
  CUDA_VISIBLE_DEVICES="$(seq -s, 0 $((n - 1)))" "${PY[@]}" -m place_tf.train \
    --flagfile=configs/pretrain.flags --corpus_dir="$OUT/synth224" --synthetic_images="$IMAGES" \
    --max_steps="$STEPS" --per_replica_batch="$BATCH" --strategy="$strategy" \
    --model_dir="$dir" --log_every=10 --checkpoint_every=100000 --noexport --noprobe \
    2>&1 | tee "$OUT/run_${n}gpu.log" | { grep -E "step [0-9]+/|throughput|final loss|Error|error" || true; }
}

bench() {  # $1 = replicas: the trainer's step on an in-memory batch, img/s and MFU
  local n="$1"
  CUDA_VISIBLE_DEVICES="$(seq -s, 0 $((n - 1)))" "${PY[@]}" tools/benchmark.py train \
    --configs full --objectives place --xla on --precision bf16 --replicas "$n" \
    --batch $((BATCH * n)) --warmup 5 --steps "$STEPS" --peak_n 8192 --peak_reps 20 \
    --out_dir "$OUT" --name "gpu_check_${n}gpu" 2>&1 | tee "$OUT/bench_${n}gpu.log" | { grep -E "^\[train\]" || true; }
}

train_run 1 default
bench 1
if [ "$ngpu" -ge 2 ]; then
  train_run "$ngpu" mirrored
  bench "$ngpu"
fi
echo "gpu_check: done; logs and JSON in $OUT"
