"""Reproducibility: two --deterministic runs of the same command give bit-identical
weights on CPU (checkpoint and model.keras), and run_info.json records what is needed to
repeat a run: flags/configs, library versions, the data manifest's checksums, the git
revision."""

import hashlib
import io
import json
import os
import shutil
import subprocess
import sys
import zipfile

import h5py
import keras
import numpy as np
import pytest
import reliability_util as U
import tensorflow as tf

pytestmark = pytest.mark.slow


def keras_weights(path: str) -> dict[str, np.ndarray]:
    """Every dataset of the weights file inside a .keras archive."""
    with zipfile.ZipFile(path) as z:
        data = z.read("model.weights.h5")
    out = {}
    with h5py.File(io.BytesIO(data), "r") as f:
        f.visititems(
            lambda name, obj: (
                out.__setitem__(name, obj[()]) if isinstance(obj, h5py.Dataset) else None
            )
        )
    return out


def test_deterministic_runs_are_bit_identical(reference_runs):
    r1, r2 = reference_runs["R1"], reference_runs["R2"]
    r1.ensure_ok()
    r2.ensure_ok()
    a = U.read_checkpoint(os.path.join(r1.model_dir, "checkpoints", "ckpt-6"))
    b = U.read_checkpoint(os.path.join(r2.model_dir, "checkpoints", "ckpt-6"))
    U.assert_same_arrays(a, b)  # every variable, counters and optimizer slots included
    ka = keras_weights(os.path.join(r1.model_dir, "model.keras"))
    kb = keras_weights(os.path.join(r2.model_dir, "model.keras"))
    assert len(ka) > 50
    U.assert_same_arrays(ka, kb)
    # Not trivially equal: training moved the weights away from the initialisation.
    first = U.read_checkpoint(os.path.join(r1.model_dir, "checkpoints", "ckpt-4"))
    assert any(not np.array_equal(first[k], a[k]) for k in U.model_weights(a))


def test_run_info_records_configs_versions_data_and_revision(reference_runs, tiny_corpus):
    r1 = reference_runs["R1"]
    r1.ensure_ok()
    info = U.read_json(os.path.join(r1.model_dir, "run_info.json"))
    cfg = info["configs"]
    assert cfg["train"]["deterministic"] is True and cfg["train"]["max_steps"] == 6
    assert cfg["train"]["learning_rate"] == 1e-3 and cfg["train"]["warmup_steps"] == 2
    assert cfg["model"]["image_size"] == 32 and cfg["model"]["vit_width"] == 32
    assert cfg["objective"]["name"] == "convirt"
    assert cfg["data"]["corpus_dir"] == tiny_corpus
    assert "--max_steps=6" in info["argv"] and "--objective=convirt" in info["argv"]
    assert info["versions"]["tensorflow"] == tf.__version__
    assert info["versions"]["keras"] == keras.__version__
    assert info["versions"]["python"] == ".".join(map(str, sys.version_info[:3]))
    # The data manifest's shard checksums, and they are the shards' real sha256.
    manifest = U.read_json(os.path.join(tiny_corpus, "manifest.json"))
    sums = info["data_manifest"]["shard_checksums"]
    assert sums == manifest["shard_checksums"] and len(sums) >= 3
    for name, digest in sums.items():
        with open(os.path.join(tiny_corpus, name), "rb") as f:
            assert digest == "sha256:" + hashlib.sha256(f.read()).hexdigest()
    assert info["data_manifest"]["splits"]["train"] == manifest["splits"]["train"]["examples"]
    # The git revision of the checkout (read from .git when there is no git binary).
    assert info["git_revision"] == expected_revision()
    json.dumps(info)  # plain JSON all the way


def expected_revision() -> str:
    if shutil.which("git"):
        return subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=U.REPO, capture_output=True, text=True
        ).stdout.strip()
    git = os.path.join(U.REPO, ".git")
    if not os.path.isdir(git):
        return ""
    head = open(os.path.join(git, "HEAD")).read().strip()
    if not head.startswith("ref:"):
        return head
    ref = head.split(":", 1)[1].strip()
    if os.path.exists(os.path.join(git, ref)):
        return open(os.path.join(git, ref)).read().strip()
    for line in open(os.path.join(git, "packed-refs")):
        if line.split()[1:] == [ref]:
            return line.split()[0]
    raise AssertionError(f"cannot resolve {ref}")
