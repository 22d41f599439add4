"""What a benchmark ran on: CPU/GPU, memory, load, library versions, peak RSS, and the
matmul peak the model FLOP utilisation (MFU) is measured against."""

from __future__ import annotations

import contextlib
import importlib.metadata
import os
import platform
import resource
import statistics
import subprocess
import time


def machine_info() -> dict:
    """CPU model, cores, memory and load (from /proc; no TensorFlow import)."""
    model = ""
    flags: set[str] = set()
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key.strip() == "model name" and not model:
                model = value.strip()
            elif key.strip() == "flags" and not flags:
                flags = set(value.split())
    mem_gb = None
    with contextlib.suppress(OSError, ValueError), open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemTotal:"):
                mem_gb = round(int(line.split()[1]) / 1024 / 1024, 1)
    return {
        "cpu_model": model or platform.processor() or platform.machine(),
        "cpu_cores": os.cpu_count(),
        "cpu_simd": sorted(f for f in flags if f.startswith(("avx", "amx")) or f == "fma"),
        "memory_gb": mem_gb,
        "platform": platform.platform(),
        "loadavg": [round(x, 2) for x in os.getloadavg()],
        "gpus": _gpu_names(),
    }


def _gpu_names() -> list[str]:
    try:
        out = subprocess.run(
            ["nvidia-smi", "--query-gpu=name,memory.total", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=20,
        )
    except (OSError, subprocess.SubprocessError):
        return []
    return [line.strip() for line in out.stdout.splitlines() if line.strip()]


def versions() -> dict:
    out = {"python": platform.python_version()}
    for dist in ("tensorflow", "keras", "keras-hub", "tensorflow-text", "numpy"):
        try:
            out[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            out[dist] = None
    from place_tf.training import run_dir

    out["git_revision"] = run_dir.git_revision()
    return out


def peak_rss_mb() -> float:
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0, 1)


def matmul_peak(n: int = 2048, reps: int = 10, threads: int = 0) -> dict:
    """fp32 n×n matmul GFLOP/s with TF and TF XLA on the default device (as
    ../shared/bench/matmul_peak.py), plus bf16 with XLA."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import tensorflow as tf

    if threads:
        tf.config.threading.set_intra_op_parallelism_threads(threads)
        tf.config.threading.set_inter_op_parallelism_threads(1)
    flop = 2.0 * n**3
    x = tf.random.normal((n, n))
    y = tf.random.normal((n, n))
    xla = tf.function(lambda p, q: tf.matmul(p, q), jit_compile=True)

    out = {"n": n, "reps": reps, "threads": threads, "device": default_device()}
    gpu = "GPU" in out["device"]
    # Sync by reading one element (a full .numpy() would time a device-to-host copy on
    # a GPU); there, several queued matmuls per sync hide the launch latency.
    inner = 10 if gpu else 1
    out["calls_per_sync"] = inner

    def timed(fn, a, b):
        for _ in range(3):
            fn(a, b)[0, 0].numpy()
        ts, cs = [], []
        for _ in range(reps):
            t0, c0 = time.perf_counter(), time.process_time()
            for _ in range(inner):
                z = fn(a, b)
            z[0, 0].numpy()
            ts.append((time.perf_counter() - t0) / inner)
            cs.append((time.process_time() - c0) / inner)
        return ts, cs

    for key, fn, a, b in (
        ("fp32", tf.matmul, x, y),
        ("fp32_xla", xla, x, y),
        ("bf16_xla", xla, tf.cast(x, tf.bfloat16), tf.cast(y, tf.bfloat16)),
        *((("fp16_xla", xla, tf.cast(x, tf.float16), tf.cast(y, tf.float16)),) if gpu else ()),
    ):
        ts, cs = timed(fn, a, b)
        out[f"{key}_gflops_median"] = round(flop / statistics.median(ts) / 1e9, 1)
        out[f"{key}_gflops_best"] = round(flop / min(ts) / 1e9, 1)
        if not gpu:  # host CPU time says nothing about an accelerator's work
            out[f"{key}_gflop_per_cpu_s"] = round(flop / max(statistics.median(cs), 1e-9) / 1e9, 1)
    out["loadavg"] = [round(v, 2) for v in os.getloadavg()]
    return out


def default_device() -> str:
    import tensorflow as tf

    gpus = tf.config.list_logical_devices("GPU")
    return gpus[0].name if gpus else tf.config.list_logical_devices("CPU")[0].name
