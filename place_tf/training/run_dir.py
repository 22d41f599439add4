"""The run directory: what a training run writes beside its checkpoints, and its readers.

<model_dir>/
  run_info.json   configs, library versions, git revision, corpus manifest digest, argv
  summary.json    the run's outcome (steps, throughput, losses, skips, exports, probe)
  model.keras     the final model (chief only)
  checkpoints/    see place_tf/training/checkpoints.py
  tensorboard/    scalars and validation attention maps (no report text)
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys

from place_tf import config as config_lib
from place_tf import fileio

CKPT_SUBDIR = "checkpoints"
SUMMARY_FILE = "summary.json"
RUN_INFO_FILE = "run_info.json"
MODEL_FILE = "model.keras"
TENSORBOARD_SUBDIR = "tensorboard"


def checkpoint_dir(model_dir: str) -> str:
    return os.path.join(model_dir, CKPT_SUBDIR)


def git_revision() -> str:
    """HEAD's commit of the checkout holding this package ("" outside one).

    `git` when it is installed, else read from .git directly (the training image or the
    chroot may have no git binary, and run_info must still name the code revision).
    """
    here = os.path.dirname(os.path.abspath(__file__))
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, timeout=10
        ).stdout.strip()
        if out:
            return out
    except (OSError, subprocess.SubprocessError):
        pass
    return read_git_head(here)


def _find_git_dir(start: str) -> tuple[str, str] | None:
    """(checkout root, its .git directory) of the checkout holding `start`."""
    d = start
    while not os.path.exists(os.path.join(d, ".git")):
        parent = os.path.dirname(d)
        if parent == d:
            return None
        d = parent
    git = os.path.join(d, ".git")
    if os.path.isfile(git):  # worktree / submodule: "gitdir: <path>"
        with open(git) as f:
            git = os.path.join(d, f.read().split(":", 1)[1].strip())
    return d, git


def read_git_head(start: str) -> str:
    """HEAD's commit read from the .git files of the checkout holding `start` ("" if none)."""
    try:
        found = _find_git_dir(start)
        if found is None:
            return ""
        git = found[1]
        with open(os.path.join(git, "HEAD")) as f:
            head = f.read().strip()
        if not head.startswith("ref:"):
            return head  # detached HEAD
        ref = head.split(":", 1)[1].strip()
        common = git
        if os.path.exists(os.path.join(git, "commondir")):
            with open(os.path.join(git, "commondir")) as f:
                common = os.path.join(git, f.read().strip())
        for base in (git, common):
            path = os.path.join(base, ref)
            if os.path.exists(path):
                with open(path) as f:
                    return f.read().strip()
        with open(os.path.join(common, "packed-refs")) as f:
            for line in f:
                parts = line.split()
                if len(parts) == 2 and parts[1] == ref:
                    return parts[0]
    except (OSError, IndexError):
        pass
    return ""


def write_run_info(model_dir: str, cfg, model_cfg, corpus: dict, replicas: int) -> str:
    """run_info.json: what reproduces (and re-loads) the run; `model_cfg` is the model as
    built (vocabulary size and length from the corpus)."""
    import keras
    import tensorflow as tf

    info = {
        "configs": json.loads(
            config_lib.dumps(
                data=cfg.data, model=model_cfg, objective=cfg.objective, train=cfg.train
            )
        ),
        "versions": {
            "python": platform.python_version(),
            "tensorflow": tf.__version__,
            "keras": keras.__version__,
        },
        "git_revision": git_revision(),
        "replicas": replicas,
        "data_manifest": {
            "schema_version": corpus.get("schema_version"),
            "source": corpus.get("source"),
            "splits": {k: v.get("examples") for k, v in corpus.get("splits", {}).items()},
            "shard_checksums": corpus.get("shard_checksums", {}),
        },
        "argv": sys.argv,
    }
    return fileio.write_json(os.path.join(model_dir, RUN_INFO_FILE), info)


def read_run_info(path: str) -> dict | None:
    """run_info.json of a run directory, or of the directory holding a .keras file; else None."""
    d = path if os.path.isdir(path) else os.path.dirname(os.path.abspath(path))
    p = os.path.join(d, RUN_INFO_FILE)
    if not os.path.exists(p):
        return None
    try:
        with open(p) as f:
            return json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"{p}: unreadable run info ({e})") from None


def write_summary(model_dir: str, summary: dict) -> str:
    return fileio.write_json(os.path.join(model_dir, SUMMARY_FILE), summary)


def read_summary(model_dir: str) -> dict | None:
    """summary.json of a finished run, or None when the run has not finished."""
    path = os.path.join(model_dir, SUMMARY_FILE)
    if not os.path.exists(path):
        return None
    with open(path) as f:
        return json.load(f)


def save_model(model_dir: str, model) -> str:
    path = os.path.join(model_dir, MODEL_FILE)
    model.save(path)
    return path
