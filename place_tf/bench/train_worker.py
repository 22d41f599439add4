"""One training-step configuration, measured in its own process: training's own set-up,
train state and step (place_tf/training), fed in-memory random batches of contract (a)
so the input cost is excluded."""

from __future__ import annotations

import math
import os
import statistics
import time

from place_tf.bench.machine import default_device, peak_rss_mb


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
        return [default_device()]


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
    t = _time_steps(step, batches, bad_steps, traces, warmup, steps)
    times, cpu, cpu_s, losses, warm = t["times"], t["cpu"], t["cpu_s"], t["losses"], t["warm"]
    profile = None
    if spec.get("profile_dir"):
        from place_tf.bench.profile import profile_steps

        profile = profile_steps(step, batches, int(spec.get("profile_steps") or 3), spec)
    med = statistics.median(times)
    gb = int(spec["global_batch"])
    fl = flops.train_flops_per_step(cfgs.model, cfgs.objective, gb)
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
        **_utilisation(spec, fl, med, statistics.median(cpu_s), model),
        "traces_total": step.experimental_get_tracing_count(),
        "traces_after_warmup": step.experimental_get_tracing_count() - t["traces_at_warm"],
        "loss_traces_total": traces["calls"],
        "loss_traces_after_warmup": traces["calls"] - t["loss_traces_at_warm"],
        "loss_first": round(losses[0], 5),
        "loss_last": round(losses[-1], 5),
        "loadavg": [round(x, 2) for x in os.getloadavg()],
    }
    if profile is not None:
        res["profile"] = profile
    return res


def _time_steps(step, batches, bad_steps, traces, warmup: int, steps: int) -> dict:
    """Wall and process-CPU seconds of `warmup` + `steps` steps, losses, trace counts."""
    if warmup < 1:
        raise ValueError("warmup must be >= 1 (the first step traces and compiles)")
    out: dict = {"times": [], "cpu": [], "cpu_s": [], "losses": [], "warm": []}
    out["traces_at_warm"] = out["loss_traces_at_warm"] = 0
    for i in range(warmup + steps):
        if i == warmup:
            out["traces_at_warm"] = step.experimental_get_tracing_count()
            out["loss_traces_at_warm"] = traces["calls"]
        t0, c0 = time.perf_counter(), time.process_time()
        logs = step(batches[i % 2])
        # A step's time needs it finished: read its values back (blocks until done; the
        # training loop itself reads them only every log_every steps).
        logs_np = {k: float(v.numpy()) for k, v in logs.items()}
        int(bad_steps.numpy())
        dt = time.perf_counter() - t0
        if i < warmup:
            out["warm"].append(dt)
        else:
            out["times"].append(dt)
            out["cpu_s"].append(time.process_time() - c0)
            out["cpu"].append(out["cpu_s"][-1] / dt)
        out["losses"].append(logs_np["loss"])
    return out


def _utilisation(spec: dict, fl: float, med: float, cpu_s_med: float, model) -> dict:
    """FLOP rates and model FLOP utilisation (MFU) against the measured matmul peaks."""
    peak = spec.get("peak_gflops")
    # bf16/fp16 steps are also compared with the same dtype's matmul peak (XLA).
    peak_same = (spec.get("peak_by_precision") or {}).get(spec["precision"]) or peak
    peak_cpu = spec.get("peak_per_cpu_s")  # matmul GFLOP per process CPU-second
    return {
        # Process CPU-seconds per step: far less sensitive than wall time to other
        # processes sharing the cores (what remains is cache/SMT interference).
        "cpu_s_per_step_median": round(cpu_s_med, 3),
        "gflop_per_cpu_s": round(fl / cpu_s_med / 1e9, 2),
        "mfu_cpu_time": round(fl / cpu_s_med / 1e9 / peak_cpu, 4) if peak_cpu else None,
        "n_params": int(sum(math.prod(v.shape) for v in model.trainable_variables)),
        "train_gflop_per_step": round(fl / 1e9, 2),
        "achieved_gflops": round(fl / med / 1e9, 2),
        "matmul_peak_gflops": peak,
        "mfu": round(fl / med / 1e9 / peak, 4) if peak else None,
        "mfu_same_dtype_peak": round(fl / med / 1e9 / peak_same, 4) if peak_same else None,
    }
