"""The step logger: the loop's one reader of device values (losses, counters), its
TensorBoard scalars and console lines, plus the end-of-run attention-map images.

The loop calls `fetch` only every `log_every` steps (and at the last step): reading a
tensor back to the host waits for the device to finish the step, so reading every step
would serialise host and accelerator. Report text and ids are never logged.
"""

from __future__ import annotations

import time

from absl import logging

# The terms shown on the console (TensorBoard gets every logged value).
SHOWN = ("loss", "ita", "pcma", "cce", "cta", "cpa")


class StepLogger:
    """TensorBoard scalars every `log_every` steps; a live bar on a terminal, else (CI,
    TFX, compare) one log line per `log_every` steps; console output on the chief only."""

    def __init__(self, writer, total_steps: int, global_batch: int, start_step: int, chief: bool):
        import sys

        import keras

        self.writer, self.total_steps, self.global_batch = writer, total_steps, global_batch
        self.chief = chief
        self.interactive = sys.stdout.isatty()
        self.progbar = keras.utils.Progbar(total_steps, stateful_metrics=None, unit_name="step")
        self._last_time, self._last_step = time.time(), start_step
        self._shown: list = []

    def fetch(self, logs: dict, state) -> dict:
        """Host values of a step's logs and of the state's counters (a device sync)."""
        out = {k: float(v.numpy()) for k, v in logs.items()}
        out["bad_steps"] = int(state.bad_steps.numpy())
        out["overflow_steps"] = int(state.overflow_steps.numpy())
        out["learning_rate"] = _learning_rate(state.optimizer)
        return out

    def write(self, step: int, values: dict) -> None:
        """Scalars of `values` (from `fetch`) at `step`, with the throughput since the
        previous write."""
        import tensorflow as tf

        now = time.time()
        ips = (step - self._last_step) * self.global_batch / max(now - self._last_time, 1e-9)
        self._last_time, self._last_step = now, step
        with self.writer.as_default(step=step):
            for k, v in values.items():
                tf.summary.scalar(f"train/{k}", v)
            tf.summary.scalar("train/images_per_second", ips)
        self._shown = [(k, v) for k, v in values.items() if k in SHOWN]
        if self.chief and not self.interactive:
            shown = {k: round(v, 4) for k, v in self._shown}
            logging.info("step %d/%d %s %.1f images/s", step, self.total_steps, shown, ips)

    def tick(self, step: int) -> None:
        """Advance the terminal's bar (the values shown are the last fetched ones)."""
        if self.chief and self.interactive:
            self.progbar.update(step, self._shown)


def _learning_rate(optimizer) -> float:
    import keras

    lr = optimizer.inner_optimizer.learning_rate
    return float(lr.numpy()) if hasattr(lr, "numpy") else float(keras.ops.convert_to_numpy(lr))


def write_attention_images(writer, model, data_cfg, tokenizer, step, num_images: int = 4):
    """Pathology-query attention maps over a few held-out X-rays (images only): the
    corpus's validate split, or --eval_files when given."""
    import numpy as np
    import tensorflow as tf

    from place_tf.data import pipeline
    from place_tf.training import inputs

    try:
        ds = pipeline.make_eval_dataset(
            inputs.eval_source(data_cfg),
            "validate",
            tokenizer,
            batch_size=num_images,
            image_size=data_cfg.image_size,
        )
        batch = next(iter(ds))
    except (StopIteration, ValueError, FileNotFoundError):
        return
    out = model.encode_image(batch["image"], training=False)
    maps = out["attention_maps"].numpy()  # [B, K, h, w]
    imgs = (batch["image"].numpy() + 1.0) / 2.0
    b, k, h, w = maps.shape
    maps = maps / np.maximum(maps.max(axis=(2, 3), keepdims=True), 1e-9)
    grid = maps.transpose(0, 2, 1, 3).reshape(b, h, k * w, 1)
    with writer.as_default(step=step):
        tf.summary.image("val/xray", imgs, max_outputs=num_images)
        tf.summary.image("val/query_attention", grid, max_outputs=num_images)
