"""tf.distribute strategy from a TrainConfig, and logical CPU devices for tests/benchmarks.

Strategies: "default" (one device: the first GPU through "one_device" when there is one,
else TF's default strategy), "one_device" (OneDeviceStrategy on the first GPU, else the
CPU), "mirrored" (all local GPUs, else the logical CPU devices), "multiworker" (MultiWorkerMirroredStrategy from TF_CONFIG), "tpu" (TPUStrategy
from a TPUClusterResolver; `PLACE_TPU` names the TPU, empty = local).

All-reduce: NCCL between GPUs (in one process and across workers); NCCL has no CPU
kernels, so CPU replicas use reduction to one device (one process) or RING collectives
(across workers). `all_reduce_choice` decides from the device list alone.
"""

from __future__ import annotations

import json
import os

from absl import logging


def configure_cpu_devices(num_devices: int) -> None:
    """Split the physical CPU into `num_devices` logical devices (before TF initialises).

    Raises a clear error when TF is already initialised with a different split.
    """
    import tensorflow as tf

    if num_devices <= 1:
        return
    cpu = tf.config.list_physical_devices("CPU")[0]
    try:
        tf.config.set_logical_device_configuration(
            cpu, [tf.config.LogicalDeviceConfiguration()] * num_devices
        )
    except RuntimeError as e:
        have = len(tf.config.list_logical_devices("CPU"))
        if have != num_devices:
            raise RuntimeError(
                f"cannot split the CPU into {num_devices} logical devices: TensorFlow is "
                f"already initialised with {have}; set num_cpu_devices before any TF op runs"
            ) from e


def all_reduce_choice(device_types) -> str:
    """ "NCCL" when there are GPUs to train on, else "RING" (CPU replicas)."""
    return "NCCL" if any(str(t).upper() == "GPU" for t in device_types) else "RING"


def single_device(gpu_names) -> str:
    """The device of a one-replica run: the first GPU, else the CPU ("")."""
    return gpu_names[0] if gpu_names else ""


def _local_device_types() -> list[str]:
    # Physical devices: listing them does not initialise the TF runtime, which
    # MultiWorkerMirroredStrategy must configure first.
    import tensorflow as tf

    return [d.device_type for d in tf.config.list_physical_devices()]


def make_strategy(strategy: str, num_cpu_devices: int = 0):
    import tensorflow as tf

    if num_cpu_devices > 1:
        configure_cpu_devices(num_cpu_devices)
    choice = all_reduce_choice(_local_device_types())
    if strategy == "default" and choice == "NCCL":
        strategy = "one_device"  # a GPU: see "one_device"
    if strategy == "default":
        return tf.distribute.get_strategy()
    if strategy == "one_device":
        # Unlike TF's default strategy, OneDeviceStrategy's distributed datasets prefetch
        # the next batches onto the device while a step runs (no host-to-GPU copy in it).
        device = single_device([d.name for d in tf.config.list_logical_devices("GPU")])
        return tf.distribute.OneDeviceStrategy(device or "/cpu:0")
    if strategy == "mirrored":
        if choice == "NCCL":
            gpus = [d.name for d in tf.config.list_logical_devices("GPU")]
            return tf.distribute.MirroredStrategy(
                gpus, cross_device_ops=tf.distribute.NcclAllReduce()
            )
        cpus = [d.name for d in tf.config.list_logical_devices("CPU")]
        return tf.distribute.MirroredStrategy(
            cpus, cross_device_ops=tf.distribute.ReductionToOneDevice()
        )
    if strategy == "multiworker":
        if "TF_CONFIG" not in os.environ:
            raise ValueError("strategy 'multiworker' needs the TF_CONFIG environment variable")
        cfg = json.loads(os.environ["TF_CONFIG"])
        logging.info(
            "MultiWorkerMirroredStrategy (%s all-reduce): task %s of cluster %s",
            choice,
            cfg.get("task"),
            {k: len(v) for k, v in cfg.get("cluster", {}).items()},
        )
        impl = tf.distribute.experimental.CommunicationImplementation
        return tf.distribute.MultiWorkerMirroredStrategy(
            communication_options=tf.distribute.experimental.CommunicationOptions(
                implementation=impl.NCCL if choice == "NCCL" else impl.RING
            )
        )
    if strategy == "tpu":
        resolver = tf.distribute.cluster_resolver.TPUClusterResolver(
            tpu=os.environ.get("PLACE_TPU", "")
        )
        tf.config.experimental_connect_to_cluster(resolver)
        tf.tpu.experimental.initialize_tpu_system(resolver)
        return tf.distribute.TPUStrategy(resolver)
    raise ValueError(
        f"unknown strategy {strategy!r}: use default, one_device, mirrored, multiworker or tpu"
    )


def is_chief(strategy) -> bool:
    """True on the worker that writes summaries, the final model and the export."""
    resolver = getattr(strategy, "cluster_resolver", None)
    if resolver is None or not getattr(resolver, "task_type", None):
        return True
    return resolver.task_type in ("chief", None) or (
        resolver.task_type == "worker" and resolver.task_id == 0
    )
