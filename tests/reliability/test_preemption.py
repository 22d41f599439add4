"""Pre-emption: a trainer killed (SIGKILL) or asked to stop (SIGTERM) at a known step
resumes when the same command is run again, with its step counter, optimizer state,
learning-rate schedule and input position, and in --deterministic mode finishes with
weights bit-identical to an uninterrupted run's.

The chain of interrupted runs (conftest.preemption_chain) and the uninterrupted reference
(conftest.reference_runs) are shared with test_checkpoint_integrity/test_reproducibility.
The multi-worker variant is in test_multiworker.py.
"""

import os

import numpy as np
import pytest
import reliability_util as U
import tensorflow as tf

from place_tf.training import inputs
from place_tf.training.schedule import warmup_cosine

pytestmark = pytest.mark.slow

LR, WARMUP, STEPS = 1e-3, 2, 6  # as conftest.CHAIN_FLAGS


def final_checkpoint(model_dir):
    return U.read_checkpoint(os.path.join(model_dir, "checkpoints", f"ckpt-{STEPS}"))


def test_sigkill_then_restart_resumes_and_matches_uninterrupted(preemption_chain, reference_runs):
    c = preemption_chain
    assert c["P1_rc"] == -9  # SIGKILLed after step 3: no chance to save anything
    assert c["P1_state"] == ["ckpt-2"]
    # The restart resumed from the last checkpoint, not from scratch.
    assert U.grep_lines(c["logs"]["P2"], "resumed from " + os.path.join(c["ckpt_dir"], "ckpt-2") + " at step 2")  # fmt: skip
    assert U.grep_lines(c["logs"]["P2"], "replaying the input stream up to step 2")
    # ... and the interrupted-and-resumed run ends where an uninterrupted one does.
    assert c["P4_rc"] == 0, U.log_text(c["logs"]["P4"])[-3000:]
    assert c["P4_summary"]["resumed_from_step"] == 2 and c["P4_summary"]["steps"] == STEPS
    reference_runs["R1"].ensure_ok()
    ref, got = final_checkpoint(reference_runs["R1"].model_dir), final_checkpoint(c["model_dir"])
    assert U.scalar(got, "global_step") == STEPS
    assert U.scalar(got, *U.ITERATIONS) == STEPS  # optimizer.iterations continued
    # Bit-identical weights and optimizer moments (save_counter differs: more saves).
    U.assert_same_arrays(U.model_weights(ref), U.model_weights(got))
    U.assert_same_arrays(U.optimizer_state(ref), U.optimizer_state(got))
    assert len(U.model_weights(ref)) > 50  # the comparison covered every model variable


def test_sigterm_writes_a_checkpoint_at_the_current_step_and_exits_143(preemption_chain):
    c = preemption_chain
    assert c["P2_rc"] == 143  # 128 + SIGTERM
    assert c["P2_state"] == ["ckpt-2", "ckpt-3"]  # step 3 is not a checkpoint_every step
    ckpt3 = c["P2_ckpt3"]
    assert U.scalar(ckpt3, "global_step") == 3 and U.scalar(ckpt3, *U.ITERATIONS) == 3
    assert U.grep_lines(c["logs"]["P2"], "signal 15 received: checkpoint written at step 3")
    assert U.grep_lines(c["logs"]["P3"], "resumed from " + os.path.join(c["ckpt_dir"], "ckpt-3") + " at step 3")  # fmt: skip


def test_resumed_learning_rate_schedule_continues(preemption_chain, reference_runs):
    """The logged learning rate of the resumed steps is the schedule's value at the global
    step (not restarted at 0) and equals the uninterrupted run's."""
    reference_runs["R1"].ensure_ok()
    tag = "train/learning_rate"
    ref = U.tb_scalars(os.path.join(reference_runs["R1"].model_dir, "tensorboard"), tag)
    got = U.tb_scalars(os.path.join(preemption_chain["model_dir"], "tensorboard"), tag)
    schedule = warmup_cosine(LR, STEPS, WARMUP)
    expected = {s: float(schedule(s)) for s in range(1, STEPS + 1)}
    assert sorted(ref) == list(range(1, STEPS + 1))
    np.testing.assert_allclose([ref[s] for s in ref], [expected[s] for s in ref], rtol=1e-6)
    resumed = [3, 4, 5, 6]  # the last restart replayed steps 3..6 (from ckpt-2)
    assert set(resumed) <= set(got)
    assert [got[s] for s in resumed] == [ref[s] for s in resumed]
    assert got[3] > got[4] > got[5] > got[6] == 0.0  # cosine decay after the warm-up


def test_deterministic_replay_feeds_the_batches_an_uninterrupted_run_would(tiny_corpus, tmp_path):
    """The resumed input stream (inputs.dataset_fn with start_step) continues exactly where the
    uninterrupted stream is, also with several replicas per input pipeline."""
    from place_tf.data import pipeline
    from place_tf.data import tokenizer as tok

    cfg = U.tiny_configs(tiny_corpus, str(tmp_path), augment=True)
    tokenizer = tok.ReportTokenizer(
        tok.load_vocabulary(os.path.join(tiny_corpus, "vocab.txt")), max_length=16
    )
    # One input pipeline feeding 2 replicas: 2 per-replica batches of 4 per global step.
    ctx = tf.distribute.InputContext(
        num_input_pipelines=1, input_pipeline_id=0, num_replicas_in_sync=2
    )
    fresh_fn = inputs.dataset_fn(cfg, tokenizer, 8, 0, pipeline.SkipCounter())
    resumed_fn = inputs.dataset_fn(cfg, tokenizer, 8, 5, pipeline.SkipCounter())
    fresh = list(fresh_fn(ctx).take(16).as_numpy_iterator())
    resumed = list(resumed_fn(ctx).take(6).as_numpy_iterator())
    assert fresh[0]["image"].shape[0] == 4
    for a, b in zip(fresh[10:16], resumed, strict=True):  # step 5 = batches 10, 11
        for k in a:
            np.testing.assert_array_equal(a[k], b[k], err_msg=k)
    assert not np.array_equal(fresh[0]["image"], resumed[0]["image"])
