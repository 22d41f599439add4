"""The `input` benchmark: make_dataset alone (SynthCXR, augmentation) in images/s, and its
ratio to the latest measured training rates."""

from __future__ import annotations

import glob
import json
import os
import statistics
import time

from place_tf.bench.machine import peak_rss_mb
from place_tf.bench.results import ROOT, finish, header, write_json
from place_tf.bench.train import result_key


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
    latest = {(result_key(r), r["objective"]): r for r in rows}
    return list(latest.values())


def cmd_input(args) -> dict:
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    t0 = time.time()
    doc = header("input", {k: v for k, v in vars(args).items() if k != "func"})
    from place_tf.data import synthetic

    corpus = args.corpus_dir or os.path.join(
        ROOT, "data", "bench", f"synth{args.image_size}_{args.images}"
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
        "corpus_dir": os.path.relpath(corpus, ROOT) if corpus.startswith(ROOT) else corpus,
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
    path = write_json(finish(doc, t0), args.out_dir, args.name or "input")
    print(f"[input] {ips:.1f} images/s; wrote {path}")
    return doc
