"""PLACE-TF benchmark suite: train step, input pipeline, serving; JSON to results/bench/.

  tools/run python tools/benchmark.py train    # real trainer step, in-memory batches
  tools/run python tools/benchmark.py input    # make_dataset alone (SynthCXR, 224 px, augment)
  tools/run python tools/benchmark.py serve    # SavedModel serving_default latency by batch
  tools/run python tools/benchmark.py profile  # tf.profiler trace + top ops, PLACE vs ConVIRT
  tools/run python tools/benchmark.py all      # input + train + serve, ≲ 15 min on 2 CPU cores
  ... --quick                                  # tiny configs, 2 steps (tests, smoke runs)

`train` measures training's own step: each configuration runs in its own subprocess
(logical CPU devices must be set before TensorFlow initialises), builds the train state
and step with place_tf/training (setup.build_train_state, step.build_train_step) and
feeds it in-memory random batches of contract (a), so input cost is excluded. Per configuration
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
`RESULT {json}` line. The benchmarks themselves are the library place_tf/bench/.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys

from place_tf.bench.input import cmd_input
from place_tf.bench.profile import cmd_profile
from place_tf.bench.quick import apply_quick
from place_tf.bench.results import DEFAULT_OUT
from place_tf.bench.serve import cmd_serve
from place_tf.bench.train import cmd_train


def _subcommand(argv: list[str]) -> int:
    return subprocess.run([sys.executable, os.path.abspath(__file__), *argv]).returncode


def cmd_all(args) -> dict:
    """train, then input (which reads train's rate), then serve; each in its own process."""
    common = ["--out_dir", args.out_dir] + (["--quick"] if args.quick else [])
    if args.threads:
        common += ["--threads", str(args.threads)]
    if args.quick:
        train = ["train", "--configs", "tiny", "--objectives", "convirt,place"]
    else:
        # The key comparisons only (README "Performance");
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


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
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
