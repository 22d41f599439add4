"""`--quick`: each benchmark at tiny sizes and 2 timed steps (tests and smoke runs)."""

from __future__ import annotations


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
