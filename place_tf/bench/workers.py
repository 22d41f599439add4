"""One benchmark configuration per fresh Python process (logical CPU devices and
threading must be set before TensorFlow initialises): `run_worker` starts
`python -m place_tf.bench.workers KIND JSON` and parses its one `RESULT {json}` line."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

from place_tf.bench.results import RESULT_PREFIX, ROOT


def run_worker(kind: str, payload: dict, timeout: float) -> dict:
    """Run one `kind` worker on `payload` in a fresh Python; parse its RESULT line."""
    cmd = [sys.executable, "-m", "place_tf.bench.workers", kind, json.dumps(payload)]
    env = dict(os.environ)  # the child imports this very place_tf
    env["PYTHONPATH"] = os.pathsep.join(p for p in (ROOT, env.get("PYTHONPATH")) if p)
    t0 = time.time()
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout:.0f} s", "wall_s": round(time.time() - t0, 1)}
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith(RESULT_PREFIX):
            res = json.loads(line[len(RESULT_PREFIX) :])
            res["process_wall_s"] = round(time.time() - t0, 1)
            return res
    tail = (proc.stderr or proc.stdout)[-3000:]
    oom = any(s in tail for s in ("ResourceExhausted", "OOM", "out of memory", "MemoryError"))
    return {
        "error": f"worker exited with code {proc.returncode}",
        "oom": oom,
        "stderr_tail": tail,
        "wall_s": round(time.time() - t0, 1),
    }


def worker_main(kind: str, payload: str) -> int:
    spec = json.loads(payload)
    if kind == "train":
        from place_tf.bench.train_worker import run_train_worker

        res = run_train_worker(spec)
    elif kind == "peak":
        from place_tf.bench.machine import matmul_peak

        res = matmul_peak(int(spec["n"]), int(spec["reps"]), int(spec.get("threads") or 0))
    else:
        raise SystemExit(f"unknown worker kind {kind!r}")
    print(RESULT_PREFIX + json.dumps(res), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(worker_main(sys.argv[1], sys.argv[2]))
