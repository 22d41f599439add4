"""What stops a training run early, and how: bad steps, vanished shards, signals."""

from __future__ import annotations

import signal


class NonFiniteLossError(RuntimeError):
    """Raised when too many steps produced NaN/Inf losses or gradients."""


def check_bad_steps(bad_steps: int, max_bad_steps: int, step: int, ckpt_dir: str) -> None:
    """NonFiniteLossError once more than `max_bad_steps` steps were skipped as non-finite."""
    if bad_steps > max_bad_steps:
        raise NonFiniteLossError(
            f"{bad_steps} training steps had a non-finite loss or gradient (limit "
            f"max_bad_steps={max_bad_steps}); stopping at step {step}. Lower the learning "
            f"rate or check the data; the last checkpoint is in {ckpt_dir}"
        )


def missing_inputs(files) -> list[str]:
    """The input files that no longer exist (checked when the input stream misbehaves)."""
    import tensorflow as tf

    return [f for f in files if not tf.io.gfile.exists(f)]


def raise_if_inputs_missing(files, ckpt_dir: str, cause: BaseException | None = None) -> None:
    """FileNotFoundError naming the training shards that disappeared during the run.

    The input pipeline skips unreadable shards as corrupt records (counted, pass after
    pass); the loop calls this when that count grows or the input stream fails, so a
    vanished shard becomes an error instead of silently less data.
    """
    gone = missing_inputs(files)
    if gone:
        shown = ", ".join(gone[:5]) + (f" and {len(gone) - 5} more" if len(gone) > 5 else "")
        raise FileNotFoundError(
            f"{len(gone)} training input shard(s) disappeared during the run: {shown}. "
            f"Restore them (or fix the corpus) and restart: training resumes from the last "
            f"checkpoint in {ckpt_dir}"
        ) from cause


class TerminationFlag:
    """SIGTERM/SIGINT set `signum`; the loop checkpoints after the current step and exits."""

    def __init__(self):
        self.signum = None
        self._old = {}

    def install(self):
        for s in (signal.SIGTERM, signal.SIGINT):
            try:
                self._old[s] = signal.signal(s, self._handle)
            except ValueError:  # not the main thread (e.g. inside a TFX executor thread)
                pass

    def _handle(self, signum, frame):
        self.signum = signum

    def restore(self):
        for s, h in self._old.items():
            signal.signal(s, h)
        self._old = {}
