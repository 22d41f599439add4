"""PLACE-TF benchmark suite: train step, input pipeline, serving; JSON to results/bench/.

  tools/run python tools/benchmark.py train    # real trainer step, in-memory batches
  tools/run python tools/benchmark.py input    # make_dataset alone (SynthCXR, 224 px, augment)
  tools/run python tools/benchmark.py serve    # SavedModel serving_default latency by batch
  tools/run python tools/benchmark.py profile  # tf.profiler trace + top ops, PLACE vs ConVIRT
  tools/run python tools/benchmark.py all      # input + train + serve, ≲ 15 min on 2 CPU cores
  ... --quick                                  # tiny configs, 2 steps (tests, smoke runs)

`train` measures the trainer's own step: each configuration runs in its own subprocess
(logical CPU devices must be set before TensorFlow initialises), builds the model and
optimizer as `Trainer.run` does, takes the step from `Trainer._make_train_step` and feeds
it in-memory random batches of contract (a), so input cost is excluded. Per configuration
it records the median / min / max of the timed steps after warm-up, images/s, the first
(compiling) step, peak RSS, CPU use, the analytic train FLOPs (place_tf/flops.py), MFU
against a matmul peak measured on the same device, and the number of tf.function traces
after warm-up (0 = no retracing).

Every JSON file carries `machine` (CPU model, cores, memory, load averages at start and
end), `versions`, the settings, and `noisy: true` when the 1-minute load average exceeded
the core count (other processes competed for the CPU). On a shared CPU, compare the
process CPU-seconds per step (`cpu_s_per_step_median`, `gflop_per_cpu_s`, `mfu_cpu_time`
= GFLOP per CPU-second of the step over that of an XLA fp32 matmul): they move by a few
per cent between runs where wall-clock times move by 2x.
The parent process never imports TensorFlow for `train`; workers print one
`RESULT {json}` line.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import glob
import importlib.metadata
import json
import math
import os
import platform
import re
import resource
import statistics
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
    sys.path.insert(0, REPO)

DEFAULT_OUT = os.path.join(REPO, "results", "bench")
RESULT_PREFIX = "RESULT "


# Measured by ../shared/bench (README) on a 2-core AVX2 machine of this kind: fp32, batch 16,
# 2 threads; the same dual encoder in eager PyTorch and naive Keras. PyTorch cannot be
# installed here, so these are quoted, not re-measured.
REFERENCE = {
    "full": {"pytorch_eager": 18.7, "keras_naive_nojit": 40.4, "keras_naive_xla": 23.9},
    "small": {"pytorch_eager": 1.02, "keras_naive_nojit": 1.95, "keras_naive_xla": 1.12},
    "source": "../shared/bench/README.md (s/step, batch 16, fp32)",
}

# (warm-up, timed) steps per config: ViT-B/16 steps take ~20-40 s on 2 CPU cores.
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


# --------------------------------------------------------------------------- machine


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
    try:
        out["git_revision"] = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True, timeout=10
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        out["git_revision"] = ""
    return out


def peak_rss_mb() -> float:
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0, 1)


def _header(benchmark: str, settings: dict) -> dict:
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


def _finish(doc: dict, t0: float) -> dict:
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


# --------------------------------------------------------------------------- configs


def model_config(name: str):
    """ModelConfig of a named benchmark config: tiny | quickstart | small | full."""
    from place_tf import flops
    from place_tf.config import preset_model_config, tiny_model_config

    if name == "tiny":
        return tiny_model_config()
    if name == "quickstart":
        # The trainer takes the vocabulary size from the corpus; SynthCXR learns this many.
        from place_tf.data.synthetic import DEFAULT_VOCAB_SIZE

        return preset_model_config("quickstart", vocab_size=DEFAULT_VOCAB_SIZE)
    if name == "full":
        return flops.BENCH_FULL
    if name == "small":
        return flops.BENCH_SMALL
    raise ValueError(f"unknown benchmark config {name!r}: use tiny, quickstart, small or full")


# --------------------------------------------------------------------------- train worker


def random_batch(mc, batch: int, seed: int) -> dict:
    """In-memory batch of contract (a): [CLS] ids [SEP] [PAD]..., random lengths and labels."""
    import numpy as np

    rng = np.random.default_rng(seed)
    s, length = mc.image_size, mc.max_length
    lengths = rng.integers(max(3, length // 3), length + 1, batch)
    ids = rng.integers(5, mc.vocab_size, (batch, length))
    pos = np.arange(length)[None, :]
    ids[:, 0] = 2  # [CLS] (learned vocabularies start [PAD] [UNK] [CLS] [SEP] [MASK])
    ids = np.where(pos == lengths[:, None] - 1, 3, ids)  # [SEP]
    mask = pos < lengths[:, None]
    ids = np.where(mask, ids, 0)
    return {
        "image": rng.uniform(-1.0, 1.0, (batch, s, s, 1)).astype("float32"),
        "token_ids": ids.astype("int32"),
        "padding_mask": mask,
        "labels": rng.choice(np.array([1.0, 0.0, -1.0, -2.0], "float32"), (batch, 14)),
    }


def build_train_step(spec: dict):
    """(step_fn, model, strategy, bad_steps, cfgs) built as `Trainer.run` builds them.

    The set-up, train state and step are training's own (`setup.prepare`,
    `setup.build_train_state`, `step.build_train_step`).
    """
    from place_tf import config as config_lib
    from place_tf import objectives
    from place_tf.training import setup
    from place_tf.training import step as step_lib

    replicas_wanted = int(spec["replicas"])
    mc = model_config(spec["config"]) if isinstance(spec["config"], str) else spec["config"]
    train = config_lib.TrainConfig(
        model_dir=spec.get("model_dir", ""),
        per_replica_batch=int(spec["global_batch"]) // replicas_wanted,
        strategy="mirrored" if replicas_wanted > 1 else "default",
        num_cpu_devices=replicas_wanted if replicas_wanted > 1 and not _has_gpu() else 0,
        jit_compile=bool(spec["xla"]),
        mixed_precision={"fp32": "float32", "bf16": "mixed_bfloat16", "fp16": "mixed_float16"}[
            spec["precision"]
        ],
        max_steps=1000,
        warmup_steps=10,
        learning_rate=1e-4,
    )
    cfgs = config_lib.Configs(
        data=config_lib.DataConfig(image_size=mc.image_size, max_length=mc.max_length),
        model=mc,
        objective=objectives.objective_config(spec["objective"]),
        train=train,
    )
    strategy = setup.prepare(train)
    replicas = strategy.num_replicas_in_sync
    if replicas != replicas_wanted:
        raise RuntimeError(f"asked for {replicas_wanted} replicas, the strategy has {replicas}")
    state = setup.build_train_state(strategy, mc, cfgs.objective, train, train.max_steps)
    step = step_lib.build_train_step(strategy, state, train, cfgs.objective)
    return step, state.model, strategy, state.bad_steps, cfgs


def _devices(strategy) -> list[str]:
    try:
        return list(strategy.extended.worker_devices)
    except (AttributeError, RuntimeError, NotImplementedError):
        return [_default_device()]


def _has_gpu() -> bool:
    import tensorflow as tf

    return bool(tf.config.list_physical_devices("GPU"))


def count_loss_traces(model) -> dict:
    """Wrap model.compute_losses so each Python-level call (= one trace inside
    tf.function) is counted; returns the mutable counter {"calls": n}."""
    counter = {"calls": 0}
    original = model.compute_losses

    def counted(*args, **kwargs):
        counter["calls"] += 1
        return original(*args, **kwargs)

    object.__setattr__(model, "compute_losses", counted)  # bypass Keras attribute tracking
    return counter


def distribute_batch(strategy, batch: dict):
    """Place a global in-memory batch on the replicas (each gets its contiguous slice)."""
    import tensorflow as tf

    replicas = strategy.num_replicas_in_sync
    if replicas == 1:
        return {k: tf.constant(v) for k, v in batch.items()}
    n = len(batch["image"]) // replicas

    def value_fn(ctx):
        i = ctx.replica_id_in_sync_group
        return {k: tf.constant(v[i * n : (i + 1) * n]) for k, v in batch.items()}

    return strategy.experimental_distribute_values_from_function(value_fn)


def run_train_worker(spec: dict) -> dict:
    """One configuration: build, warm up, time; returns the result dict."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    os.environ.setdefault("KERAS_BACKEND", "tensorflow")
    import tensorflow as tf

    threads = int(spec.get("threads") or 0)
    if threads:
        tf.config.threading.set_intra_op_parallelism_threads(threads)
        tf.config.threading.set_inter_op_parallelism_threads(int(spec.get("interop") or 0))
    from place_tf import flops

    t_build = time.perf_counter()
    step, model, strategy, bad_steps, cfgs = build_train_step(spec)
    traces = count_loss_traces(model)
    batches = [
        distribute_batch(
            strategy, random_batch(cfgs.model, int(spec["global_batch"]), int(spec["seed"]) + i)
        )
        for i in range(2)
    ]
    build_s = time.perf_counter() - t_build
    rss_build = peak_rss_mb()
    warmup, steps = int(spec["warmup"]), int(spec["steps"])
    if warmup < 1:
        raise ValueError("warmup must be >= 1 (the first step traces and compiles)")
    times, cpu, cpu_s, losses, warm = [], [], [], [], []
    traces_at_warm = loss_traces_at_warm = 0
    for i in range(warmup + steps):
        if i == warmup:
            traces_at_warm = step.experimental_get_tracing_count()
            loss_traces_at_warm = traces["calls"]
        t0, c0 = time.perf_counter(), time.process_time()
        logs = step(batches[i % 2])
        # As the trainer's loop: every log value to host (blocks until the step is done).
        logs_np = {k: float(v.numpy()) for k, v in logs.items()}
        int(bad_steps.numpy())
        dt = time.perf_counter() - t0
        if i < warmup:
            warm.append(dt)
        else:
            times.append(dt)
            cpu_s.append(time.process_time() - c0)
            cpu.append(cpu_s[-1] / dt)
        losses.append(logs_np["loss"])
    profile = None
    if spec.get("profile_dir"):
        profile = profile_steps(step, batches, int(spec.get("profile_steps") or 3), spec)
    med = statistics.median(times)
    gb = int(spec["global_batch"])
    fl = flops.train_flops_per_step(cfgs.model, cfgs.objective, gb)
    peak = spec.get("peak_gflops")
    # bf16/fp16 steps are also compared with the same dtype's matmul peak (XLA).
    peak_same = (spec.get("peak_by_precision") or {}).get(spec["precision"]) or peak
    peak_cpu = spec.get("peak_per_cpu_s")  # matmul GFLOP per process CPU-second
    res = {
        "config": spec["config"],
        "objective": spec["objective"],
        "xla": bool(spec["xla"]),
        # With >1 replica the trainer compiles only when the model has forward_features.
        "xla_effective": bool(spec["xla"])
        and (strategy.num_replicas_in_sync == 1 or hasattr(model, "forward_features")),
        "precision": spec["precision"],
        "replicas": strategy.num_replicas_in_sync,
        "devices": _devices(strategy),
        "global_batch": gb,
        "per_replica_batch": gb // strategy.num_replicas_in_sync,
        "image_size": cfgs.model.image_size,
        "max_length": cfgs.model.max_length,
        "threads": threads,
        "warmup": warmup,
        "steps": steps,
        "warmup_s": [round(t, 4) for t in warm],
        "step_s": [round(t, 4) for t in times],
        "median_step_s": round(med, 4),
        "min_step_s": round(min(times), 4),
        "max_step_s": round(max(times), 4),
        "images_per_s": round(gb / med, 3),
        "first_step_s": round(warm[0], 3),
        "build_s": round(build_s, 2),
        "rss_after_build_mb": rss_build,
        "peak_rss_mb": peak_rss_mb(),
        "cpu_util_median": round(statistics.median(cpu), 2),
        # Process CPU-seconds per step: far less sensitive than wall time to other
        # processes sharing the cores (what remains is cache/SMT interference).
        "cpu_s_per_step_median": round(statistics.median(cpu_s), 3),
        "gflop_per_cpu_s": round(fl / statistics.median(cpu_s) / 1e9, 2),
        "mfu_cpu_time": round(fl / statistics.median(cpu_s) / 1e9 / peak_cpu, 4)
        if peak_cpu
        else None,
        "n_params": int(sum(math.prod(v.shape) for v in model.trainable_variables)),
        "train_gflop_per_step": round(fl / 1e9, 2),
        "achieved_gflops": round(fl / med / 1e9, 2),
        "matmul_peak_gflops": peak,
        "mfu": round(fl / med / 1e9 / peak, 4) if peak else None,
        "mfu_same_dtype_peak": round(fl / med / 1e9 / peak_same, 4) if peak_same else None,
        "traces_total": step.experimental_get_tracing_count(),
        "traces_after_warmup": step.experimental_get_tracing_count() - traces_at_warm,
        "loss_traces_total": traces["calls"],
        "loss_traces_after_warmup": traces["calls"] - loss_traces_at_warm,
        "loss_first": round(losses[0], 5),
        "loss_last": round(losses[-1], 5),
        "loadavg": [round(x, 2) for x in os.getloadavg()],
    }
    if profile is not None:
        res["profile"] = profile
    return res


# --------------------------------------------------------------------------- profiling


def profile_steps(step, batches, n: int, spec: dict) -> dict:
    """Trace `n` steps with tf.profiler into spec["profile_dir"]; summarise the top ops."""
    import tensorflow as tf

    logdir = spec["profile_dir"]
    os.makedirs(logdir, exist_ok=True)
    before = set(glob.glob(os.path.join(logdir, "**", "*.xplane.pb"), recursive=True))
    tf.profiler.experimental.start(logdir)
    t0 = time.perf_counter()
    for i in range(n):
        float(step(batches[i % 2])["loss"].numpy())
    wall = time.perf_counter() - t0
    tf.profiler.experimental.stop()
    new = sorted(set(glob.glob(os.path.join(logdir, "**", "*.xplane.pb"), recursive=True)) - before)
    summary = summarize_xplane(new[-1]) if new else {}
    summary.update({"steps": n, "wall_s": round(wall, 3), "trace": new[-1] if new else None})
    return summary


def _scope_of(name: str) -> str:
    """Top-level model part of a TF op name ("…/image_encoder/vit_backbone/…" → image_encoder)."""
    parts = [p for p in name.split("/") if p]
    keys = (
        "image_encoder",
        "text_encoder",
        "image_projection",
        "text_projection",
        "image_observer",
        "text_observer",
        "image_observation_projection",
        "text_observation_projection",
        "pathology_queries",
        "correlation_decoder",
        "teacher_image_encoder",
        "image_local_projection",
        "text_local_projection",
        "token_cross_attention",
        "prototypes",
    )
    # ViTImageEncoder.encode_patches (the CCE student pass) calls the backbone's
    # sublayers directly, so its ops carry no image_encoder scope.
    masked = ("vit_encoder", "vit_patching_and_embedding", "patch_embedding")
    for p in parts:
        base = re.sub(r"_\d+$", "", p.split(":")[0])  # Keras/TF uniquify names: image_encoder_1
        if base in keys:
            return base
        if base in masked:
            return "cce_masked_image_encoder"
    if not parts:
        return "other"
    if parts[0].startswith("cond") or any(
        p.lower().startswith(("adamw", "adam", "loss_scale_optimizer")) for p in parts
    ):
        return "optimizer"
    # Trainer._apply's all-replica finite check over every gradient (outside the fused
    # forward/backward function).
    if re.match(r"(All|IsFinite|SelectV2|Fill|LogicalAnd|Cast)(_\d+)?$", parts[0]):
        return "nan_guard"
    return "other"


def summarize_xplane(path: str, top: int = 25) -> dict:
    """Self-time by op type and by model part from a tf.profiler .xplane.pb (host CPU ops).

    Only TF op events (names "scope/op:OpType") are counted; an XLA cluster shows up as
    one op (XlaLaunch / _XlaRun), so profile with XLA off to see inside the model.
    """
    from tensorflow.tsl.profiler.protobuf import xplane_pb2

    space = xplane_pb2.XSpace()
    with open(path, "rb") as f:
        space.ParseFromString(f.read())
    by_type: dict[str, float] = {}
    by_scope: dict[str, float] = {}
    by_scope_grad: dict[str, float] = {}
    by_op: dict[str, float] = {}
    total = 0.0
    for plane in space.planes:
        if not plane.name.startswith("/host:CPU"):
            continue
        meta = {k: v.name for k, v in plane.event_metadata.items()}
        for line in plane.lines:
            events = sorted(
                (
                    (e.offset_ps, e.offset_ps + e.duration_ps, meta.get(e.metadata_id, ""))
                    for e in line.events
                ),
                key=lambda x: (x[0], -x[1]),
            )
            # Self time: subtract time covered by nested events on the same line.
            stack: list[list] = []
            selfs: list[tuple[str, float]] = []
            for start, end, name in events:
                while stack and stack[-1][1] <= start:
                    done = stack.pop()
                    selfs.append((done[2], done[3]))
                if stack:
                    stack[-1][3] -= min(end, stack[-1][1]) - start
                stack.append([start, end, name, end - start])
            selfs += [(s[2], s[3]) for s in stack]
            for name, dur in selfs:
                if ":" not in name or "::" in name or name.startswith(("$", "EagerExecute")):
                    continue
                op_name, _, op_type = name.rpartition(":")
                if not op_type or " " in op_type:
                    continue
                ms = dur / 1e9
                total += ms
                by_type[op_type] = by_type.get(op_type, 0.0) + ms
                scope = _scope_of(op_name)
                by_scope[scope] = by_scope.get(scope, 0.0) + ms
                if "gradient_tape" in op_name or "gradients" in op_name.lower():
                    by_scope_grad[scope] = by_scope_grad.get(scope, 0.0) + ms
                by_op[name] = by_op.get(name, 0.0) + ms

    def ranked(d, k=top):
        return [
            {"name": n, "ms": round(v, 2), "share": round(v / total, 4) if total else None}
            for n, v in sorted(d.items(), key=lambda x: -x[1])[:k]
        ]

    return {
        "op_self_ms_total": round(total, 2),
        "top_op_types": ranked(by_type),
        "by_model_part": ranked(by_scope, 40),
        "backward_by_model_part": ranked(by_scope_grad, 40),
        "top_ops": ranked(by_op, 15),
    }


# --------------------------------------------------------------------------- matmul peak


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

    out = {"n": n, "reps": reps, "threads": threads, "device": _default_device()}
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


def _default_device() -> str:
    import tensorflow as tf

    gpus = tf.config.list_logical_devices("GPU")
    return gpus[0].name if gpus else tf.config.list_logical_devices("CPU")[0].name


# --------------------------------------------------------------------------- subprocesses


def _run_worker(kind: str, payload: dict, timeout: float) -> dict:
    """Run `benchmark.py _worker` in a fresh Python; parse its RESULT line."""
    cmd = [sys.executable, os.path.abspath(__file__), "_worker", kind, json.dumps(payload)]
    t0 = time.time()
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=REPO)
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
        res = run_train_worker(spec)
    elif kind == "peak":
        res = matmul_peak(int(spec["n"]), int(spec["reps"]), int(spec.get("threads") or 0))
    else:
        raise SystemExit(f"unknown worker kind {kind!r}")
    print(RESULT_PREFIX + json.dumps(res), flush=True)
    return 0


# --------------------------------------------------------------------------- train


def _csv(value: str) -> list[str]:
    return [v.strip() for v in str(value).split(",") if v.strip()]


def train_specs(args) -> list[dict]:
    """The configuration matrix, smallest batches first (for the OOM batch sweep)."""
    specs = []
    for config in _csv(args.configs):
        warm_default, steps_default = DEFAULT_STEPS.get(config, (2, 5))
        for objective in _csv(args.objectives):
            for xla in _csv(args.xla):
                for precision in _csv(args.precision):
                    for replicas in (int(r) for r in _csv(args.replicas)):
                        for batch in sorted(int(b) for b in _csv(args.batch)):
                            if batch % replicas:
                                raise SystemExit(f"batch {batch} not divisible by {replicas}")
                            specs.append(
                                {
                                    "config": config,
                                    "objective": objective,
                                    "xla": {"on": True, "off": False}[xla],
                                    "precision": precision,
                                    "replicas": replicas,
                                    "global_batch": batch,
                                    "warmup": args.warmup or warm_default,
                                    "steps": args.steps or steps_default,
                                    "threads": args.threads,
                                    "seed": args.seed,
                                }
                            )
    return specs


def _key(r: dict) -> tuple:
    return (r["config"], r["xla"], r["precision"], r["replicas"], r["global_batch"])


def _ratio(a: dict, b: dict, key: str):
    if a.get(key) and b.get(key):
        return round(a[key] / b[key], 3)
    return None


def summarize_train(results: list[dict]) -> dict:
    """PLACE/ConVIRT step-time ratios, reference comparison, retracing, largest batch."""
    ok = [r for r in results if "error" not in r]
    out: dict = {"place_over_convirt_step_time": [], "vs_reference": [], "retraces": {}}
    by = {(_key(r), r["objective"]): r for r in ok}
    for (k, obj), r in sorted(by.items(), key=lambda x: str(x[0])):
        if obj != "place" or (k, "convirt") not in by:
            continue
        c = by[(k, "convirt")]
        out["place_over_convirt_step_time"].append(
            {
                "config": k[0],
                "xla": k[1],
                "precision": k[2],
                "replicas": k[3],
                "global_batch": k[4],
                "ratio": round(r["median_step_s"] / c["median_step_s"], 3),
                "cpu_time_ratio": _ratio(r, c, "cpu_s_per_step_median"),
                "flop_ratio": round(r["train_gflop_per_step"] / c["train_gflop_per_step"], 3),
            }
        )
    for r in ok:
        ref = REFERENCE.get(r["config"])
        if (
            ref
            and r["objective"] == "convirt"
            and r["precision"] == "fp32"
            and r["replicas"] == 1
            and r["global_batch"] == 16
        ):
            out["vs_reference"].append(
                {
                    "config": r["config"],
                    "xla": r["xla"],
                    "ours_s_per_step": r["median_step_s"],
                    "ours_images_per_s": r["images_per_s"],
                    "ours_cpu_s_per_step": r.get("cpu_s_per_step_median"),
                    "ours_cpu_util": r.get("cpu_util_median"),
                    **{f"{k}_s_per_step": v for k, v in ref.items()},
                    "pytorch_images_per_s": round(16 / ref["pytorch_eager"], 3),
                    "speed_vs_pytorch": round(ref["pytorch_eager"] / r["median_step_s"], 3),
                    "reference_source": REFERENCE["source"],
                }
            )
    out["retraces"] = {
        "max_traces_after_warmup": max((r["traces_after_warmup"] for r in ok), default=None),
        "max_loss_traces_after_warmup": max(
            (r["loss_traces_after_warmup"] for r in ok), default=None
        ),
    }
    fits: dict = {}
    for r in ok:
        k = (r["config"], r["objective"], r["xla"], r["precision"], r["replicas"])
        fits[str(k)] = max(fits.get(str(k), 0), r["global_batch"])
    out["largest_batch_measured"] = fits
    out["failed"] = [
        {k: r.get(k) for k in ("config", "objective", "xla", "precision", "replicas", "error")}
        for r in results
        if "error" in r
    ]
    return out


def cmd_train(args) -> dict:
    t0 = time.time()
    specs = train_specs(args)
    if args.dry_run:
        for s in specs:
            print("would run:", json.dumps(s))
        return {"dry_run": True, "specs": specs}
    doc = _header("train", {k: v for k, v in vars(args).items() if k != "func"})
    doc["reference"] = REFERENCE
    if args.peak_gflops:
        doc["matmul_peak"] = {"given_gflops": args.peak_gflops}
        peak, by_precision, peak_cpu = args.peak_gflops, {}, None
    else:
        doc["matmul_peak"] = _run_worker(
            "peak", {"n": args.peak_n, "reps": args.peak_reps, "threads": args.threads}, 900
        )
        peak = doc["matmul_peak"].get("fp32_xla_gflops_median")
        peak_cpu = doc["matmul_peak"].get("fp32_xla_gflop_per_cpu_s")
        by_precision = {
            "fp32": peak,
            "bf16": doc["matmul_peak"].get("bf16_xla_gflops_median"),
            "fp16": doc["matmul_peak"].get("fp16_xla_gflops_median"),
        }
    doc["mfu_denominator"] = (
        "mfu: fp32 XLA n x n matmul GFLOP/s (median) on the same device; "
        "mfu_same_dtype_peak: the step precision's own XLA matmul peak; mfu_cpu_time: "
        "GFLOP per process CPU-second of the step over that of the fp32 XLA matmul"
    )
    doc["results"] = []
    failed_sweeps: set = set()
    for s in specs:
        sweep_key = (s["config"], s["objective"], s["xla"], s["precision"], s["replicas"])
        if sweep_key in failed_sweeps:
            continue  # a smaller batch already failed (e.g. out of memory)
        s = dict(s, peak_gflops=peak, peak_by_precision=by_precision, peak_per_cpu_s=peak_cpu)
        print(f"[train] {json.dumps({k: s[k] for k in s if not k.startswith('peak')})}", flush=True)
        res = _run_worker("train", s, args.timeout)
        if "error" in res:
            failed_sweeps.add(sweep_key)
            res = {**{k: s[k] for k in s}, **res}
            print(f"[train]   FAILED: {res['error']}", flush=True)
        else:
            print(
                f"[train]   {res['median_step_s']} s/step, {res['images_per_s']} img/s, "
                f"mfu {res['mfu']}, traces after warm-up {res['traces_after_warmup']}",
                flush=True,
            )
        doc["results"].append(res)
        doc["summary"] = summarize_train(doc["results"])
        write_json(_finish(doc, t0), args.out_dir, args.name or "train")  # after each run
    doc["summary"] = summarize_train(doc["results"])
    path = write_json(_finish(doc, t0), args.out_dir, args.name or "train")
    print(f"[train] wrote {path}")
    return doc


# --------------------------------------------------------------------------- profile


def cmd_profile(args) -> dict:
    if args.summarize_only:
        path = os.path.join(args.out_dir, f"{args.name or 'profile'}.json")
        with open(path) as f:
            doc = json.load(f)
        for r in doc["results"]:
            trace = (r.get("profile") or {}).get("trace")
            if trace and os.path.exists(trace):
                keep = {k: r["profile"][k] for k in ("steps", "wall_s", "trace")}
                r["profile"] = {**summarize_xplane(trace), **keep}
        write_json(doc, args.out_dir, args.name or "profile")
        print(f"[profile] re-summarised {path}")
        return doc
    t0 = time.time()
    doc = _header("profile", {k: v for k, v in vars(args).items() if k != "func"})
    doc["results"] = []
    logroot = os.path.join(args.out_dir, "profile")
    for objective in _csv(args.objectives):
        for xla in _csv(args.xla):
            spec = {
                "config": args.config,
                "objective": objective,
                "xla": xla == "on",
                "precision": "fp32",
                "replicas": 1,
                "global_batch": int(args.batch),
                "warmup": 2,
                "steps": 3,
                "threads": args.threads,
                "seed": args.seed,
                "profile_dir": os.path.join(logroot, f"{args.config}_{objective}_xla{xla}"),
                "profile_steps": args.profile_steps,
            }
            print(f"[profile] {args.config} {objective} xla={xla}", flush=True)
            doc["results"].append(_run_worker("train", spec, args.timeout))
    path = write_json(_finish(doc, t0), args.out_dir, args.name or "profile")
    print(f"[profile] wrote {path}; traces under {logroot} (view with TensorBoard)")
    return doc


# --------------------------------------------------------------------------- input


def _latest_train_results(out_dir: str, image_size: int) -> list[dict]:
    rows = []
    for path in sorted(glob.glob(os.path.join(out_dir, "train*.json")), key=os.path.getmtime):
        try:
            with open(path) as f:
                doc = json.load(f)
        except (OSError, ValueError):
            continue
        for r in doc.get("results", []):
            if "error" not in r and r.get("image_size") == image_size:
                rows.append(dict(r, file=os.path.basename(path)))
    # Latest file wins for a repeated configuration.
    latest = {(_key(r), r["objective"]): r for r in rows}
    return list(latest.values())


def cmd_input(args) -> dict:
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    t0 = time.time()
    doc = _header("input", {k: v for k, v in vars(args).items() if k != "func"})
    from place_tf.data import synthetic

    corpus = args.corpus_dir or os.path.join(
        REPO, "data", "bench", f"synth{args.image_size}_{args.images}"
    )
    t_gen = time.time()
    synthetic.ensure_corpus(corpus, args.images, image_size=args.image_size, num_shards=4)
    gen_s = time.time() - t_gen
    import tensorflow as tf

    from place_tf.data import pipeline
    from place_tf.data import tokenizer as tok

    if args.threads:
        tf.config.threading.set_intra_op_parallelism_threads(args.threads)
    tokenizer = tok.ReportTokenizer(
        tok.load_vocabulary(os.path.join(corpus, "vocab.txt")), max_length=args.max_length
    )
    ds = pipeline.make_dataset(
        corpus,
        "train",
        tokenizer,
        batch_size=args.batch,
        image_size=args.image_size,
        training=True,
        augment=not args.no_augment,
        seed=args.seed,
        repeat=True,
    )
    it = iter(ds)
    for _ in range(args.warmup):
        next(it)
    times = []
    t_all = time.perf_counter()
    for _ in range(args.batches):
        t1 = time.perf_counter()
        b = next(it)
        times.append(time.perf_counter() - t1)
    wall = time.perf_counter() - t_all
    assert b["image"].shape == (args.batch, args.image_size, args.image_size, 1)
    ips = args.batch * args.batches / wall
    res = {
        "image_size": args.image_size,
        "batch": args.batch,
        "augment": not args.no_augment,
        "corpus_images": args.images,
        "corpus_dir": os.path.relpath(corpus, REPO) if corpus.startswith(REPO) else corpus,
        "corpus_generate_s": round(gen_s, 1),
        "warmup_batches": args.warmup,
        "batches": args.batches,
        "batch_s": [round(t, 4) for t in times],
        "median_batch_s": round(statistics.median(times), 4),
        "images_per_s": round(ips, 2),
        "peak_rss_mb": peak_rss_mb(),
        "skipped_records": ds.skip_counter.as_dict() if hasattr(ds, "skip_counter") else None,
    }
    ratios = []
    for r in _latest_train_results(args.out_dir, args.image_size):
        ratios.append(
            {
                **{k: r[k] for k in ("config", "objective", "xla", "precision", "replicas")},
                "global_batch": r["global_batch"],
                "train_images_per_s": r["images_per_s"],
                "input_over_train": round(ips / r["images_per_s"], 2),
                "file": r["file"],
            }
        )
    res["train_ratios"] = ratios
    res["note"] = (
        "input measured alone on all cores; in training it shares them with the step "
        "(tf.data runs in its own threads)"
    )
    doc.update(res)
    path = write_json(_finish(doc, t0), args.out_dir, args.name or "input")
    print(f"[input] {ips:.1f} images/s; wrote {path}")
    return doc


# --------------------------------------------------------------------------- serve


def cmd_serve(args) -> dict:
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    os.environ.setdefault("KERAS_BACKEND", "tensorflow")
    t0 = time.time()
    doc = _header("serve", {k: v for k, v in vars(args).items() if k != "func"})
    import keras
    import tensorflow as tf
    import tensorflow_text  # noqa: F401  (the SavedModel's tokenizer ops)

    from place_tf import export, objectives
    from place_tf.data import synthetic
    from place_tf.data import tokenizer as tok
    from place_tf.models import factory

    if args.threads:
        tf.config.threading.set_intra_op_parallelism_threads(args.threads)
    keras.utils.set_random_seed(args.seed)
    mc = model_config(args.config)
    words = [f"w{i}" for i in range(max(0, min(mc.vocab_size, 200) - len(tok.SPECIAL_TOKENS)))]
    tokenizer = tok.ReportTokenizer(list(tok.SPECIAL_TOKENS) + words, max_length=mc.max_length)
    model = factory.create_model(mc, objectives.objective_config("place"), build=False)
    px = args.image_px or mc.image_size
    pngs = [synthetic.encode_png(synthetic.render_example(i, 0, px)[0]) for i in range(max(8, 32))]
    with tempfile.TemporaryDirectory() as tmp:
        t_exp = time.time()
        out = export.export_saved_model(model, tokenizer, os.path.join(tmp, "1"), mc.image_size)
        export_s = time.time() - t_exp
        size = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(out) for f in fs)
        loaded = tf.saved_model.load(out)
        fn = loaded.signatures["serving_default"]
        by_batch = []
        for b in (int(x) for x in _csv(args.batch_sizes)):
            images = tf.constant([pngs[i % len(pngs)] for i in range(b)])
            for _ in range(args.warmup):
                fn(images=images)["image_embedding"].numpy()
            lat = []
            for _ in range(args.reps):
                t1 = time.perf_counter()
                o = fn(images=images)
                o["image_embedding"].numpy()
                lat.append(time.perf_counter() - t1)
            lat.sort()
            med = statistics.median(lat)
            by_batch.append(
                {
                    "batch": b,
                    "reps": args.reps,
                    "latency_ms_median": round(med * 1e3, 2),
                    "latency_ms_p90": round(lat[min(len(lat) - 1, int(0.9 * len(lat)))] * 1e3, 2),
                    "latency_ms_min": round(lat[0] * 1e3, 2),
                    "latency_ms_max": round(lat[-1] * 1e3, 2),
                    "images_per_s": round(b / med, 2),
                }
            )
            print(f"[serve] batch {b}: {by_batch[-1]}", flush=True)
    doc.update(
        {
            "config": args.config,
            "signature": "serving_default (PNG bytes -> decode, resize, encode_image)",
            "image_px": px,
            "export_s": round(export_s, 1),
            "savedmodel_mb": round(size / 2**20, 2),
            "by_batch": by_batch,
            "peak_rss_mb": peak_rss_mb(),
        }
    )
    path = write_json(_finish(doc, t0), args.out_dir, args.name or "serve")
    print(f"[serve] wrote {path}")
    return doc


# --------------------------------------------------------------------------- all / CLI


def _subcommand(argv: list[str]) -> int:
    return subprocess.run([sys.executable, os.path.abspath(__file__), *argv], cwd=REPO).returncode


def cmd_all(args) -> dict:
    """train, then input (which reads train's rate), then serve; each in its own process."""
    common = ["--out_dir", args.out_dir] + (["--quick"] if args.quick else [])
    if args.threads:
        common += ["--threads", str(args.threads)]
    if args.quick:
        train = ["train", "--configs", "tiny", "--objectives", "convirt,place"]
    else:
        # ≈ 13 min on 2 idle CPU cores: the key comparisons only (README "Performance");
        # the full matrix is `train --xla on,off --precision fp32,bf16 --replicas 1,2`.
        train = ["train", "--configs", "quickstart,full", "--objectives", "convirt,place"]
    rcs = {
        "train": _subcommand(train + common),
        "input": _subcommand(["input"] + common),
        "serve": _subcommand(["serve"] + common),
    }
    print(f"[all] exit codes {rcs}")
    return {"exit_codes": rcs}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)

    def common(sp):
        sp.add_argument("--out_dir", default=DEFAULT_OUT, help="where <name>.json is written")
        sp.add_argument("--name", default="", help="JSON file name (default: the subcommand)")
        sp.add_argument("--quick", action="store_true", help="tiny sizes, 2 steps (tests)")
        sp.add_argument(
            "--threads", type=int, default=0, help="TF intra-op threads (0: TF default)"
        )
        sp.add_argument("--seed", type=int, default=0)

    t = sub.add_parser("train", help="trainer step throughput, MFU, retracing")
    common(t)
    t.add_argument("--configs", default="quickstart,full", help="tiny,quickstart,small,full")
    t.add_argument("--objectives", default="convirt,place")
    t.add_argument("--xla", default="on", help="on,off")
    t.add_argument("--precision", default="fp32", help="fp32,bf16 (fp16: mixed_float16)")
    t.add_argument("--replicas", default="1", help="1,2 (2 logical CPU devices)")
    t.add_argument("--batch", default="16", help="GLOBAL batch(es); a list sweeps, stops at OOM")
    t.add_argument("--warmup", type=int, default=0, help="0: per-config default")
    t.add_argument("--steps", type=int, default=0, help="0: per-config default")
    t.add_argument("--timeout", type=float, default=3600, help="seconds per configuration")
    t.add_argument("--peak_gflops", type=float, default=0, help="skip the matmul peak run")
    t.add_argument("--peak_n", type=int, default=2048)
    t.add_argument("--peak_reps", type=int, default=10)
    t.add_argument("--dry_run", action="store_true", help="print the configurations only")
    t.set_defaults(func=cmd_train)

    i = sub.add_parser("input", help="make_dataset images/s alone")
    common(i)
    i.add_argument("--corpus_dir", default="", help="default: data/bench/synth<px>_<n>")
    i.add_argument("--images", type=int, default=256)
    i.add_argument("--image_size", type=int, default=224)
    i.add_argument("--max_length", type=int, default=112)
    i.add_argument("--batch", type=int, default=16)
    i.add_argument("--warmup", type=int, default=5)
    i.add_argument("--batches", type=int, default=40)
    i.add_argument("--no_augment", action="store_true")
    i.set_defaults(func=cmd_input)

    s = sub.add_parser("serve", help="SavedModel serving_default latency by batch size")
    common(s)
    s.add_argument("--config", default="quickstart", help="tiny | quickstart | small | full")
    s.add_argument("--batch_sizes", default="1,8,32")
    s.add_argument("--image_px", type=int, default=0, help="request PNG size (0: model size)")
    s.add_argument("--warmup", type=int, default=3)
    s.add_argument("--reps", type=int, default=20)
    s.set_defaults(func=cmd_serve)

    pr = sub.add_parser("profile", help="tf.profiler trace + top-op summary")
    common(pr)
    pr.add_argument("--config", default="quickstart")
    pr.add_argument("--objectives", default="convirt,place")
    pr.add_argument("--xla", default="off", help="off shows TF ops; on shows XLA clusters")
    pr.add_argument("--batch", type=int, default=16)
    pr.add_argument("--profile_steps", type=int, default=3)
    pr.add_argument("--timeout", type=float, default=1800)
    pr.add_argument(
        "--summarize_only", action="store_true", help="re-read the traces of <name>.json"
    )
    pr.set_defaults(func=cmd_profile)

    a = sub.add_parser("all", help="input + train + serve (≲ 15 min on 2 CPU cores)")
    common(a)
    a.set_defaults(func=cmd_all)
    return p


def apply_quick(args) -> None:
    """--quick: tiny model, 2 timed steps, small corpus (for tests and smoke runs)."""
    if not args.quick:
        return
    if args.command == "train":
        if args.configs == "quickstart,full":
            args.configs = "tiny"
        args.warmup = args.warmup or 1
        args.steps = args.steps or 2
        args.peak_n, args.peak_reps = min(args.peak_n, 512), min(args.peak_reps, 3)
        args.timeout = min(args.timeout, 600)
    elif args.command == "input":
        args.images = min(args.images, 24)
        args.image_size = 64 if args.image_size == 224 else args.image_size
        args.max_length = min(args.max_length, 32)
        args.batch = min(args.batch, 4)
        args.warmup = min(args.warmup, 1)
        args.batches = min(args.batches, 3)
    elif args.command == "serve":
        if args.config == "quickstart":
            args.config = "tiny"
        args.batch_sizes = "1,4"
        args.warmup, args.reps = 1, 3
    elif args.command == "profile":
        if args.config == "quickstart":
            args.config = "tiny"
        args.profile_steps = 1


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "_worker":
        return worker_main(argv[1], argv[2])
    args = build_parser().parse_args(argv)
    apply_quick(args)
    res = args.func(args)
    # A configuration that ran out of memory (a batch sweep's end) is not a failure.
    failed = any((res or {}).get("exit_codes", {}).values()) or any(
        "error" in r and not r.get("oom") for r in (res or {}).get("results", [])
    )
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
