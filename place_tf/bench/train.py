"""The `train` benchmark: the configuration matrix, one worker process per configuration
(smallest batch first; a sweep stops at its first failure, e.g. out of memory), and the
summary (PLACE/ConVIRT step-time ratios, reference comparison, retracing)."""

from __future__ import annotations

import json
import time

from place_tf.bench.results import DEFAULT_STEPS, REFERENCE, csv_list, finish, header, write_json
from place_tf.bench.workers import run_worker


def train_specs(args) -> list[dict]:
    """The configuration matrix, smallest batches first (for the OOM batch sweep)."""
    specs = []
    for config in csv_list(args.configs):
        warm_default, steps_default = DEFAULT_STEPS.get(config, (2, 5))
        for objective in csv_list(args.objectives):
            for xla in csv_list(args.xla):
                for precision in csv_list(args.precision):
                    for replicas in (int(r) for r in csv_list(args.replicas)):
                        for batch in sorted(int(b) for b in csv_list(args.batch)):
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


def result_key(r: dict) -> tuple:
    return (r["config"], r["xla"], r["precision"], r["replicas"], r["global_batch"])


def _ratio(a: dict, b: dict, key: str):
    if a.get(key) and b.get(key):
        return round(a[key] / b[key], 3)
    return None


def summarize_train(results: list[dict]) -> dict:
    """PLACE/ConVIRT step-time ratios, reference comparison, retracing, largest batch."""
    ok = [r for r in results if "error" not in r]
    out: dict = {"place_over_convirt_step_time": [], "vs_reference": [], "retraces": {}}
    by = {(result_key(r), r["objective"]): r for r in ok}
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
    doc = header("train", {k: v for k, v in vars(args).items() if k != "func"})
    doc["reference"] = REFERENCE
    if args.peak_gflops:
        doc["matmul_peak"] = {"given_gflops": args.peak_gflops}
        peak, by_precision, peak_cpu = args.peak_gflops, {}, None
    else:
        doc["matmul_peak"] = run_worker(
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
        res = run_worker("train", s, args.timeout)
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
        write_json(finish(doc, t0), args.out_dir, args.name or "train")  # after each run
    doc["summary"] = summarize_train(doc["results"])
    path = write_json(finish(doc, t0), args.out_dir, args.name or "train")
    print(f"[train] wrote {path}")
    return doc
