"""Command-line paths of the export (all multi-process, hence slow):
`python -m place_tf.export` from a .keras file, `saved_model_cli run` on its output (the
TF1 session loader TF Serving also uses), and tools/serving_check.py (passes on the export,
fails with a clear message and status on a broken or missing SavedModel)."""

import io
import json
import os
import subprocess
import sys

import keras
import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

from place_tf import export
from place_tf.config import tiny_model_config
from place_tf.models.place_model import PLACEModel
from place_tf.objectives import objective_config

pytestmark = pytest.mark.slow

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
S = 32
TINY = tiny_model_config(image_size=S)
VOCAB = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "no", "acute", "pleural", "effusion"]
ENV = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2", "PYTHONPATH": REPO}
# saved_model_cli does not import tensorflow_text (the tokenizer's ops): run its main with
# the ops registered first; arguments are exactly saved_model_cli's.
SAVED_MODEL_CLI = (
    "import sys, tensorflow_text; from tensorflow.python.tools.saved_model_cli import main; "
    "sys.argv[0] = 'saved_model_cli'; sys.exit(main())"
)


def run(args, **kw):
    return subprocess.run(args, capture_output=True, text=True, timeout=600, env=ENV, **kw)


def png_bytes(seed=0):
    img = np.random.default_rng(seed).integers(0, 256, (48, 40), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def cli_export(tmp_path_factory):
    """model.keras + vocab.txt → `python -m place_tf.export` → <base>/3."""
    d = tmp_path_factory.mktemp("cli")
    keras.utils.set_random_seed(1)
    model = PLACEModel(TINY, objective_config("place"))
    keras_path = export.export_keras(model, str(d / "model.keras"))
    (d / "vocab.txt").write_text("\n".join(VOCAB) + "\n")
    out = d / "serving" / "3"
    args = [sys.executable, "-m", "place_tf.export", f"--model={keras_path}"]
    args += [f"--vocab={d / 'vocab.txt'}", f"--output={out}"]
    proc = run(args)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return model, str(out), args, d


def test_cli_writes_a_version_and_refuses_to_overwrite(cli_export):
    _, out, args, d = cli_export
    assert sorted(os.listdir(out)) == ["assets", "fingerprint.pb", "saved_model.pb", "variables"]
    assert os.listdir(os.path.join(out, "assets")) == ["vocab.txt"]
    again = run(args)
    assert again.returncode == 1
    assert "place_tf.export: error: SavedModel version directory" in again.stderr
    assert "already exists" in again.stderr and "Traceback" not in again.stderr
    assert os.listdir(d / "serving") == ["3"]


def test_saved_model_cli_run_matches_keras(cli_export, tmp_path):
    model, out, _, _ = cli_export
    png = png_bytes()
    np.save(tmp_path / "images.npy", np.array([png]))  # fixed-width bytes, no pickle
    proc = run(
        [sys.executable, "-c", SAVED_MODEL_CLI, "run", "--dir", out, "--tag_set", "serve"]
        + ["--signature_def", "serving_default", "--inputs", f"images={tmp_path / 'images.npy'}"]
        + ["--outdir", str(tmp_path / "out")]
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = np.load(tmp_path / "out" / "image_embedding.npy")
    pixels = export.preprocess_image_bytes(tf.constant(png), S)[None]
    want = np.asarray(model.encode_image(pixels)["image_embedding"])
    np.testing.assert_allclose(got, want, atol=1e-5)
    assert np.load(tmp_path / "out" / "attention_maps.npy").shape == (1, 4, 4, 4)


def test_serving_check_passes_and_writes_requests(cli_export, tmp_path):
    _, out, _, _ = cli_export
    (tmp_path / "x.png").write_bytes(png_bytes(3))
    req = tmp_path / "requests"
    proc = run(
        [sys.executable, os.path.join(REPO, "tools", "serving_check.py"), out]
        + ["--batch_sizes", "1,2", "--repeats", "2", "--image", str(tmp_path / "x.png")]
        + ["--write_requests", str(req)]
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    text = proc.stdout
    assert "signature_def['zero_shot']:" in text
    assert "images: dtype=string shape=(-1)" in text
    assert "image_embedding: dtype=float32 shape=(-1, 16)" in text
    assert "attention_maps: dtype=float32 shape=(-1, 4, 4, 4)" in text
    assert "temperature 0.0700" in text  # logit scale recovered from zero_shot = 1/0.07
    rows = [line.split() for line in text.splitlines() if line.strip()[:1].isdigit()]
    assert [r[0] for r in rows[-2:]] == ["1", "2"] and all(float(r[1]) > 0 for r in rows[-2:])
    assert text.rstrip().endswith("serving_check: OK")

    body = json.loads((req / "serving_default.json").read_text())
    assert body["signature_name"] == "serving_default"
    assert set(body["instances"][0]["images"]) == {"b64"}
    assert set(json.loads((req / "zero_shot.json").read_text())["inputs"]) == {"images", "prompts"}
    from tensorflow_serving.apis import predict_pb2

    pb = predict_pb2.PredictRequest.FromString((req / "embed_text.predict_request.pb").read_bytes())
    assert pb.model_spec.name == "place" and pb.model_spec.signature_name == "embed_text"
    assert (
        list(pb.inputs) == ["reports"] and pb.inputs["reports"].dtype == tf.string.as_datatype_enum
    )


def test_serving_check_rejects_a_directory_that_is_not_a_saved_model(tmp_path):
    (tmp_path / "notes.txt").write_text("hello")
    proc = run([sys.executable, os.path.join(REPO, "tools", "serving_check.py"), str(tmp_path)])
    assert proc.returncode == 2
    assert "is not a SavedModel directory" in proc.stderr


def test_serving_check_fails_on_a_saved_model_without_the_signatures(tmp_path):
    module = tf.Module()
    module.f = tf.function(lambda x: {"y": x * 2.0}, input_signature=[tf.TensorSpec([None])])
    tf.saved_model.save(
        module, str(tmp_path / "1"), signatures={"other": module.f.get_concrete_function()}
    )
    proc = run(
        [sys.executable, os.path.join(REPO, "tools", "serving_check.py"), str(tmp_path / "1")]
    )
    assert proc.returncode == 1
    assert "FAILED: signature 'serving_default' is missing" in proc.stderr
