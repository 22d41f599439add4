"""Epoch-based objective schedules reach the model through the training step: MGCA's
prototypes get no update during the first `freeze_prototypes_epochs` epochs
(mgca_module.py's on_after_backward) and train afterwards."""

from __future__ import annotations

import numpy as np
import pytest
import reliability_util as U

from place_tf.training.loop import Trainer


@pytest.mark.slow
def test_mgca_prototypes_frozen_in_the_first_epoch_only(tiny_corpus, tmp_path, global_tf_state):
    cfg = U.tiny_configs(
        tiny_corpus,
        str(tmp_path / "run"),
        objective="mgca",
        max_steps=4,
        steps_per_epoch=2,
        freeze_prototypes_epochs=1,
        learning_rate=1e-2,
        warmup_steps=0,
    )
    seen = []

    def on_step(trainer, step):
        seen.append((step, np.array(trainer.model.prototype_layer.prototypes.numpy())))

    Trainer(cfg, on_step=on_step).run()
    steps = [s for s, _ in seen]
    assert steps == [1, 2, 3, 4]
    # The model uses the prototypes L2-normalised (MGCA renormalises its prototype layer
    # every step), so AdamW's decoupled weight decay, which shrinks every row by the same
    # factor, does not move them: compare directions.
    protos = [p / np.linalg.norm(p, axis=1, keepdims=True) for _, p in seen]
    # Steps 1 and 2 are epoch 0: the prototypes keep their directions.
    np.testing.assert_allclose(protos[0], protos[1], rtol=0, atol=1e-6)
    # From step 3 (epoch 1) on they are trained.
    assert np.abs(protos[2] - protos[1]).max() > 1e-4
    assert np.abs(protos[3] - protos[2]).max() > 1e-4
