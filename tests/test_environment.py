"""The main job's environment: the locked stack imports and Keras is 3.x on TensorFlow.
The TFX runtime is checked in test_environment_tfx.py (it needs glibc >= 2.39)."""

import sys

import pytest


def test_stack_versions():
    import keras
    import keras_hub
    import tensorflow as tf
    import tensorflow_text  # noqa: F401  (registers the WordPiece ops)

    assert tf.__version__.startswith("2.21."), tf.__version__
    assert keras.__version__.startswith("3."), keras.__version__
    assert keras.backend.backend() == "tensorflow"
    assert keras_hub.__version__ == "0.32.0"


@pytest.mark.skipif(
    sys.prefix.startswith("/opt/place-tf/"), reason="tools/run is the host's launcher"
)
def test_tools_run_sends_only_tfx_commands_to_the_tfx_environment(tmp_path):
    """Split kind (glibc < 2.39): the main job runs in the host venv; TFX commands - the
    tfx CLI, a pipelines/ file or module, --tfx - go to the root filesystem, and a
    non-root user is told why they cannot (here it is not built, so nothing is entered)."""
    import os
    import subprocess

    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    venv = tmp_path / "venv"
    (venv / "bin").mkdir(parents=True)
    (venv / ".place-tf-complete").touch()
    for name in ("python", "tfx"):
        script = venv / "bin" / name
        script.write_text(f'#!/bin/sh\necho "host {name} $*"\n')
        script.chmod(0o755)
    os.chmod(tmp_path, 0o755)
    env = dict(
        os.environ,
        PLACE_ENV="split",
        PLACE_VENV=str(venv),
        PLACE_ROOTFS=str(tmp_path / "no-rootfs"),
        PLACE_ROOTFS_VENV="/opt/place-tf/venv-x",
    )
    # As root the missing root filesystem would be built: check as an unprivileged user.
    drop = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"]
    drop += ["--inh-caps=+dac_read_search", "--ambient-caps=+dac_read_search"]
    prefix = drop if os.geteuid() == 0 else []
    run = os.path.join(repo, "tools", "run")

    def call(*cmd):
        return subprocess.run([*prefix, run, *cmd], env=env, capture_output=True, text=True)

    main = call("python", "-m", "place_tf.train", "--helpfull")
    assert (main.returncode, main.stdout) == (0, "host python -m place_tf.train --helpfull\n")
    for cmd in (
        ("tfx", "run", "create", "--engine=local"),
        ("python", "pipelines/local_runner.py"),
        ("python", "-m", "pipelines.kubeflow_v2_runner"),
        ("--tfx", "python", "-m", "pytest"),
    ):
        r = call(*cmd)
        assert r.returncode == 125 and r.stdout == "", (cmd, r)
        assert "this is a TFX command: TFX 1.21 needs glibc >= 2.39" in r.stderr, r.stderr
