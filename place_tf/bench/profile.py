"""The `profile` benchmark: tf.profiler traces of a few training steps and their
summary (self time by op type and by model part) read from the .xplane.pb files."""

from __future__ import annotations

import glob
import json
import os
import re
import time

from place_tf.bench.results import csv_list, finish, header, write_json
from place_tf.bench.workers import run_worker


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
    # training.step's all-replica finite check over every gradient (outside the fused
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
    doc = header("profile", {k: v for k, v in vars(args).items() if k != "func"})
    doc["results"] = []
    logroot = os.path.join(args.out_dir, "profile")
    for objective in csv_list(args.objectives):
        for xla in csv_list(args.xla):
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
            doc["results"].append(run_worker("train", spec, args.timeout))
    path = write_json(finish(doc, t0), args.out_dir, args.name or "profile")
    print(f"[profile] wrote {path}; traces under {logroot} (view with TensorBoard)")
    return doc
