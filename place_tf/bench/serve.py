"""The `serve` benchmark: latency of the exported SavedModel's serving_default signature
(PNG bytes in) by request batch size."""

from __future__ import annotations

import os
import statistics
import tempfile
import time

from place_tf.bench.machine import peak_rss_mb
from place_tf.bench.results import csv_list, finish, header, write_json
from place_tf.bench.train_worker import model_config


def cmd_serve(args) -> dict:
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    os.environ.setdefault("KERAS_BACKEND", "tensorflow")
    t0 = time.time()
    doc = header("serve", {k: v for k, v in vars(args).items() if k != "func"})
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
        for b in (int(x) for x in csv_list(args.batch_sizes)):
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
    path = write_json(finish(doc, t0), args.out_dir, args.name or "serve")
    print(f"[serve] wrote {path}")
    return doc
