"""The benchmark JSON documents: their keys, header (machine, versions, settings) and
finish (wall time, load, `noisy`), the atomic write, and the quoted reference timings."""

from __future__ import annotations

import datetime
import os
import time

from place_tf.bench.machine import machine_info, versions

# The directory holding the place_tf package (the repository in a checkout): default
# homes of the results (results/bench/) and of the benchmark corpora (data/bench/).
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
DEFAULT_OUT = os.path.join(ROOT, "results", "bench")
RESULT_PREFIX = "RESULT "


# Measured by ../shared/bench (README) on a 2-core AVX2 machine of this kind: fp32, batch 16,
# 2 threads; the same dual encoder in eager PyTorch and naive Keras. PyTorch cannot be
# installed here, so these are quoted, not re-measured.
REFERENCE = {
    "full": {"pytorch_eager": 18.7, "keras_naive_nojit": 40.4, "keras_naive_xla": 23.9},
    "small": {"pytorch_eager": 1.02, "keras_naive_nojit": 1.95, "keras_naive_xla": 1.12},
    "source": "../shared/bench/README.md (s/step, batch 16, fp32)",
}


# (warm-up, timed) steps per config: fewer for the sizes whose CPU steps take seconds.
DEFAULT_STEPS = {"full": (1, 3), "small": (2, 5), "quickstart": (3, 10), "tiny": (2, 10)}


TRAIN_KEYS = (
    "config",
    "objective",
    "xla",
    "xla_effective",
    "precision",
    "replicas",
    "global_batch",
    "per_replica_batch",
    "warmup",
    "steps",
    "step_s",
    "median_step_s",
    "min_step_s",
    "max_step_s",
    "images_per_s",
    "first_step_s",
    "build_s",
    "peak_rss_mb",
    "cpu_util_median",
    "cpu_s_per_step_median",
    "gflop_per_cpu_s",
    "mfu_cpu_time",
    "train_gflop_per_step",
    "achieved_gflops",
    "mfu",
    "traces_after_warmup",
    "loss_traces_after_warmup",
    "loss_first",
    "loss_last",
    "loadavg",
)


INPUT_KEYS = (
    "image_size",
    "batch",
    "augment",
    "corpus_images",
    "warmup_batches",
    "batches",
    "median_batch_s",
    "images_per_s",
    "peak_rss_mb",
    "train_ratios",
)


SERVE_KEYS = ("config", "image_px", "savedmodel_mb", "by_batch")


COMMON_KEYS = ("benchmark", "machine", "versions", "settings", "noisy", "started", "wall_s")


def header(benchmark: str, settings: dict) -> dict:
    return {
        "benchmark": benchmark,
        "started": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "machine": machine_info(),
        "versions": versions(),
        "settings": settings,
        "env": {
            k: os.environ[k]
            for k in ("TF_ENABLE_ONEDNN_OPTS", "XLA_FLAGS", "TF_XLA_FLAGS", "OMP_NUM_THREADS")
            if k in os.environ
        },
    }


def finish(doc: dict, t0: float) -> dict:
    doc["wall_s"] = round(time.time() - t0, 1)
    doc["loadavg_end"] = [round(x, 2) for x in os.getloadavg()]
    cores = doc["machine"]["cpu_cores"] or 1
    # Load above the core count: other processes shared the CPU during the measurement.
    doc["noisy"] = max(doc["machine"]["loadavg"][0], doc["loadavg_end"][0]) > cores
    return doc


def write_json(doc: dict, out_dir: str, name: str) -> str:
    """Atomically write out_dir/name.json (a *.tmp beside it, then rename)."""
    from place_tf import fileio

    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, f"{name}.json")
    return fileio.write_json(path, doc, indent=1, sort_keys=False, newline=True)


def csv_list(value: str) -> list[str]:
    return [v.strip() for v in str(value).split(",") if v.strip()]
