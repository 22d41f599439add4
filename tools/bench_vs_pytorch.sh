#!/usr/bin/env bash
# Head-to-head train-step throughput against the eager PyTorch reference (issue "Performance").
#
# Alternates, ROUNDS times, on the same machine and threads (fp32, batch 16, ViT-B/16 + BERT-6):
#   1. ../shared/bench/torch_step.py --config full   (PyTorch eager, the reference)
#   2. tools/benchmark.py train --configs full --objectives convirt   (our trainer step, XLA)
# then, once, the full PLACE objective, and writes results/bench/vs_pytorch.json with the
# per-round medians and the ratios (images/s ours / PyTorch; PLACE / ConVIRT step time).
#
# PyTorch runs on the host (its wheels need no new glibc); ours runs in the project env
# (tools/run). The PyTorch venv is cached outside the repository:
#   TORCH_VENV=${TORCH_VENV:-$HOME/.cache/place-tf/torch-ref}  (created on first use)
#   REFERENCE_DIR=${REFERENCE_DIR:-<repo>/../shared/bench}
# Usage: tools/bench_vs_pytorch.sh [ROUNDS=2] [STEPS=3]
set -euo pipefail
REPO="$(cd "$(dirname "$0")/.." && pwd)"
ROUNDS="${1:-2}"
STEPS="${2:-3}"
THREADS="${THREADS:-$(nproc)}"
TORCH_VENV="${TORCH_VENV:-$HOME/.cache/place-tf/torch-ref}"
REFERENCE_DIR="${REFERENCE_DIR:-$REPO/../shared/bench}"
OUT_DIR="${OUT_DIR:-$REPO/results/bench}"

if [ ! -f "$REFERENCE_DIR/torch_step.py" ]; then
  echo "bench_vs_pytorch: no reference at $REFERENCE_DIR/torch_step.py (set REFERENCE_DIR)" >&2
  exit 2
fi
if [ ! -x "$TORCH_VENV/bin/python" ] || ! "$TORCH_VENV/bin/python" -c "import torch, transformers" 2>/dev/null; then
  echo "bench_vs_pytorch: creating the PyTorch reference venv in $TORCH_VENV" >&2
  python3 -m venv "$TORCH_VENV"
  "$TORCH_VENV/bin/pip" install -q "torch==2.13.0" transformers \
    || "$TORCH_VENV/bin/pip" install -q "torch==2.13.0+cpu" transformers
fi

WORK="$(mktemp -d)"
trap 'rm -rf "$WORK"' EXIT
mkdir -p "$OUT_DIR"
for r in $(seq 1 "$ROUNDS"); do
  echo "[vs_pytorch] round $r/$ROUNDS: PyTorch eager" >&2
  "$TORCH_VENV/bin/python" "$REFERENCE_DIR/torch_step.py" --config full --batch 16 \
    --warmup 1 --steps "$STEPS" --threads "$THREADS" --out "$WORK/torch.jsonl" >&2
  echo "[vs_pytorch] round $r/$ROUNDS: PLACE-TF trainer step (ConVIRT objective, XLA)" >&2
  "$REPO/tools/run" python tools/benchmark.py train --configs full --objectives convirt \
    --batch 16 --warmup 1 --steps "$STEPS" --threads "$THREADS" \
    --out_dir "$WORK" --name "ours_r$r" >&2
done
echo "[vs_pytorch] PLACE objective (once)" >&2
"$REPO/tools/run" python tools/benchmark.py train --configs full --objectives place \
  --batch 16 --warmup 1 --steps "$STEPS" --threads "$THREADS" --out_dir "$WORK" --name place >&2

python3 - "$WORK" "$OUT_DIR/vs_pytorch.json" "$ROUNDS" <<'EOF'
import json, os, statistics, sys, time
work, out, rounds = sys.argv[1], sys.argv[2], int(sys.argv[3])
torch_runs = [json.loads(l) for l in open(os.path.join(work, "torch.jsonl")) if l.strip()]
ours = [json.load(open(os.path.join(work, f"ours_r{r}.json"))) for r in range(1, rounds + 1)]
place = json.load(open(os.path.join(work, "place.json")))

def first_ok(doc):
    ok = [x for x in doc["results"] if "error" not in x]
    if not ok:
        raise SystemExit(f"benchmark run failed: {doc['results']}")
    return ok[0]

ours_res = [first_ok(d) for d in ours]
place_res = first_ok(place)
t_med = statistics.median(x["median_step_s"] for x in torch_runs)
o_med = statistics.median(x["median_step_s"] for x in ours_res)
doc = {
    "benchmark": "vs_pytorch",
    "what": "ViT-B/16 + BERT-6 dual encoder, fp32, batch 16, random data; alternating runs",
    "machine": ours[0].get("machine"),
    "loadavg_end": [round(v, 2) for v in os.getloadavg()],
    "rounds": rounds,
    "pytorch_eager": torch_runs,
    "ours_convirt": ours_res,
    "ours_place": place_res,
    "matmul_peak": ours[0].get("matmul_peak"),
    "pytorch_median_step_s": round(t_med, 3),
    "ours_convirt_median_step_s": round(o_med, 3),
    "speed_vs_pytorch": round(t_med / o_med, 3),
    "place_over_convirt_step_time": round(place_res["median_step_s"] / o_med, 3),
    "place_over_convirt_cpu_time": (
        round(place_res["cpu_s_per_step_median"] / statistics.median(x["cpu_s_per_step_median"] for x in ours_res), 3)
        if place_res.get("cpu_s_per_step_median") else None
    ),
    "ours_convirt_mfu": [x.get("mfu") for x in ours_res],
    "ours_convirt_mfu_cpu_time": [x.get("mfu_cpu_time") for x in ours_res],
    "written": time.strftime("%Y-%m-%d %H:%M:%S"),
}
with open(out, "w") as f:
    json.dump(doc, f, indent=2)
print(json.dumps({k: doc[k] for k in ("pytorch_median_step_s", "ours_convirt_median_step_s", "speed_vs_pytorch", "place_over_convirt_step_time", "place_over_convirt_cpu_time", "ours_convirt_mfu", "ours_convirt_mfu_cpu_time")}, indent=1))
print(f"wrote {out}")
EOF
