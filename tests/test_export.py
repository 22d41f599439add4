"""TF Serving export: the SavedModel, loaded in a FRESH process (as TF Serving would, with
only tensorflow_text imported), gives the in-memory Keras model's numbers, checks bad input
with errors naming the batch index, handles empty batches and long reports; its in-graph
preprocessing equals the eval input pipeline's; the .keras archive reloads safely and
fine-tunes.

Tolerance: 1e-5 absolute between the served signatures and the Keras model (float32, same
ops, different graph).
"""

import io
import json
import os
import pickle
import subprocess
import sys
import textwrap

import keras
import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

from place_tf import export
from place_tf.config import tiny_model_config
from place_tf.data import pipeline, schema
from place_tf.data.tokenizer import ReportTokenizer
from place_tf.models.place_model import PLACEModel
from place_tf.objectives import objective_config

TOL = 1e-5
S = 32
TINY = tiny_model_config(image_size=S)
WORDS = (
    "no acute cardiopulmonary process heart size normal lungs clear small left right "
    "pleural effusion atelectasis cardiomegaly edema pneumothorax"
).split()
VOCAB = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", ".", ","] + WORDS
E, K, GRID = TINY.embed_dim, TINY.num_queries, S // TINY.patch_size


# ------------------------------------------------------------------ image helpers


def encode(arr, fmt="PNG"):
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format=fmt, **({"quality": 95} if fmt == "JPEG" else {}))
    return buf.getvalue()


def png_with_size_header(height, width):
    """A valid small PNG whose IHDR claims height×width (decoding would need that much)."""
    data = bytearray(encode(np.zeros((8, 8), np.uint8)))
    data[16:20] = width.to_bytes(4, "big")
    data[20:24] = height.to_bytes(4, "big")
    return bytes(data)


def jpeg_with_size_header(height, width):
    """A valid small JPEG whose SOF0 segment claims height×width."""
    data = bytearray(encode(np.zeros((16, 16, 3), np.uint8), "JPEG"))
    sof = data.index(b"\xff\xc0")
    data[sof + 5 : sof + 7] = height.to_bytes(2, "big")
    data[sof + 7 : sof + 9] = width.to_bytes(2, "big")
    return bytes(data)


RNG = np.random.default_rng(0)
GRAY8 = RNG.integers(0, 256, (40, 30), dtype=np.uint8)  # portrait, resized + padded
GRAY16 = RNG.integers(0, 65536, (30, 44)).astype(np.uint16)  # 16-bit landscape
RGB = RNG.integers(0, 256, (24, 36, 3), dtype=np.uint8)
PNG8, PNG16, JPEG_RGB = encode(GRAY8), encode(GRAY16), encode(RGB, "JPEG")
PNG_RGB = encode(RGB)
IMAGES = [PNG8, PNG16, JPEG_RGB, PNG_RGB]
LONG_REPORT = " ".join(WORDS[i % len(WORDS)] for i in range(200))  # ≫ 14 word pieces
TRUNCATED_REPORT = " ".join(WORDS[i % len(WORDS)] for i in range(TINY.max_length - 2))
REPORTS = ["No acute cardiopulmonary process.", "Small left pleural effusion.", "", LONG_REPORT]
PROMPTS = ["pleural effusion", "cardiomegaly", "no acute process"]

BAD_CASES = {  # name -> (bad image at batch index 1, words the error must contain)
    "garbage": (b"this is not an image", ["images[1]", "not a PNG or JPEG"]),
    "empty_bytes": (b"", ["images[1]", "empty input"]),
    "truncated_png": (PNG8[:70], ["images[1]", "corrupt or truncated"]),
    "truncated_jpeg": (JPEG_RGB[: len(JPEG_RGB) // 2], ["images[1]", "corrupt or truncated"]),
    "huge_png": (png_with_size_header(100_000, 100_000), ["images[1]", "too large", "not decoded"]),
    "huge_jpeg": (jpeg_with_size_header(65_000, 65_000), ["images[1]", "too large", "not decoded"]),
    "tiny_png": (encode(np.zeros((4, 4), np.uint8)), ["images[1]", "under 8 px"]),
}


def example_bytes(image):
    h, w = Image.open(io.BytesIO(image)).size[::-1]
    fmt = "png" if image.startswith(b"\x89PNG") else "jpeg"
    rec = schema.ExampleRecord(
        image=image, image_format=fmt, height=h, width=w, image_id="x", findings="clear."
    )
    return schema.to_example(rec).SerializeToString()


# ------------------------------------------------------------------ fixtures

# Runs in a fresh interpreter: only TensorFlow + tensorflow_text, no place_tf, no Keras model.
SERVE_SCRIPT = textwrap.dedent(
    """
    import pickle, sys
    import numpy as np
    import tensorflow as tf
    import tensorflow_text  # noqa: F401  registers the tokenizer ops

    export_dir, cases_file, out_file = sys.argv[1:4]
    loaded = tf.saved_model.load(export_dir)
    with open(cases_file, "rb") as f:
        cases = pickle.load(f)
    results = {"signatures": sorted(loaded.signatures)}
    for name, (signature, inputs) in cases.items():
        fn = loaded.signatures[signature]
        tensors = {k: tf.constant(v, tf.string, shape=[len(v)]) for k, v in inputs.items()}
        try:
            results[name] = {k: v.numpy() for k, v in fn(**tensors).items()}
        except tf.errors.InvalidArgumentError as e:
            results[name] = {"error": type(e).__name__, "message": e.message}

    # TF Serving's C++ loader works like the TF1 session loader: restore by the graph's
    # variable names, then run the signature by tensor names.
    tf.compat.v1.disable_eager_execution()
    graph = tf.Graph()
    with graph.as_default(), tf.compat.v1.Session(graph=graph) as sess:
        meta = tf.compat.v1.saved_model.loader.load(sess, ["serve"], export_dir)
        handles = [op.outputs[0] for op in graph.get_operations() if op.type == "VarHandleOp"]
        inited = sess.run([tf.raw_ops.VarIsInitializedOp(resource=h) for h in handles])
        sig = meta.signature_def["serving_default"]
        fetch = {k: v.name for k, v in sig.outputs.items()}
        feed = {sig.inputs["images"].name: np.array(cases["images"][1]["images"], dtype=object)}
        results["v1"] = {
            "num_variables": len(handles),
            "uninitialized": [h.op.get_attr("shared_name") for h, ok in zip(handles, inited) if not ok],
            "outputs": sess.run(fetch, feed_dict=feed),
        }
    with open(out_file, "wb") as f:
        pickle.dump(results, f)
    """
)


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    keras.utils.set_random_seed(0)
    model = PLACEModel(TINY, objective_config("place"))
    tokenizer = ReportTokenizer(VOCAB, max_length=TINY.max_length)
    base = tmp_path_factory.mktemp("serving")
    export_dir = export.export_saved_model(model, tokenizer, str(base / "1"), image_size=S)
    return model, tokenizer, export_dir


@pytest.fixture(scope="module")
def served(exported, tmp_path_factory):
    """Every signature call the tests check, run once in a fresh subprocess."""
    _, _, export_dir = exported
    cases = {
        "images": ("serving_default", {"images": IMAGES}),
        "images_empty": ("serving_default", {"images": []}),
        "text": ("embed_text", {"reports": REPORTS + [TRUNCATED_REPORT]}),
        "text_empty": ("embed_text", {"reports": []}),
        "zero_shot": ("zero_shot", {"images": IMAGES, "prompts": PROMPTS}),
        "examples": ("from_examples", {"examples": [example_bytes(b) for b in IMAGES]}),
    }
    for name, (bad, _) in BAD_CASES.items():
        cases[f"bad_{name}"] = ("serving_default", {"images": [PNG8, bad, PNG16]})
    d = tmp_path_factory.mktemp("served")
    (d / "cases.pkl").write_bytes(pickle.dumps(cases))
    (d / "serve.py").write_text(SERVE_SCRIPT)
    proc = subprocess.run(
        [sys.executable, str(d / "serve.py"), export_dir, str(d / "cases.pkl"), str(d / "out.pkl")],
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"},
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return pickle.loads((d / "out.pkl").read_bytes())


def keras_image_outputs(model, images):
    pixels = tf.stack([export.preprocess_image_bytes(b, S) for b in images])
    out = model.encode_image(pixels, training=False)
    return {k: np.asarray(out[k]) for k in export.IMAGE_OUTPUTS}


def keras_text_outputs(model, tokenizer, reports):
    token_ids, padding_mask = tokenizer(tf.constant(reports))
    out = model.encode_text(token_ids, padding_mask, training=False)
    return {k: np.asarray(out[k]) for k in export.TEXT_OUTPUTS}


# ------------------------------------------------------------------ SavedModel numerics


@pytest.mark.slow  # a fresh process loads the SavedModel
def test_signatures_present(served):
    assert served["signatures"] == sorted(export.SIGNATURES)


@pytest.mark.slow  # a fresh process loads the SavedModel
def test_tf1_session_loader_restores_every_variable(exported, served):
    """The loader TF Serving uses restores all variables and gives the Keras numbers."""
    model, _, _ = exported
    assert served["v1"]["num_variables"] > 50
    assert served["v1"]["uninitialized"] == []
    want = keras_image_outputs(model, IMAGES)
    for k in export.IMAGE_OUTPUTS:
        np.testing.assert_allclose(served["v1"]["outputs"][k], want[k], atol=TOL, err_msg=k)


@pytest.mark.slow  # a fresh process loads the SavedModel
def test_serving_default_equals_keras_encode_image(exported, served):
    model, _, _ = exported
    want = keras_image_outputs(model, IMAGES)
    got = served["images"]
    assert set(got) == set(export.IMAGE_OUTPUTS)
    assert got["image_embedding"].shape == (4, E)
    assert got["observations"].shape == (4, K, E)
    assert got["attention_maps"].shape == (4, K, GRID, GRID)
    for k in export.IMAGE_OUTPUTS:
        np.testing.assert_allclose(got[k], want[k], atol=TOL, err_msg=k)
    # 8-bit PNG, 16-bit PNG, RGB JPEG and RGB PNG all give unit, distinct embeddings.
    np.testing.assert_allclose(np.linalg.norm(got["image_embedding"], axis=-1), 1.0, atol=1e-5)
    assert np.linalg.matrix_rank(got["image_embedding"]) == 4


@pytest.mark.slow  # a fresh process loads the SavedModel
def test_embed_text_equals_keras_encode_text(exported, served):
    model, tokenizer, _ = exported
    reports = REPORTS + [TRUNCATED_REPORT]
    want = keras_text_outputs(model, tokenizer, reports)
    got = served["text"]
    assert got["text_embedding"].shape == (len(reports), E)
    assert got["text_observations"].shape == (len(reports), K, E)
    for k in export.TEXT_OUTPUTS:
        np.testing.assert_allclose(got[k], want[k], atol=TOL, err_msg=k)


@pytest.mark.slow  # a fresh process loads the SavedModel
def test_overlong_report_is_truncated_not_rejected(exported, served):
    _, tokenizer, _ = exported
    ids, mask = tokenizer(tf.constant([LONG_REPORT, TRUNCATED_REPORT]))
    assert bool(np.all(mask.numpy()))  # both fill all 16 positions
    np.testing.assert_array_equal(ids.numpy()[0], ids.numpy()[1])
    emb = served["text"]["text_embedding"]
    np.testing.assert_allclose(emb[3], emb[4], atol=TOL)  # LONG_REPORT vs its first 14 words
    assert np.abs(emb[3] - emb[0]).max() > 10 * TOL  # a different report differs


@pytest.mark.slow  # a fresh process loads the SavedModel
def test_zero_shot_is_logit_scale_times_cosine(exported, served):
    model, tokenizer, _ = exported
    img = keras_image_outputs(model, IMAGES)["image_embedding"]
    txt = keras_text_outputs(model, tokenizer, PROMPTS)["text_embedding"]
    scale = float(model.logit_scale)
    np.testing.assert_allclose(scale, 1.0 / 0.07, rtol=1e-5)  # the training temperature
    logits = scale * img @ txt.T
    got = served["zero_shot"]
    assert got["logits"].shape == (4, 3)
    np.testing.assert_allclose(got["logits"], logits, atol=10 * TOL)  # |logits| ≤ 14.3
    z = np.exp(logits - logits.max(-1, keepdims=True))
    np.testing.assert_allclose(got["probabilities"], z / z.sum(-1, keepdims=True), atol=TOL)


@pytest.mark.slow  # a fresh process loads the SavedModel
def test_from_examples_equals_serving_default(served):
    for k in export.IMAGE_OUTPUTS:
        np.testing.assert_allclose(served["examples"][k], served["images"][k], atol=TOL)


@pytest.mark.slow  # a fresh process loads the SavedModel
def test_empty_batch_gives_empty_outputs(served):
    assert served["images_empty"]["image_embedding"].shape == (0, E)
    assert served["images_empty"]["observations"].shape == (0, K, E)
    assert served["images_empty"]["attention_maps"].shape == (0, K, GRID, GRID)
    assert served["text_empty"]["text_embedding"].shape == (0, E)
    assert served["text_empty"]["text_observations"].shape == (0, K, E)


@pytest.mark.slow  # a fresh process loads the SavedModel
@pytest.mark.parametrize("name", sorted(BAD_CASES))
def test_bad_image_error_names_index_and_problem(served, name):
    result = served[f"bad_{name}"]
    assert result.get("error") == "InvalidArgumentError", result.keys()
    for words in BAD_CASES[name][1]:
        assert words in result["message"], result["message"]
    assert "1 of 3 images in this batch are bad" in result["message"]


_PREPROCESS = tf.function(
    lambda x: export.preprocess_image_batch(x, S),
    input_signature=[tf.TensorSpec([None], tf.string)],
)


@pytest.mark.parametrize("name", sorted(BAD_CASES))
def test_preprocess_batch_rejects_bad_image(name):
    """In-process twin of the served check (same graph code, no model)."""
    bad, words = BAD_CASES[name]
    with pytest.raises(tf.errors.InvalidArgumentError) as err:
        _PREPROCESS(tf.constant([PNG8, bad, PNG16]))
    for w in words:
        assert w in err.value.message


def test_preprocess_batch_empty_and_good():
    assert _PREPROCESS(tf.constant([], tf.string)).shape == (0, S, S, 1)
    got = _PREPROCESS(tf.constant(IMAGES)).numpy()
    want = np.stack([export.preprocess_image_bytes(b, S).numpy() for b in IMAGES])
    np.testing.assert_array_equal(got, want)


def test_bad_example_names_the_feature(exported):
    """In-process (the same graph): a tf.Example without image/encoded."""
    model, tokenizer, _ = exported
    module = export.PlaceServingModule(model, tokenizer, __file__, S, 1000)
    bare = tf.train.Example().SerializeToString()
    with pytest.raises(tf.errors.InvalidArgumentError, match=r"examples \(image/encoded\)\[0\]"):
        module.from_examples(tf.constant([bare, example_bytes(PNG8)]))
    rec = schema.from_example(example_bytes(PNG8))
    future = schema.to_example(rec)
    future.features.feature[schema.VERSION].int64_list.value[:] = [99]
    with pytest.raises(tf.errors.InvalidArgumentError, match="schema/version must be 1"):
        module.from_examples(tf.constant([future.SerializeToString()]))
    # max_image_pixels is the module's: 40×30 = 1200 > 1000.
    with pytest.raises(tf.errors.InvalidArgumentError, match="1200 pixels"):
        module.serve_images(tf.constant([PNG8]))


# ------------------------------------------------------------------ preprocessing


def test_preprocessing_by_hand():
    """Same-size image: only normalisation; 16-bit uses 65535; a 16×32 image is padded
    with 8 black (-1) rows above and below."""
    sq = RNG.integers(0, 256, (S, S), dtype=np.uint8)
    got = export.preprocess_image_bytes(encode(sq), S).numpy()[..., 0]
    np.testing.assert_allclose(got, (sq / 255.0 - 0.5) / 0.5, atol=1e-5)
    sq16 = RNG.integers(0, 65536, (S, S)).astype(np.uint16)
    got = export.preprocess_image_bytes(encode(sq16), S).numpy()[..., 0]
    np.testing.assert_allclose(got, (sq16 / 65535.0 - 0.5) / 0.5, atol=1e-5)
    wide = RNG.integers(0, 256, (16, S), dtype=np.uint8)
    got = export.preprocess_image_bytes(encode(wide), S).numpy()[..., 0]
    np.testing.assert_array_equal(got[:8], -1.0)
    np.testing.assert_array_equal(got[24:], -1.0)
    np.testing.assert_allclose(got[8:24], (wide / 255.0 - 0.5) / 0.5, atol=1e-5)


def test_preprocessing_equals_eval_pipeline(tmp_path):
    """The served pixels are exactly what make_eval_dataset feeds the model in training."""
    path = str(tmp_path / "x.tfrecord")
    with tf.io.TFRecordWriter(path) as w:
        for b in IMAGES:
            w.write(example_bytes(b))
    tokenizer = ReportTokenizer(VOCAB, max_length=TINY.max_length)
    ds = pipeline.make_eval_dataset(path, "test", tokenizer, batch_size=len(IMAGES), image_size=S)
    want = next(iter(ds))["image"].numpy()
    got = tf.function(lambda x: export.preprocess_image_batch(x, S))(tf.constant(IMAGES))
    assert want.shape == got.shape == (len(IMAGES), S, S, 1)
    np.testing.assert_allclose(got.numpy(), want, atol=1e-6)


# ------------------------------------------------------------------ layout and .keras


def test_layout_assets_and_no_overwrite(exported):
    model, tokenizer, export_dir = exported
    base = os.path.dirname(export_dir)
    assert os.listdir(base) == ["1"]  # no temporary directory left behind
    assert os.listdir(os.path.join(export_dir, "assets")) == ["vocab.txt"]
    with open(os.path.join(export_dir, "assets", "vocab.txt"), encoding="utf-8") as f:
        assert f.read().split("\n")[:-1] == VOCAB
    with pytest.raises(FileExistsError, match="already exists"):
        export.export_saved_model(model, tokenizer, export_dir, image_size=S)
    with pytest.raises(ValueError, match="integer version"):
        export.export_saved_model(model, tokenizer, os.path.join(base, "latest"), image_size=S)
    with pytest.raises(ValueError, match="built for 32x32"):
        export.export_saved_model(model, tokenizer, os.path.join(base, "2"), image_size=64)
    big_vocab = ReportTokenizer(VOCAB + [f"w{i}" for i in range(64)], max_length=16)
    with pytest.raises(ValueError, match="model embeds only 64"):
        export.export_saved_model(model, big_vocab, os.path.join(base, "2"), image_size=S)
    long_tok = ReportTokenizer(VOCAB, max_length=32)
    with pytest.raises(ValueError, match="max_length=32 exceeds"):
        export.export_saved_model(model, long_tok, os.path.join(base, "2"), image_size=S)
    assert os.listdir(base) == ["1"]


def test_next_version_dir(tmp_path):
    base = str(tmp_path / "serving")
    assert export.next_version_dir(base) == os.path.join(base, "1")  # base need not exist
    for d in ("1", "7", ".tmp-8-abc", "latest"):
        os.makedirs(os.path.join(base, d))
    assert export.next_version_dir(base) == os.path.join(base, "8")


def test_keras_archive_reloads_safely_and_finetunes(exported, tmp_path):
    model, tokenizer, _ = exported
    path = export.export_keras(model, str(tmp_path / "model.keras"))
    reloaded = keras.saving.load_model(path, safe_mode=True)
    assert isinstance(reloaded, PLACEModel)
    pixels = tf.stack([export.preprocess_image_bytes(b, S) for b in IMAGES])
    a = model.encode_image(pixels)["image_embedding"]
    b = reloaded.encode_image(pixels)["image_embedding"]
    np.testing.assert_allclose(np.asarray(b), np.asarray(a), atol=1e-6)

    token_ids, padding_mask = tokenizer(tf.constant(REPORTS))
    batch = {
        "image": pixels,
        "token_ids": token_ids,
        "padding_mask": padding_mask,
        "labels": tf.zeros([4, schema.NUM_CHEXPERT]),
    }
    opt = keras.optimizers.AdamW(1e-3)
    variables = reloaded.trainable_variables
    before = [np.asarray(v).copy() for v in variables]
    with tf.GradientTape() as tape:
        loss, terms = reloaded.compute_losses(batch, training=True)
    grads = tape.gradient(loss, variables)
    opt.apply(grads, variables)
    assert np.isfinite(float(loss)) and {"ita", "pcma", "cce"} <= set(terms)
    changed = sum(
        not np.array_equal(x, np.asarray(v)) for x, v in zip(before, variables, strict=True)
    )
    assert changed > len(variables) // 2


def test_export_keras_rejects_other_suffix(exported, tmp_path):
    with pytest.raises(ValueError, match=r"\.keras"):
        export.export_keras(exported[0], str(tmp_path / "model.h5"))


def test_request_json_roundtrip_uses_b64():
    """REST bodies carry bytes as {"b64": ...} and decode back to the same bytes."""
    sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tools"))
    import serving_check

    bodies = serving_check.rest_bodies([PNG8], ["a report"], PROMPTS, [b"ex"])
    body = json.loads(json.dumps(bodies["serving_default"]))
    assert set(body["instances"][0]["images"]) == {"b64"}
    name, tensors = serving_check.decode_rest(json.dumps(body))
    assert name == "serving_default" and tensors["images"].numpy().tolist() == [PNG8]
    name, tensors = serving_check.decode_rest(json.dumps(bodies["zero_shot"]))
    assert [p.decode() for p in tensors["prompts"].numpy()] == PROMPTS
    req = serving_check.grpc_request("zero_shot", {"images": [PNG8], "prompts": [b"x"]}, "place")
    name, tensors = serving_check.decode_grpc(req.SerializeToString())
    assert name == "zero_shot" and tensors["images"].numpy().tolist() == [PNG8]
