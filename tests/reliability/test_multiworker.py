"""Multi-worker fault tolerance (MultiWorkerMirroredStrategy, 2 workers on loopback): one
worker dies mid-run, the job is restarted (both workers, as a cluster manager does), and
training resumes from the chief's last checkpoint at its saved step on every worker.

The replacement worker starts without its scratch directory (a new machine): it must
restore the chief's checkpoint, not its own.
"""

import json
import os
import shutil

import pytest
import reliability_util as U

pytestmark = pytest.mark.slow

FLAGS = [
    "--strategy=multiworker",
    "--deterministic",
    "--objective=convirt",
    "--max_steps=4",
    "--checkpoint_every=2",
    "--log_every=1",
]
TIMEOUT = 1200


def cluster_env(index: int, ports, **extra) -> dict:
    cluster = {"worker": [f"localhost:{p}" for p in ports]}
    tf_config = {"cluster": cluster, "task": {"type": "worker", "index": index}}
    return U.child_env(TF_CONFIG=json.dumps(tf_config), **extra)


def test_worker_loss_then_job_restart_resumes_from_chief_checkpoint(tiny_corpus, tmp_path):
    model_dir = str(tmp_path / "run")
    ckpt_dir = os.path.join(model_dir, "checkpoints")
    cmd = U.train_command(tiny_corpus, model_dir, *FLAGS)
    logs = {n: str(tmp_path / f"{n}.log") for n in ("a0", "a1", "b0", "b1")}

    # First attempt: worker 1 pauses after step 3 (ckpt-2 saved by the chief) and dies.
    ports = U.free_ports(2)
    marker = str(tmp_path / "worker1.paused")
    chief = U.start(cmd, logs["a0"], cluster_env(0, ports))
    worker = U.start(
        cmd,
        logs["a1"],
        cluster_env(1, ports, PLACE_FAULT_PAUSE_AT_STEP=3, PLACE_FAULT_MARKER=marker),
    )
    try:
        U.wait_for_file(marker, worker, TIMEOUT)
        assert U.checkpoint_state(ckpt_dir) == ["ckpt-2"]
        worker.kill()
        assert U.wait(worker, 60) == -9
        # The chief cannot finish step 4 without its peer: its collectives fail (or it is
        # stopped by the cluster manager, as here after a grace period).
        try:
            chief_rc = U.wait(chief, 300)
        except Exception:
            chief_rc = chief.returncode
        assert chief_rc != 0
    finally:
        for p in (chief, worker):
            if p.poll() is None:
                p.kill()
                p.wait()
    assert U.checkpoint_state(ckpt_dir) == ["ckpt-2"]  # nothing after step 2 was saved
    shutil.rmtree(os.path.join(model_dir, "tmp_worker_1"), ignore_errors=True)

    # The job restarts: both workers, same command (new ports, as a rescheduled job).
    ports = U.free_ports(2)
    procs = [U.start(cmd, logs[f"b{i}"], cluster_env(i, ports)) for i in (0, 1)]
    try:
        rcs = [U.wait(p, TIMEOUT) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    assert rcs == [0, 0], [U.log_text(logs[n])[-2000:] for n in ("b0", "b1")]
    chief_ckpt2 = os.path.join(ckpt_dir, "ckpt-2")
    for n in ("b0", "b1"):
        assert U.grep_lines(logs[n], f"resumed from {chief_ckpt2} at step 2"), n
        assert U.grep_lines(logs[n], "replaying the input stream up to step 2"), n
    assert U.checkpoint_state(ckpt_dir) == ["ckpt-2", "ckpt-4"]
    final = U.read_checkpoint(os.path.join(ckpt_dir, "ckpt-4"))
    assert U.scalar(final, "global_step") == 4 and U.scalar(final, *U.ITERATIONS) == 4
    # Both workers hold the same weights at the end (they restored the same state).
    scratch = U.read_checkpoint(os.path.join(model_dir, "tmp_worker_1", "ckpt-4"))
    U.assert_same_arrays(U.model_weights(final), U.model_weights(scratch))
    summary = U.read_json(os.path.join(model_dir, "summary.json"))
    assert summary["resumed_from_step"] == 2 and summary["steps"] == 4
    assert summary["replicas"] == 2 and summary["global_batch"] == 16
