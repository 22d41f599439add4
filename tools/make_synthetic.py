"""Write a SynthCXR corpus: sharded TFRecords, manifest.json and vocab.txt.

    tools/run python tools/make_synthetic.py --out data/synth --num-images 2000 \
        [--image-size 224] [--seed 0] [--shards 4] [--workers N] [--vocab-size 1000]

Prints counts and throughput only (never report text).
"""

from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def main(argv: list[str] | None = None) -> int:
    from place_tf.data import synthetic

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--out", required=True, help="output corpus directory")
    p.add_argument("--num-images", type=int, required=True)
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--shards", type=int, default=4, help="shards per split (at most)")
    p.add_argument(
        "--workers", type=int, default=None, help="rendering processes (default: all CPUs)"
    )
    p.add_argument("--vocab-size", type=int, default=synthetic.DEFAULT_VOCAB_SIZE)
    args = p.parse_args(argv)

    start = time.perf_counter()
    try:
        m = synthetic.generate_corpus(
            args.out,
            args.num_images,
            image_size=args.image_size,
            seed=args.seed,
            num_shards=args.shards,
            workers=args.workers,
            vocab_size=args.vocab_size,
        )
    except ValueError as e:
        print(f"make_synthetic: error: {e}", file=sys.stderr)
        return 2
    wall = time.perf_counter() - start
    from place_tf.data import tokenizer

    vocab = tokenizer.load_vocabulary(os.path.join(args.out, m["generator"]["vocab_file"]))
    for split, info in m["splits"].items():
        print(f"{split:9s} {info['examples']:7d} examples in {len(info['shards'])} shard(s)")
    print(f"vocabulary {len(vocab)} tokens -> {os.path.join(args.out, 'vocab.txt')}")
    print(
        f"{args.num_images} images at {args.image_size} px in {wall:.1f} s "
        f"({args.num_images / wall:.0f} images/s, including TF start-up) -> {args.out}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
