"""Strategy and all-reduce choice (NCCL between GPUs, never on CPU) and device prefetch
of training batches: the GPU branches, checked on CPU."""

from __future__ import annotations

import subprocess
import sys
import textwrap

from place_tf import distribute


def test_all_reduce_choice_from_device_list():
    assert distribute.all_reduce_choice(["CPU"]) == "RING"
    assert distribute.all_reduce_choice(["CPU", "CPU"]) == "RING"
    assert distribute.all_reduce_choice(["CPU", "GPU", "GPU"]) == "NCCL"
    assert distribute.all_reduce_choice(["CPU", "gpu"]) == "NCCL"
    assert distribute.all_reduce_choice([]) == "RING"


def test_one_replica_runs_on_the_first_gpu_else_the_cpu():
    assert distribute.single_device([]) == ""
    gpus = ["/device:GPU:0", "/device:GPU:1"]
    assert distribute.single_device(gpus) == "/device:GPU:0"


# In a fresh process: the CPU must be split into logical devices before TF initialises.
_PLACEMENT = textwrap.dedent(
    """
    import tensorflow as tf
    from place_tf import distribute
    from place_tf.training import inputs

    strategy = distribute.make_strategy("mirrored", num_cpu_devices=2)
    ops = strategy.extended._cross_device_ops  # what the strategy reduces with
    print("ops", type(ops).__name__)

    def fn(ctx):
        bs = ctx.get_per_replica_batch_size(4)
        return tf.data.Dataset.range(100).batch(bs).map(lambda x: {"x": x})

    batch = next(inputs.distributed_iterator(strategy, fn))
    for v in strategy.experimental_local_results(batch["x"]):
        print("device", v.device, v.numpy().tolist())
    """
)


def test_mirrored_cpu_replicas_reduce_without_nccl_and_get_batches_on_their_devices():
    out = subprocess.run(
        [sys.executable, "-c", _PLACEMENT], capture_output=True, text=True, timeout=300
    )
    assert out.returncode == 0, out.stderr[-3000:]
    lines = out.stdout.splitlines()
    assert "ops ReductionToOneDevice" in lines
    devices = [ln.split()[1] for ln in lines if ln.startswith("device")]
    assert [d.rsplit(":", 2)[-2:] for d in devices] == [["CPU", "0"], ["CPU", "1"]]
    # Each replica got its own half of the global batch of 4.
    got = [ln.split(" ", 2)[2] for ln in lines if ln.startswith("device")]
    assert got == ["[0, 1]", "[2, 3]"]
