"""Downstream tasks end to end on a tiny SynthCXR corpus with a tiny PLACEModel, plus unit
checks of the task logic (place_tf/evaluate/{embeddings,linear_probe,zero_shot,retrieval,
localization,__main__}.py)."""

import dataclasses
import json
import math
import os

import numpy as np
import pytest

from place_tf import config as config_lib
from place_tf.config import DataConfig, ModelConfig, ObjectiveConfig, TrainConfig
from place_tf.data import schema
from place_tf.evaluate import linear_probe, retrieval

NUM_IMAGES = 100
IMAGE_SIZE = 32


def tiny_model_config(vocab_size: int) -> ModelConfig:
    return config_lib.tiny_model_config(vocab_size, image_size=IMAGE_SIZE)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    from place_tf.data import synthetic

    d = str(tmp_path_factory.mktemp("synth"))
    synthetic.generate_corpus(d, num_images=NUM_IMAGES, image_size=IMAGE_SIZE, seed=0, workers=1)
    return d


@pytest.fixture(scope="module")
def model_file(corpus, tmp_path_factory):
    import keras

    from place_tf.data import tokenizer as tok
    from place_tf.models.place_model import PLACEModel

    keras.utils.set_random_seed(0)
    vocab = tok.load_vocabulary(os.path.join(corpus, "vocab.txt"))
    model = PLACEModel(tiny_model_config(len(vocab)), ObjectiveConfig())
    path = str(tmp_path_factory.mktemp("model") / "model.keras")
    model.save(path)
    return path


def _cli(task, model_file, corpus, out_dir, *extra):
    from place_tf.evaluate.__main__ import main

    out = os.path.join(out_dir, f"{task}.json")
    rc = main([task, f"--model={model_file}", f"--data={corpus}", "--output", out, *extra])
    assert rc == 0
    with open(out) as f:
        result = json.load(f)  # strict JSON: NaN would have been written as null
    with open(os.path.splitext(out)[0] + ".md") as f:
        table = f.read()
    return result, table


def _in_unit(x):
    return x is not None and 0.0 <= x <= 1.0


# ------------------------------------------------------------------ unit logic
def test_single_label_subset_hand_labels():
    lab = np.full((6, schema.NUM_CHEXPERT), -2.0)
    ate, card, eff = (
        schema.label_index(n) for n in ("Atelectasis", "Cardiomegaly", "Pleural Effusion")
    )
    lab[0, ate] = 1
    lab[1, card] = 1
    lab[2, [ate, card]] = 1  # two positives: excluded
    lab[3, eff] = 1
    lab[3, card] = -1  # uncertain other label does not count as positive
    lab[4, ate] = 1
    idx, cls = retrieval.single_label_subset(lab, per_class=200)
    assert idx.tolist() == [0, 1, 3, 4]
    assert [schema.COMPETITION_LABELS[c] for c in cls] == [
        "Atelectasis",
        "Cardiomegaly",
        "Pleural Effusion",
        "Atelectasis",
    ]
    idx1, _ = retrieval.single_label_subset(lab, per_class=1, seed=3)
    assert len(idx1) == 3 and set(idx1) <= {0, 1, 3, 4}


def test_retrieval_scores_perfect_and_shuffled_embeddings():
    classes = np.repeat(np.arange(3), 4)
    proto = np.eye(3)
    img = proto[classes] + 0.01 * np.random.default_rng(0).normal(size=(12, 3))
    r = retrieval.retrieval_scores(img, proto[classes], classes, ks=(1, 4, 20))
    assert r["image_to_text"] == {"P@1": 1.0, "P@4": 1.0}
    assert r["text_to_image"]["P@4"] == 1.0
    assert r["skipped_ks"] == [20]
    # Text embeddings of the wrong class: nothing retrieved is right at K=1.
    r2 = retrieval.retrieval_scores(img, proto[(classes + 1) % 3], classes, ks=(1,))
    assert r2["image_to_text"]["P@1"] == 0.0


def test_fit_logistic_reaches_the_regularised_optimum():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(200, 5))
    y = (x @ np.array([1.0, -2.0, 0.5, 0.0, 0.0]) + 0.3 * rng.normal(size=200) > 0).astype(float)
    l2 = 0.1
    w, b = linear_probe.fit_logistic(x, y, l2=l2)
    p = 1 / (1 + np.exp(-(x @ w + b)))
    grad_w = x.T @ (p - y) / len(y) + l2 * w
    assert np.max(np.abs(grad_w)) < 1e-8
    assert abs(np.mean(p - y)) < 1e-6  # bias gradient (not regularised)
    assert w[1] < 0 < w[0]


def test_train_linear_head_early_stops_and_restores_best():
    rng = np.random.default_rng(1)
    x = rng.normal(size=(120, 4)).astype(np.float32)
    y = np.stack([(x[:, 0] > 0), (x[:, 1] > 0)], axis=1).astype(np.float64)
    labels = np.full((40, schema.NUM_CHEXPERT), -2.0)
    names = ["Atelectasis", "Cardiomegaly"]
    labels[:, schema.label_index(names[0])] = y[80:, 0]
    labels[:, schema.label_index(names[1])] = y[80:, 1]
    score = linear_probe._ScoreFn("chexpert5", {"labels": labels}, names)
    mask = np.ones_like(y[:80], bool)
    mask[:40, 1] = False  # half the Cardiomegaly training labels missing: still learnable
    predict, info = linear_probe.train_linear_head(
        "chexpert5",
        x[:80],
        y[:80],
        mask,
        x[80:],
        score,
        2,
        epochs=25,
        batch_size=80,
        learning_rate=0.1,
        patience=4,
    )
    assert info["val_metric"] > 0.95
    assert 1 <= info["best_epoch"] <= info["epochs_run"] <= 25
    # The restored weights are the best epoch's: recomputing the score gives the same value.
    assert score(predict(x[80:])) == pytest.approx(info["val_metric"])


def test_choose_protocol():
    lab = np.full((4, schema.NUM_CHEXPERT), -2.0)
    assert linear_probe.choose_protocol(lab, np.array([0, 1, 1, 0])) == "binary"
    assert linear_probe.choose_protocol(lab, np.array([0, 1, 2, 0])) == "multiclass"
    lab[0, schema.label_index("Edema")] = 1
    assert linear_probe.choose_protocol(lab, np.array([-1] * 4)) == "chexpert5"
    with pytest.raises(ValueError, match="no protocol"):
        linear_probe.choose_protocol(np.zeros((2, schema.NUM_CHEXPERT)), np.array([-1, -1]))


def test_class_label_protocols_hand_computed():
    data = {
        "labels": np.full((4, schema.NUM_CHEXPERT), -2.0),
        "class_label": np.array([0, 2, 1, 2]),
    }
    names = ["class_0", "class_1", "class_2"]
    y, _ = linear_probe.targets("multiclass", data, names)
    assert y.tolist() == [0, 2, 1, 2]
    probs = np.array([[0.6, 0.3, 0.1], [0.1, 0.2, 0.7], [0.5, 0.4, 0.1], [0.2, 0.3, 0.5]])
    r = linear_probe.evaluate_scores("multiclass", data, names, probs)
    assert r["accuracy"] == 0.75  # row 2 predicted class 0, truly class 1
    # one-vs-rest class 1: positive 0.4 vs negatives 0.3, 0.2, 0.3 -> 1.0
    assert r["per_label"]["class_1"] == 1.0
    binary = {"labels": data["labels"], "class_label": np.array([0, 1, 1, 0])}
    names_b = linear_probe.label_names("binary", binary)
    assert names_b == ["class_1"]
    rb = linear_probe.evaluate_scores(
        "binary", binary, names_b, np.array([[0.2], [0.9], [0.4], [0.6]])
    )
    assert rb["macro_auroc"] == 0.75 and rb["accuracy"] == 0.5
    with pytest.raises(ValueError, match="outside the training classes"):
        linear_probe.targets("multiclass", {"class_label": np.array([0, 5])}, names)


# ------------------------------------------------------------------ model loading
def test_load_model_from_run_dir(model_file, tmp_path):
    import keras
    import tensorflow as tf

    from place_tf.evaluate import embeddings
    from place_tf.training import checkpoints

    model = keras.saving.load_model(model_file, compile=False)
    # A trained-looking model: weights different from any fresh initialisation.
    for w in model.weights:
        w.assign(w.numpy() + 0.5)
    run_dir = tmp_path / "run"
    ckpt_dir = run_dir / "checkpoints"
    ckpt_dir.mkdir(parents=True)
    info = {
        "configs": {
            "model": dataclasses.asdict(model.model_config),
            "objective": dataclasses.asdict(model.objective_config),
        }
    }
    (run_dir / "run_info.json").write_text(json.dumps(info))
    # The trainer's checkpoint format: every variable keyed by its path.
    ckpt = checkpoints.make_checkpoint(model)
    manager = tf.train.CheckpointManager(ckpt, str(ckpt_dir), 3)
    manager.save(checkpoint_number=7)

    def same(a, b):
        return all(
            np.array_equal(x.numpy(), y.numpy()) for x, y in zip(a.weights, b.weights, strict=True)
        )

    # Every weight comes back (keras-hub's transformer blocks included).
    assert same(model, embeddings.load_model(str(run_dir)))
    # With model.keras beside it, the run directory always loads the trained weights.
    model.save(str(run_dir / "model.keras"))
    assert same(model, embeddings.load_model(str(run_dir)))
    from place_tf.models import factory

    twin = factory.twin_of(model, 5, build=False)
    assert twin.model_config == model.model_config
    diffs = [
        not np.array_equal(a.numpy(), b.numpy())
        for a, b in zip(model.weights, twin.weights, strict=True)
    ]
    assert all(diffs)
    with pytest.raises(FileNotFoundError, match="not a PLACE-TF run"):
        embeddings.load_model(str(tmp_path))


def test_extract_aligns_ids_and_shapes(model_file, corpus):
    import keras

    from place_tf.data import splits
    from place_tf.evaluate import embeddings

    model = keras.saving.load_model(model_file, compile=False)
    tok = embeddings.load_tokenizer(model, model_file, corpus)
    d = embeddings.extract(
        model,
        corpus,
        "validate",
        tok,
        image_outputs=("image_embedding", "attention_maps"),
        text_outputs=("text_embedding",),
    )
    n = len(d["labels"])
    rows = splits.read_split_examples(corpus, "validate")  # shard order, not the pipeline's
    assert n == len(rows) > 0
    by_id = {r[0]: r[2] for r in rows}
    assert d["image_id"] is not None and sorted(d["image_id"]) == sorted(by_id)
    # Each id is paired with its own record's labels.
    for image_id, lab in zip(d["image_id"], d["labels"], strict=True):
        np.testing.assert_array_equal(lab, by_id[image_id])
    assert d["image_embedding"].shape == (n, 16)
    assert d["attention_maps"].shape == (n, 4, 4, 4)
    np.testing.assert_allclose(np.linalg.norm(d["text_embedding"], axis=1), 1.0, atol=1e-4)


def test_encoder_fns_trace_once_for_any_batch_and_input_kind(model_file, corpus):
    """Every split, the short last batch and NumPy callers (localization) share one trace."""
    import keras

    from place_tf.evaluate import embeddings

    model = keras.saving.load_model(model_file, compile=False)
    tok = embeddings.load_tokenizer(model, model_file, corpus)
    for split in ("train", "validate"):  # batch 5 leaves a short last batch
        embeddings.extract(
            model, corpus, split, tok, batch_size=5, text_outputs=("text_embedding",)
        )
    enc_image, enc_text = embeddings.encoder_fns(
        model, ("image_embedding", "image_features"), ("text_embedding",)
    )
    s = model.model_config.image_size
    out = enc_image(np.zeros((3, s, s, 1), np.float64))  # NumPy float64: cast, no new trace
    assert out["image_embedding"].shape == (3, 16)
    ids, mask = tok(["no acute process", "small left effusion"])
    assert enc_text(ids.numpy().astype(np.int64), mask)["text_embedding"].shape == (2, 16)
    assert enc_image.tf_function.experimental_get_tracing_count() == 1
    assert enc_text.tf_function.experimental_get_tracing_count() == 1


# ------------------------------------------------------------------ tasks through the CLI
def test_cli_linear_probe(model_file, corpus, tmp_path):
    r, table = _cli(
        "linear", model_file, corpus, str(tmp_path), "--fraction", "1.0", "--epochs", "5"
    )
    assert r["task"] == "linear" and r["protocol"] == "chexpert5"
    assert set(r["labels"]) <= set(schema.COMPETITION_LABELS) and r["labels"]
    e = r["fractions"]["1"]
    assert e["n_train"] > 0 and 1 <= e["epochs_run"] <= 5
    assert e["per_label"] and all(_in_unit(v) for v in e["per_label"].values())
    assert _in_unit(e["macro_auroc"])
    assert set(e["per_label"]) | set(r["skipped_labels"]) == set(r["labels"])
    assert "| 100 % |" in table


@pytest.mark.slow
def test_cli_linear_fractions_are_nested_subsets(model_file, corpus, tmp_path):
    r, table = _cli("linear", model_file, corpus, str(tmp_path), "--epochs", "2")
    n = {k: v["n_train"] for k, v in r["fractions"].items()}
    assert set(n) == {"0.01", "0.1", "1"}
    assert n["0.01"] <= n["0.1"] < n["1"]
    assert r["fractions"]["0.1"]["subset_source"] == "computed"
    assert "| 1 % |" in table and "| 10 % |" in table


def test_cli_zero_shot(model_file, corpus, tmp_path):
    r, table = _cli("zero_shot", model_file, corpus, str(tmp_path))
    assert r["labels"] == list(schema.COMPETITION_LABELS)
    assert all(_in_unit(v) for v in r["multilabel"]["per_label"].values())
    assert set(r["multilabel"]["per_label"]) | set(r["multilabel"]["skipped"]) == set(r["labels"])
    mc = r["multiclass"]
    assert mc["n"] == sum(mc["classes"].values()) > 0
    assert _in_unit(mc["accuracy"])
    assert all(v[0] >= 5 and v[1] >= 1 for v in r["num_prompts"].values())
    assert "AUROC (multi-label)" in table


def test_cli_retrieval(model_file, corpus, tmp_path):
    r, table = _cli("retrieval", model_file, corpus, str(tmp_path), "--split", "validate")
    assert r["n_queries"] == sum(r["classes"].values()) > 0
    for d in ("image_to_text", "text_to_image"):
        assert r[d] and all(_in_unit(v) for v in r[d].values())
    assert set(r["image_to_text"]) == {f"P@{k}" for k in (1, 5, 10) if k <= r["n_queries"]}
    assert "image to text" in table


def test_cli_localization(model_file, corpus, tmp_path):
    r, table = _cli("localization", model_file, corpus, str(tmp_path))
    assert r["per_pathology"]
    for name, e in r["per_pathology"].items():
        assert name in schema.CHEXPERT_LABELS
        assert 0 <= e["query"] < 4 and e["n_test"] > 0
        for k in ("pointing_game", "iou", "chance_pointing", "chance_iou", "val_inside_fraction"):
            assert _in_unit(e[k]), (name, k, e[k])
    assert _in_unit(r["mean"]["pointing_game"])
    assert "| mean |" in table


@pytest.mark.slow
def test_cli_finetune(model_file, corpus, tmp_path):
    r, _ = _cli("finetune", model_file, corpus, str(tmp_path), "--fraction", "1.0", "--epochs", "1")
    assert r["task"] == "finetune"
    e = r["fractions"]["1"]
    assert e["epochs_run"] == 1 and _in_unit(e["macro_auroc"])


def test_finetune_net_trains_the_encoder(model_file):
    import keras
    import tensorflow as tf

    model = keras.saving.load_model(model_file, compile=False)
    net = linear_probe.build_finetune_net(model, 3)
    images = tf.random.normal([4, IMAGE_SIZE, IMAGE_SIZE, 1])
    assert tuple(net(images).shape) == (4, 3)
    enc_ids = {id(w) for w in model.image_encoder.trainable_weights}
    assert enc_ids <= {id(w) for w in net.trainable_weights}
    before = [w.numpy().copy() for w in model.image_encoder.trainable_weights]
    net.compile(optimizer=keras.optimizers.SGD(0.1), loss=keras.losses.MeanSquaredError())
    net.fit(images, tf.ones([4, 3]), epochs=1, verbose=0)
    after = model.image_encoder.trainable_weights
    assert any(not np.allclose(a, b.numpy()) for a, b in zip(before, after, strict=True))


def test_cli_dispatches_external_tasks_with_accepted_options(
    model_file, corpus, tmp_path, monkeypatch
):
    import sys
    import types

    calls = {}

    def evaluate(model, data_dir, *, fraction=1.0, seed=0):
        calls.update(data_dir=data_dir, fraction=fraction, seed=seed, model=type(model).__name__)
        return {"dice": 0.5}

    fake = types.ModuleType("place_tf.evaluate.segmentation")
    fake.evaluate = evaluate
    fake.format_table = lambda r: f"| dice | {r['dice']} |"
    monkeypatch.setitem(sys.modules, "place_tf.evaluate.segmentation", fake)
    r, table = _cli(
        "segmentation", model_file, corpus, str(tmp_path), "--fraction", "0.1", "--seed", "3"
    )
    assert calls == {"data_dir": corpus, "fraction": 0.1, "seed": 3, "model": "PLACEModel"}
    assert r["dice"] == 0.5 and r["task"] == "segmentation" and r["seed"] == 3
    assert table.strip() == "| dice | 0.5 |"


def test_cli_rejects_bad_fraction(model_file, corpus, tmp_path):
    from place_tf.evaluate.__main__ import main

    with pytest.raises(SystemExit, match="fraction"):
        main(["linear", f"--model={model_file}", f"--data={corpus}", "--fraction", "2"])


@pytest.mark.slow
def test_compare_with_random_init(model_file, corpus, monkeypatch):
    import keras

    from place_tf.config import Configs
    from place_tf.data import tokenizer as tok

    model = keras.saving.load_model(model_file, compile=False)
    cfg = Configs(
        data=DataConfig(corpus_dir=corpus, image_size=IMAGE_SIZE, max_length=16),
        model=model.model_config,
        objective=model.objective_config,
        train=TrainConfig(seed=0),
    )
    tokenizer = tok.ReportTokenizer(
        tok.load_vocabulary(os.path.join(corpus, "vocab.txt")), max_length=16
    )
    before = [w.numpy().copy() for w in model.weights[:3]]
    r = linear_probe.compare_with_random_init(model, tokenizer, cfg)
    assert r["labels"] and set(r["labels"]) <= set(schema.COMPETITION_LABELS)
    for k in ("trained", "random_init"):
        assert isinstance(r[k]["macro_auroc"], float) and _in_unit(r[k]["macro_auroc"])
        assert all(_in_unit(v) for v in r[k]["per_label"].values())
        assert r[k]["l2"] in linear_probe.L2_GRID
    assert r["n_train"] > r["n_test"] > 0
    json.dumps(r)  # the trainer writes it into summary.json
    # The probe leaves the trained model untouched.
    for a, b in zip(before, model.weights[:3], strict=True):
        np.testing.assert_array_equal(a, b.numpy())
    assert not math.isnan(r["trained"]["macro_auroc"])
    # Bounded (a MIMIC-scale run's end-of-run probe): at most PROBE_MAX_EXAMPLES per split.
    monkeypatch.setattr(linear_probe, "PROBE_MAX_EXAMPLES", r["n_test"] - 1)
    small = linear_probe.compare_with_random_init(model, tokenizer, cfg)
    assert small["n_train"] == small["n_test"] == r["n_test"] - 1


def test_raw_pixel_features_are_the_encoders_input_pixels(model_file, corpus):
    """The baseline probes exactly what the encoder is fed: normalised, resized pixels."""
    import keras

    from place_tf.data import tokenizer as tok
    from place_tf.evaluate import embeddings as emb_lib

    model = keras.saving.load_model(model_file, safe_mode=True)
    tokenizer = tok.ReportTokenizer(tok.load_vocabulary(os.path.join(corpus, "vocab.txt")), 16)
    feats = linear_probe.raw_pixel_features(corpus, IMAGE_SIZE, batch_size=7)
    ref = emb_lib.extract(model, corpus, "test", tokenizer, IMAGE_SIZE, 64, with_images=True)
    np.testing.assert_array_equal(
        feats["test"]["x"], ref["image"].reshape(len(ref["image"]), IMAGE_SIZE * IMAGE_SIZE)
    )
    np.testing.assert_array_equal(feats["test"]["labels"], ref["labels"])
    assert feats["train"]["x"].shape[1] == IMAGE_SIZE * IMAGE_SIZE


def test_cli_raw_pixel_baseline(corpus, tmp_path):
    """Pixels only: a corpus without vocab.txt (no tokenizer needed) works the same."""
    import shutil

    data = str(tmp_path / "no_vocab")
    shutil.copytree(corpus, data)
    os.remove(os.path.join(data, "vocab.txt"))
    r, table = _cli("linear", "raw_pixels", data, str(tmp_path), "--image_size", "32")
    assert r["feature"] == "raw_pixels" and r["image_size"] == 32
    assert r["labels"] and set(r["labels"]) <= set(schema.COMPETITION_LABELS)
    assert _in_unit(r["macro_auroc"]) and r["l2"] in linear_probe.L2_GRID
    assert "| raw pixels | 32 |" in table
    with pytest.raises(SystemExit, match="baseline of the linear task only"):
        _cli("zero_shot", "raw_pixels", corpus, str(tmp_path))


def test_raw_pixel_features_are_bounded(corpus):
    """Average-pooled above max_side, at most max_examples per split (corpus order)."""
    full = linear_probe.raw_pixel_features(corpus, IMAGE_SIZE)
    small = linear_probe.raw_pixel_features(
        corpus, IMAGE_SIZE, batch_size=4, max_side=16, max_examples=5
    )
    img = full["train"]["x"][:5].reshape(5, 16, 2, 16, 2)
    np.testing.assert_allclose(
        small["train"]["x"], img.mean(axis=(2, 4)).reshape(5, 256), atol=1e-6
    )
    np.testing.assert_array_equal(small["train"]["labels"], full["train"]["labels"][:5])
    assert len(small["test"]["x"]) == 5 and len(full["test"]["x"]) > 5
