"""Shared helpers of the reliability tests: tiny training flags, subprocess training runs
with fault injection, checkpoint readers. Imported by the tests (tests/reliability is on
sys.path under pytest's default import mode)."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time

import numpy as np

from place_tf.config import TINY_MODEL_FIELDS

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
LAUNCHER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fault_launcher.py")

# The smallest PLACE model the code accepts (as /tmp/tiny.flags in the issue).
TINY_FLAGS = [f"--{k}={v}" for k, v in TINY_MODEL_FIELDS.items()] + ["--per_replica_batch=8"]
TINY_SETTINGS = {f[2:].split("=")[0]: f.split("=")[1] for f in TINY_FLAGS}
# Canaries: strings that exist only in the canary corpus's reports and ids. Punctuation
# makes each full string impossible as one WordPiece token (a learned vocabulary may hold
# its pieces), so finding a full canary in an output means the text itself leaked.
CANARY_REPORT = "zqx-marmoset-quokka-7731-canary"
CANARY_IDS = {
    "subject_id": "SUBJ-9f3c1a7e4b62d0",
    "study_id": "STUDY-5b2d8e6f0a17c3",
    "image_id": "IMG-7f3e9c2a41d8b5",
}
CORPUS_IMAGES = 64
CORPUS_IMAGE_SIZE = 32


def tiny_configs(corpus_dir: str, model_dir: str, objective: str = "convirt", **overrides):
    """place_tf.config.Configs of the tiny model (in-process runs)."""
    from place_tf import config as config_lib

    values = {k: int(v) for k, v in TINY_SETTINGS.items()}
    values.update(
        corpus_dir=corpus_dir,
        model_dir=model_dir,
        jit_compile=False,
        log_every=1,
        deterministic=True,
        augment=False,
    )
    values.update(overrides)
    return config_lib.Configs(**config_lib.from_flat(values, objective))


def child_env(**extra) -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = REPO + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    env["KERAS_BACKEND"] = "tensorflow"
    env.pop("TF_CONFIG", None)
    env.update({k: str(v) for k, v in extra.items()})
    return env


def train_command(corpus_dir: str, model_dir: str, *extra: str, launcher: bool = True):
    """argv of a tiny CLI training run (through the fault launcher, which is
    `python -m place_tf.train` plus the faults its environment asks for)."""
    head = [sys.executable, LAUNCHER] if launcher else [sys.executable, "-m", "place_tf.train"]
    return [
        *head,
        *TINY_FLAGS,
        f"--corpus_dir={corpus_dir}",
        f"--model_dir={model_dir}",
        "--noexport",
        "--noprobe",
        "--nojit_compile",
        *extra,
    ]


def start(cmd, log_path: str, env: dict) -> subprocess.Popen:
    log = open(log_path, "ab")  # noqa: SIM115 (closed by the child's exit; see wait)
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
    proc._log = log  # type: ignore[attr-defined]
    return proc


def wait(proc: subprocess.Popen, timeout: float) -> int:
    try:
        return proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        raise
    finally:
        proc._log.close()  # type: ignore[attr-defined]


def run(cmd, log_path: str, env: dict, timeout: float = 900) -> int:
    return wait(start(cmd, log_path, env), timeout)


def wait_for_file(path: str, proc: subprocess.Popen, timeout: float = 900) -> None:
    """Block until `path` exists; fail early (with the log) if the process ends first."""
    deadline = time.time() + timeout
    while not os.path.exists(path):
        if proc.poll() is not None:
            raise AssertionError(f"process ended (rc={proc.returncode}) before {path} appeared")
        if time.time() > deadline:
            proc.kill()
            raise AssertionError(f"{path} did not appear within {timeout}s")
        time.sleep(0.2)


def kill_at_pause(cmd, log_path: str, env: dict, pause_step: int, sig: int, timeout=900):
    """Run `cmd` with the launcher pausing after step `pause_step`; send `sig`; return rc."""
    marker = log_path + f".paused-{pause_step}"
    env = dict(env, PLACE_FAULT_PAUSE_AT_STEP=str(pause_step), PLACE_FAULT_MARKER=marker)
    proc = start(cmd, log_path, env)
    try:
        wait_for_file(marker, proc, timeout)
        proc.send_signal(sig)
        return wait(proc, timeout)
    finally:
        if proc.poll() is None:
            proc.kill()


def log_text(path: str) -> str:
    with open(path, errors="replace") as f:
        return f.read()


def read_json(path: str) -> dict:
    with open(path) as f:
        return json.load(f)


def checkpoint_state(ckpt_dir: str) -> list[str]:
    """Checkpoint prefixes listed in the `checkpoint` state file (basenames)."""
    import tensorflow as tf

    state = tf.train.get_checkpoint_state(ckpt_dir)
    if state is None:
        return []
    return [os.path.basename(p) for p in state.all_model_checkpoint_paths]


def read_checkpoint(prefix: str) -> dict[str, np.ndarray]:
    """{key: value} of every variable in a checkpoint (iterator state excluded)."""
    import tensorflow as tf

    reader = tf.train.load_checkpoint(prefix)
    out = {}
    for key in reader.get_variable_to_shape_map():
        if key.startswith("_CHECKPOINTABLE") or "ITERATOR_STATE" in key:
            continue
        out[key] = np.asarray(reader.get_tensor(key))
    return out


def model_weights(ckpt: dict) -> dict[str, np.ndarray]:
    return {k: v for k, v in ckpt.items() if k.startswith("model.")}


def optimizer_state(ckpt: dict) -> dict[str, np.ndarray]:
    return {k: v for k, v in ckpt.items() if k.startswith("optimizer.")}


# Checkpoint names of the optimizers' variables: keyed by their role (see
# place_tf/training/checkpoints.optimizer_renames), not by Keras' auto-numbered optimizer names.
ITERATIONS = ("inner_optimizer..iteration",)
DYNAMIC_SCALE = ("optimizer..optimizer..dynamic_scale",)


def find_key(ckpt: dict, *names: str) -> str:
    """The checkpoint key of a variable named by any of `names` ("inner_optimizer..iteration",
    "global_step", ...), whatever numeric suffix Keras gave the objects' names in the
    writing process ("adam_w_1")."""
    import re

    hits = set()
    for name in names:
        parts = [re.escape(p) + r"(?:_\d+)?" for p in name.split("..")]
        pattern = re.compile(r"(?:^|\.)" + r"\.\.".join(parts) + r"/")
        hits |= {k for k in ckpt if pattern.search(k)}
    assert len(hits) == 1, f"{names}: {sorted(hits)}"
    return hits.pop()


def scalar(ckpt: dict, *names: str) -> int:
    """A counter (global_step, bad_steps, optimizer iterations, ...) from a checkpoint."""
    return int(ckpt[find_key(ckpt, *names)])


def is_loss_scale_key(key: str) -> bool:
    """A variable of the LossScaleOptimizer itself (scale, its counters), not of AdamW."""
    import re

    return bool(re.match(r"optimizer\.\.optimizer\.\.", key))


def assert_same_arrays(a: dict, b: dict, atol: float = 0.0) -> None:
    assert sorted(a) == sorted(b), set(a) ^ set(b)
    for k in a:
        if atol:
            np.testing.assert_allclose(a[k], b[k], atol=atol, rtol=0, err_msg=k)
        else:
            np.testing.assert_array_equal(a[k], b[k], err_msg=k)


def free_ports(n: int) -> list[int]:
    socks = []
    for _ in range(n):
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        socks.append(s)
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


SIGKILL, SIGTERM = signal.SIGKILL, signal.SIGTERM


def tb_scalars(logdir: str, tag: str) -> dict[int, float]:
    """{step: value} of a TensorBoard scalar over every event file in `logdir`."""
    import glob

    import tensorflow as tf

    out = {}
    for path in sorted(glob.glob(os.path.join(logdir, "events.out.tfevents.*"))):
        for event in tf.compat.v1.train.summary_iterator(path):
            for v in event.summary.value:
                if v.tag == tag:
                    out[int(event.step)] = float(tf.make_ndarray(v.tensor))
    return out


def grep_lines(path: str, needle: str) -> list[str]:
    return [line for line in log_text(path).splitlines() if needle in line]


def png_bomb(width: int, height: int) -> bytes:
    """A valid all-black 8-bit grayscale PNG of width x height, compressed to ~0.1 % of its
    pixels (zlib streamed row by row: the pixels never exist in this process)."""
    import struct
    import zlib

    def chunk(tag: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data))

    comp = zlib.compressobj(9)
    row = bytes(width + 1)  # filter byte 0 + black pixels
    parts = [comp.compress(row) for _ in range(height)]
    parts.append(comp.flush())
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0))
        + chunk(b"IDAT", b"".join(parts))
        + chunk(b"IEND", b"")
    )


def run_python(code: str, timeout: float = 600, **env) -> dict:
    """Run `code` in a fresh Python; it must print one JSON line last. Returns it."""
    proc = subprocess.run(
        [sys.executable, "-c", code],
        cwd=REPO,
        env=child_env(**env),
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])
