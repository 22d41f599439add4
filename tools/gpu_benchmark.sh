#!/usr/bin/env bash
# The prepared GPU benchmark of issue 8 (one GPU): the trainer's real step on
# ViT-B/16 + BERT-6 (tools/benchmark.py config "full"), ConVIRT and PLACE, XLA on/off ×
# fp32/bf16 at batch 16, 1 replica; then (phase "sweep") XLA + bf16 at growing batches
# until one does not fit. Every JSON lands in $OUT; MFU is against the matmul peak
# measured on the same GPU (8192² matmuls, fp32 = TF32 where TF enables it, bf16).
#
#   OUT=/some/dir tools/gpu_benchmark.sh            # phase "core": 8 runs, ≈ 6-9 min
#   OUT=/some/dir tools/gpu_benchmark.sh sweep      # largest batch that fits, ≈ 5-8 min
#   tools/gpu_benchmark.sh --dry-run [core|sweep]   # print commands + configurations only
#
# Overrides: PYTHON (the interpreter with the locked stack; default tools/run python when
# `make setup` was run here, else python3), OBJECTIVES (default convirt,place),
# STEPS (timed steps, default 20), WARMUP (default 3), RUN_TIMEOUT (s per config, 240).
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
DRY=0
PHASE=core
for a in "$@"; do
  case "$a" in
    --dry-run) DRY=1 ;;
    core|sweep) PHASE="$a" ;;
    *) echo "usage: $0 [--dry-run] [core|sweep]" >&2; exit 2 ;;
  esac
done

if [ -z "${OUT:-}" ]; then
  if [ "$DRY" = 1 ]; then OUT='$OUT'; else echo "set OUT to the output directory" >&2; exit 2; fi
fi
[ "$DRY" = 1 ] || mkdir -p "$OUT"

if [ -n "${PYTHON:-}" ]; then
  read -r -a PY <<<"$PYTHON"
elif [ -f "$REPO/.place-env" ]; then
  PY=("$REPO/tools/run" python)
else
  PY=(python3)
fi

OBJECTIVES="${OBJECTIVES:-convirt,place}"
STEPS="${STEPS:-20}"
WARMUP="${WARMUP:-3}"
RUN_TIMEOUT="${RUN_TIMEOUT:-240}"
export TF_CPP_MIN_LOG_LEVEL="${TF_CPP_MIN_LOG_LEVEL:-2}"

common=(--configs full --objectives "$OBJECTIVES" --replicas 1 --warmup "$WARMUP"
        --steps "$STEPS" --timeout "$RUN_TIMEOUT" --peak_n 8192 --peak_reps 20
        --out_dir "$OUT")
case "$PHASE" in
  core)  args=(train "${common[@]}" --xla on,off --precision fp32,bf16 --batch 16 --name gpu_train_b16) ;;
  sweep) args=(train "${common[@]}" --xla on --precision bf16 --batch 32,64,128,256,512 --name gpu_train_sweep) ;;
esac

cd "$REPO"
if [ "$DRY" = 1 ]; then
  echo "+ ${PY[*]} tools/benchmark.py ${args[*]}"
  exec "${PY[@]}" tools/benchmark.py "${args[@]}" --dry_run
fi

{ nvidia-smi || true; } >"$OUT/nvidia_smi.txt" 2>&1
echo "+ ${PY[*]} tools/benchmark.py ${args[*]}"
"${PY[@]}" tools/benchmark.py "${args[@]}" 2>&1 | tee "$OUT/gpu_benchmark_$PHASE.log"
