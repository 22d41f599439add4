"""`python -m place_tf.evaluate <task> --model=<.keras or run dir> --data=<corpus dir>`.

Tasks: linear, finetune, zero_shot, retrieval, localization, segmentation, detection,
report_generation. Each writes `<output>` (JSON, default results/eval/<task>.json) and a
markdown table beside it (same name, .md), and prints the table.

  --fraction 0.01|0.1|1.0   label fraction (linear, finetune, segmentation, detection);
                            linear/finetune run all three when it is not given
  --seed N                  seed of subsets, heads and sampling
"""

from __future__ import annotations

import argparse
import inspect
import logging
import os
import sys
import time

TASKS = (
    "linear",
    "finetune",
    "zero_shot",
    "retrieval",
    "localization",
    "segmentation",
    "detection",
    "report_generation",
)
# Tasks implemented by sibling modules exposing evaluate(model, data_dir, **kw) -> dict.
EXTERNAL_TASKS = ("segmentation", "detection", "report_generation")
DEFAULT_FRACTIONS = (0.01, 0.1, 1.0)
RAW_PIXELS = "raw_pixels"  # --model value: the pixel baseline of `linear`


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m place_tf.evaluate", description=__doc__.split("\n\n")[0]
    )
    p.add_argument("task", choices=TASKS)
    p.add_argument(
        "--model",
        required=True,
        help=f".keras file or training run directory ({RAW_PIXELS!r}: linear on raw pixels)",
    )
    p.add_argument("--data", required=True, help="corpus directory (manifest.json + shards)")
    p.add_argument("--fraction", type=float, default=None, help="label fraction in (0, 1]")
    p.add_argument("--output", default="", help="JSON path (default results/eval/<task>.json)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch_size", type=int, default=0, help="0: the task's default")
    p.add_argument("--image_size", type=int, default=0, help="default: the model's image size")
    p.add_argument("--vocab_file", default="", help="default: the run's, else <data>/vocab.txt")
    p.add_argument("--split", default="test", help="split for zero_shot / retrieval")
    p.add_argument(
        "--feature", default="image_features", choices=("image_features", "image_embedding")
    )
    p.add_argument(
        "--epochs", type=int, default=0, help="head / fine-tuning epochs (0: task default)"
    )
    p.add_argument("--per_class", type=int, default=200, help="5x200-style images per class")
    p.add_argument(
        "--uncertain",
        default="zeros",
        choices=("zeros", "ones", "ignore"),
        help="CheXpert uncertain (-1) training labels of linear/finetune",
    )
    p.add_argument("--verbose", action="store_true")
    return p


def _check_fraction(f):
    if f is not None and not 0 < f <= 1:
        raise SystemExit(f"--fraction must be in (0, 1], got {f}")


def _call_external(task: str, model, tokenizer, args) -> tuple[dict, str | None]:
    import importlib

    try:
        mod = importlib.import_module(f"place_tf.evaluate.{task}")
    except ImportError as e:
        raise SystemExit(
            f"task {task!r} is not available: place_tf.evaluate.{task} ({e})"
        ) from None
    fn = getattr(mod, "evaluate", None)
    if fn is None:
        raise SystemExit(f"place_tf.evaluate.{task} has no evaluate(model, data_dir, **kw)")
    kw = {
        "tokenizer": tokenizer,
        "fraction": args.fraction,
        "seed": args.seed,
        "image_size": args.image_size or None,
        "batch_size": args.batch_size or None,
        "epochs": args.epochs or None,
        "split": args.split,
    }
    params = inspect.signature(fn).parameters
    if not any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        kw = {k: v for k, v in kw.items() if k in params}
    kw = {k: v for k, v in kw.items() if v is not None}
    result = fn(model, args.data, **kw)
    table = mod.format_table(result) if hasattr(mod, "format_table") else None
    return result, table


def _raw_pixel_task(args) -> tuple[dict, str]:
    """`linear --model=raw_pixels`: the quick linear probe on the pixels themselves."""
    from place_tf.evaluate import linear_probe

    if args.task != "linear":
        raise SystemExit(f"--model={RAW_PIXELS} is a baseline of the linear task only")
    size = args.image_size or 64
    r = linear_probe.raw_pixel_probe(args.data, size)
    table = (
        f"| feature | image px | macro AUROC | {' | '.join(r['labels'])} |\n"
        f"|---|---|---|{'---|' * len(r['labels'])}\n"
        f"| raw pixels | {size} | {r['macro_auroc']:.3f} | "
        + " | ".join(f"{r['per_label'].get(n, float('nan')):.3f}" for n in r["labels"])
        + " |"
    )
    return r, table


def run_task(args) -> tuple[dict, str | None]:
    """Load the model and tokenizer, run the task; (result dict, markdown table)."""
    from place_tf.evaluate import embeddings as emb_lib

    _check_fraction(args.fraction)
    if args.model == RAW_PIXELS:
        return _raw_pixel_task(args)
    model = emb_lib.load_model(args.model)
    tokenizer = emb_lib.load_tokenizer(model, args.model, args.data, args.vocab_file)
    image_size = args.image_size or None
    common = {"image_size": image_size, "batch_size": args.batch_size or 64}
    t = args.task
    if t in ("linear", "finetune"):
        from place_tf.evaluate import linear_probe as mod

        fractions = (args.fraction,) if args.fraction is not None else DEFAULT_FRACTIONS
        result = mod.run(
            model,
            args.data,
            tokenizer,
            fractions=fractions,
            finetune=(t == "finetune"),
            feature=args.feature,
            uncertain=args.uncertain,
            epochs=args.epochs or None,
            seed=args.seed,
            **common,
        )
    elif t == "zero_shot":
        from place_tf.evaluate import zero_shot as mod

        result = mod.run(
            model,
            args.data,
            tokenizer,
            split=args.split,
            per_class=args.per_class,
            seed=args.seed,
            **common,
        )
    elif t == "retrieval":
        from place_tf.evaluate import retrieval as mod

        result = mod.run(
            model,
            args.data,
            tokenizer,
            split=args.split,
            per_class=args.per_class,
            seed=args.seed,
            **common,
        )
    elif t == "localization":
        from place_tf.evaluate import localization as mod

        result = mod.run(model, args.data, tokenizer, **common)
    else:
        return _call_external(t, model, tokenizer, args)
    return result, mod.format_table(result)


def main(argv=None) -> int:
    """CLI entry; returns the process exit code (0 on success)."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING,
        format="%(levelname)s %(name)s: %(message)s",
    )
    from place_tf.evaluate import embeddings as emb_lib
    from place_tf.evaluate import task_data

    t0 = time.time()
    try:
        result, table = run_task(args)
    except task_data.NoReportTextError as e:  # a report task on a label-only corpus
        print(f"place_tf.evaluate {args.task}: error: {e}", file=sys.stderr)
        return 2
    result = dict(result)
    result.setdefault("task", args.task)
    result["model"] = os.path.abspath(args.model)
    result["data"] = os.path.abspath(args.data)
    result["seed"] = args.seed
    result["wall_seconds"] = round(time.time() - t0, 2)
    output = args.output or os.path.join("results", "eval", f"{args.task}.json")
    emb_lib.write_result(result, output, table)
    if table:
        print(table)
    print(f"\nwrote {output}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
