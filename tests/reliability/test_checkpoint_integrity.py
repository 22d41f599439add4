"""Checkpoint integrity: a damaged latest checkpoint (truncated, deleted index, flipped
bytes) is detected on restore and the previous good one is used; a kill in the middle of a
save never leaves a checkpoint that the `checkpoint` state file lists; --keep_checkpoints
bounds what stays on disk.

Why a partial checkpoint is never listed: TensorFlow writes a checkpoint's data and index
(into `ckpt-N_temp/` then merged into `ckpt-N.*`) and only then, through the
CheckpointManager's write callback, rewrites the `checkpoint` state file atomically
(temp file + rename). A crash before that leaves unlisted files; restore reads the list.
A crash of the machine (not the process) could still persist the state file before the
data: that is the damaged-latest case, handled by restore_latest_good.
"""

import os

import pytest
import reliability_util as U
import tensorflow as tf

from place_tf.training import checkpoints


def _corrupt(prefix: str, how: str) -> None:
    data = prefix + ".data-00000-of-00001"
    if how == "truncated_data":
        with open(data, "r+b") as f:
            f.truncate(os.path.getsize(data) // 2)
    elif how == "cut_to_16_bytes":  # also cuts the object graph: IndexError in TF's reader
        with open(data, "r+b") as f:
            f.truncate(16)
    elif how == "empty_data":
        open(data, "wb").close()
    elif how == "missing_index":
        os.remove(prefix + ".index")
    elif how == "flipped_bytes":  # same size, a tensor's bytes changed: CRC mismatch
        raw = bytearray(open(data, "rb").read())
        raw[len(raw) // 2] ^= 0xFF
        open(data, "wb").write(bytes(raw))
    else:
        raise ValueError(how)


DAMAGE = ["truncated_data", "cut_to_16_bytes", "empty_data", "missing_index", "flipped_bytes"]


def restore_as_the_trainer_does(manager, ckpt):
    return checkpoints.restore_newest_readable(ckpt, manager.checkpoints)


@pytest.mark.parametrize("how", DAMAGE)
def test_damaged_latest_checkpoint_falls_back_to_previous_good(tmp_path, how):
    big = tf.Variable(tf.zeros([4096]))  # large enough that the data file has a middle
    step = tf.Variable(0, dtype=tf.int64)
    ckpt = tf.train.Checkpoint(big=big, step=step)
    manager = tf.train.CheckpointManager(ckpt, str(tmp_path), max_to_keep=5)
    for n in (1, 2, 3):
        big.assign(tf.fill([4096], float(n)))
        step.assign(n)
        manager.save(checkpoint_number=n)
    _corrupt(os.path.join(str(tmp_path), "ckpt-3"), how)
    big.assign(tf.fill([4096], -1.0))
    step.assign(-1)
    fresh = tf.train.CheckpointManager(ckpt, str(tmp_path), max_to_keep=5)  # as on restart
    restored = restore_as_the_trainer_does(fresh, ckpt)
    assert restored == os.path.join(str(tmp_path), "ckpt-2")
    assert int(step.numpy()) == 2
    assert float(tf.reduce_min(big)) == float(tf.reduce_max(big)) == 2.0  # fully ckpt-2


def test_no_good_checkpoint_means_a_fresh_start(tmp_path):
    v = tf.Variable(7.0)
    ckpt = tf.train.Checkpoint(v=v)
    manager = tf.train.CheckpointManager(ckpt, str(tmp_path), max_to_keep=2)
    manager.save(checkpoint_number=1)
    _corrupt(os.path.join(str(tmp_path), "ckpt-1"), "missing_index")
    v.assign(3.0)
    assert restore_as_the_trainer_does(manager, ckpt) is None
    assert float(v.numpy()) == 3.0


@pytest.mark.slow
def test_kill_during_save_leaves_no_listed_partial_checkpoint(preemption_chain):
    c = preemption_chain
    assert c["P3_rc"] == -9  # killed inside the save of ckpt-4 ...
    assert "ckpt-4.index" in c["P3_files"]  # ... after its files were written,
    assert c["P3_state"] == ["ckpt-2", "ckpt-3"]  # but the state file never named it.
    assert not any(p.endswith("_temp") for p in c["P3_state"])


@pytest.mark.slow
def test_restart_skips_the_half_written_latest_checkpoint(preemption_chain):
    """The chain truncated ckpt-3 (the latest listed) before the last restart: it is
    reported, ckpt-2 is restored, and the run still ends bit-identical to the reference
    (asserted in test_preemption)."""
    c = preemption_chain
    log = c["logs"]["P4"]
    ckpt3 = os.path.join(c["ckpt_dir"], "ckpt-3")
    assert U.grep_lines(log, f"checkpoint {ckpt3} is unreadable or incomplete")
    assert U.grep_lines(log, "resumed from " + os.path.join(c["ckpt_dir"], "ckpt-2") + " at step 2")  # fmt: skip
    assert c["P4_rc"] == 0 and c["P4_summary"]["resumed_from_step"] == 2


@pytest.mark.slow
def test_keep_checkpoints_bounds_what_stays_on_disk(preemption_chain, reference_runs):
    """--keep_checkpoints=2 with a checkpoint every 2 of 6 steps: only ckpt-4 and ckpt-6
    remain, listed and on disk (also after the chain's damaged and unlisted ones)."""
    reference_runs["R1"].ensure_ok()
    for ckpt_dir in (
        os.path.join(reference_runs["R1"].model_dir, "checkpoints"),
        preemption_chain["ckpt_dir"],
    ):
        assert U.checkpoint_state(ckpt_dir) == ["ckpt-4", "ckpt-6"]
        files = sorted(f for f in os.listdir(ckpt_dir) if f != "checkpoint")
        assert files == [
            "ckpt-4.data-00000-of-00001",
            "ckpt-4.index",
            "ckpt-6.data-00000-of-00001",
            "ckpt-6.index",
        ]


def _checkpoint_keys():
    """Keys of the trainer's checkpoint layout for a small model with named layers (as
    PLACEModel's are) and the trainer's optimizer stack."""
    import keras

    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2, name="head")], name="m")
    opt = keras.optimizers.LossScaleOptimizer(keras.optimizers.AdamW())
    opt.build(model.trainable_variables)
    return sorted(checkpoints.make_checkpoint(model, opt)._trackable_children())


def test_checkpoint_keys_do_not_depend_on_what_the_process_built_before():
    first = _checkpoint_keys()
    second = _checkpoint_keys()  # same architecture, second of its kind in this process
    assert first == second
