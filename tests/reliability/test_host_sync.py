"""The training loop reads device values (losses, counters) back to the host only at log
boundaries, not after every step, and several steps per tf.function call
(--steps_per_call) train as one step per call does."""

from __future__ import annotations

import math
import os

import numpy as np
import pytest
import reliability_util as U

from place_tf.training import logger
from place_tf.training.loop import Trainer


class CountingLogger(logger.StepLogger):
    """The loop's one seam for host reads of losses and counters, counted."""

    fetched_at: list[int] = []

    def fetch(self, logs, state):
        CountingLogger.fetched_at.append(int(state.global_step.numpy()))
        return super().fetch(logs, state)


def _train(tiny_corpus, model_dir, **overrides):
    CountingLogger.fetched_at = []
    cfg = U.tiny_configs(tiny_corpus, model_dir, **overrides)
    trainer = Trainer(cfg, logger_factory=CountingLogger)
    summary = trainer.run()
    return summary, trainer, list(CountingLogger.fetched_at)


@pytest.mark.slow
def test_one_device_strategy_trains_as_the_default_strategy(tiny_corpus, tmp_path, global_tf_state):
    """OneDeviceStrategy (what `default` becomes on a GPU host, for its device prefetch)
    runs the same steps as TF's default strategy: here both on the CPU."""
    settings = dict(max_steps=3, log_every=1, learning_rate=1e-3)
    base, t_base, _ = _train(tiny_corpus, str(tmp_path / "default"), **settings)
    one, t_one, reads = _train(
        tiny_corpus, str(tmp_path / "one"), strategy="one_device", **settings
    )
    assert reads == [1, 2, 3] and one["replicas"] == 1 and one["steps"] == 3
    for a, b in zip(t_base.model.weights, t_one.model.weights, strict=True):
        np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=1e-5, atol=1e-6, err_msg=a.path)


@pytest.mark.slow
def test_host_reads_only_every_log_every_steps_and_steps_per_call_trains_alike(
    tiny_corpus, tmp_path, global_tf_state
):
    settings = dict(max_steps=7, log_every=3, checkpoint_every=2, learning_rate=1e-3)
    one, t1, reads1 = _train(tiny_corpus, str(tmp_path / "one"), **settings)
    # 7 steps, log_every=3: reads after steps 3, 6 and the last one (ceil(7/3) = 3).
    assert reads1 == [3, 6, 7]
    assert len(reads1) == math.ceil(7 / 3)
    assert one["steps"] == 7 and np.isfinite(one["final_losses"]["loss"])

    three, t3, reads3 = _train(tiny_corpus, str(tmp_path / "three"), steps_per_call=3, **settings)
    # Calls end at steps 3, 6, 7 (the last call runs the one remaining step).
    assert reads3 == [3, 6, 7] and three["steps"] == 7
    # Checkpoints at the calls that cross a multiple of checkpoint_every, and the end.
    ckpts = sorted(
        int(f.split("-")[1].split(".")[0])
        for f in os.listdir(tmp_path / "three" / "checkpoints")
        if f.startswith("ckpt-") and f.endswith(".index")
    )
    assert ckpts == [3, 6, 7]
    # Same batches, same updates: the weights agree with one step per call.
    for a, b in zip(t1.model.weights, t3.model.weights, strict=True):
        np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=1e-5, atol=1e-6, err_msg=a.path)
    assert one["final_losses"]["loss"] == pytest.approx(three["final_losses"]["loss"], 1e-5)
