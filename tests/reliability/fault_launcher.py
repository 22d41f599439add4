"""`python -m place_tf.train`, with faults injected where the environment asks (tests only).

PLACE_FAULT_PAUSE_AT_STEP=k, PLACE_FAULT_MARKER=path: after training step k (the
optimizer's step counter), write `path` and wait (up to 10 min) for a signal, so a test can
SIGKILL / SIGTERM the trainer at a known step instead of racing it.
PLACE_FAULT_KILL_IN_SAVE=n: SIGKILL this process inside the save of checkpoint n, after
its data and index files are written and before the `checkpoint` state file names it (the
moment a crash would leave a complete-looking but unlisted checkpoint).
PLACE_FAULT_DELETE_AT_STEP=k, PLACE_FAULT_DELETE=path: delete `path` (a training shard)
right after training step k.
Without these variables it is exactly `python -m place_tf.train`.
"""

import os
import signal
import sys
import time

# Hooks run after every training step through the public `on_step` seam of
# place_tf.train.main: `hook(trainer, applied_steps)`.
_HOOKS: list = []


def _after_each_step(hook) -> None:
    _HOOKS.append(hook)


def _on_step(trainer, step: int) -> None:
    if not _HOOKS:
        return
    applied = int(trainer.state.optimizer.iterations.numpy())  # a host sync: tests only
    for hook in _HOOKS:
        hook(trainer, applied)


def _install_pause(pause_at: int, marker: str) -> None:
    def pause(tr, applied: int) -> None:
        if applied == pause_at:
            with open(marker + ".tmp", "w") as f:
                f.write(str(os.getpid()))
            os.replace(marker + ".tmp", marker)
            deadline = time.time() + 600
            while tr.termination.signum is None and time.time() < deadline:
                time.sleep(0.05)  # the trainer's SIGTERM handler sets the flag

    _after_each_step(pause)


def _install_delete(at_step: int, path: str) -> None:
    def delete(tr, applied: int) -> None:
        if applied == at_step and os.path.exists(path):
            os.remove(path)

    _after_each_step(delete)


def _install_kill_in_save(number: int) -> None:
    from tensorflow.python.checkpoint import checkpoint_management as cm

    original = cm.update_checkpoint_state_internal

    def update_state(*args, **kwargs):
        path = kwargs.get("model_checkpoint_path", args[1] if len(args) > 1 else "")
        if str(path).endswith(f"ckpt-{number}"):
            os.kill(os.getpid(), signal.SIGKILL)
        return original(*args, **kwargs)

    cm.update_checkpoint_state_internal = update_state


def main() -> int:
    import functools

    from absl import app

    from place_tf import train

    if os.environ.get("PLACE_FAULT_PAUSE_AT_STEP"):
        _install_pause(
            int(os.environ["PLACE_FAULT_PAUSE_AT_STEP"]), os.environ["PLACE_FAULT_MARKER"]
        )
    if os.environ.get("PLACE_FAULT_DELETE_AT_STEP"):
        _install_delete(
            int(os.environ["PLACE_FAULT_DELETE_AT_STEP"]), os.environ["PLACE_FAULT_DELETE"]
        )
    if os.environ.get("PLACE_FAULT_KILL_IN_SAVE"):
        _install_kill_in_save(int(os.environ["PLACE_FAULT_KILL_IN_SAVE"]))
    return app.run(functools.partial(train.main, on_step=_on_step))


if __name__ == "__main__":
    sys.exit(main())
