"""Classification by linear probe (frozen encoder) or fine-tuning, at 1 % / 10 % / 100 % labels.

Feature [design]: the probe reads the image encoder's global feature BEFORE the projection
head (`image_features`: the ViT [CLS] token / the ResNet pooled map), as MGCA's linear
classification does; `feature="image_embedding"` probes the L2-normalised projected
embedding instead. Frozen features are standardised with the training subset's mean/std
(an affine change the linear head could learn, but it makes one learning rate fit every
encoder, random or trained).

Protocols (chosen from the corpus, `protocol="auto"`):
- "chexpert5": multi-label, the CheXpert competition labels (schema.COMPETITION_LABELS)
  that have a positive in the training split; sigmoid head, binary cross-entropy over the
  labelled entries (missing -2 left out, uncertain -1 per `uncertain`: "zeros" by default,
  U-Zeros); test AUROC over certain labels only (uncertain and missing left out); a label
  with no positive (or no negative) in test is skipped and reported.
- "binary" (two class labels, RSNA-like): one sigmoid, AUROC + accuracy at 0.5.
- "multiclass" (>2 class labels, COVIDx-like): softmax, accuracy + one-vs-rest macro AUROC.
The head is trained with Adam; after every epoch the validation AUROC (accuracy for
multiclass) is measured and training stops after `patience` epochs without improvement,
restoring the best epoch's weights.

Label fractions use place_tf.data.splits: the corpus' split file
`<corpus>/splits/train_<pct>pct.txt` when present, else the same seeded selection computed
in memory (nothing is written into the corpus).

`compare_with_random_init` is the quick check the trainer runs at the end of pre-training:
embeddings of train/validate/test once, a NumPy Newton logistic regression per label
(L2 strength picked on validation), for the trained model and a random-init twin.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Sequence

import numpy as np

from place_tf.data import schema
from place_tf.evaluate import embeddings as emb_lib
from place_tf.evaluate import metrics as M

log = logging.getLogger(__name__)

COMPETITION_IDX = [schema.label_index(n) for n in schema.COMPETITION_LABELS]
FEATURES = ("image_features", "image_embedding")
PROTOCOLS = ("auto", "chexpert5", "binary", "multiclass")
L2_GRID = (1e-3, 1e-2, 1e-1, 1.0)
NEWTON_MAX_DIM = 512  # features above this are PCA-reduced for the quick Newton probe


# ------------------------------------------------------------------ labels and protocol
def choose_protocol(labels: np.ndarray, class_label: np.ndarray, protocol: str = "auto") -> str:
    """The protocol of a corpus from its training labels (see module docstring)."""
    if protocol not in PROTOCOLS:
        raise ValueError(f"protocol must be one of {PROTOCOLS}, got {protocol!r}")
    if protocol != "auto":
        return protocol
    if np.any(labels[:, COMPETITION_IDX] == 1):
        return "chexpert5"
    if len(class_label) and np.all(class_label >= 0):
        return "binary" if len(np.unique(class_label)) <= 2 else "multiclass"
    raise ValueError(
        "no protocol fits this corpus: no CheXpert competition label is positive in train "
        "and not every example has a class label"
    )


def label_names(protocol: str, train: dict) -> list[str]:
    """Column names of the head: present competition labels, or the class ids."""
    if protocol == "chexpert5":
        return [
            schema.COMPETITION_LABELS[j]
            for j, i in enumerate(COMPETITION_IDX)
            if np.any(train["labels"][:, i] == 1)
        ]
    classes = sorted(int(c) for c in np.unique(train["class_label"]) if c >= 0)
    if protocol == "binary":
        if len(classes) > 2:
            raise ValueError(f"protocol 'binary' needs at most 2 classes, train has {classes}")
        return [f"class_{max(classes + [1])}"]  # the positive class (1 for 0/1 labels)
    return [f"class_{c}" for c in classes]


def targets(protocol: str, data: dict, names: Sequence[str], uncertain: str = "zeros"):
    """(y, mask): multi-label 0/1 targets [N, C] with a use-mask, or class ids [N]."""
    if protocol == "chexpert5":
        cols = [schema.label_index(n) for n in names]
        return M.apply_uncertain_policy(data["labels"][:, cols], uncertain)
    cls = data["class_label"]
    if np.any(cls < 0):
        raise ValueError(f"protocol {protocol!r} needs a class label >= 0 on every example")
    if protocol == "binary":
        positive = int(names[0].split("_", 1)[1])
        y = (cls == positive).astype(np.float64)[:, None]
        return y, np.ones_like(y, dtype=bool)
    classes = [int(n.split("_", 1)[1]) for n in names]
    lookup = {c: i for i, c in enumerate(classes)}
    unknown = sorted(set(cls.tolist()) - set(classes))
    if unknown:
        raise ValueError(f"classes {unknown} appear outside the training classes {classes}")
    return np.asarray([lookup[int(c)] for c in cls], np.int64), None


def evaluate_scores(protocol: str, data: dict, names: Sequence[str], scores: np.ndarray) -> dict:
    """Test metrics from head outputs (probabilities [N, C])."""
    if protocol == "chexpert5":
        cols = [schema.label_index(n) for n in names]
        return M.multilabel_auroc(data["labels"][:, cols], scores, names, uncertain="ignore")
    y, _ = targets(protocol, data, names)
    if protocol == "binary":
        auc = M.roc_auc(y[:, 0], scores[:, 0])
        return {
            "macro_auroc": auc,
            "per_label": {names[0]: auc},
            "accuracy": M.accuracy(y[:, 0], scores[:, 0] >= 0.5),
            "skipped": {},
        }
    onehot = np.eye(len(names))[y]
    r = M.multilabel_auroc(onehot, scores, names)
    r["accuracy"] = M.accuracy(y, np.argmax(scores, axis=1))
    return r


def _val_metric(protocol, data, names, scores) -> float:
    r = evaluate_scores(protocol, data, names, scores)
    v = r["accuracy"] if protocol == "multiclass" else r["macro_auroc"]
    return -math.inf if v is None or math.isnan(v) else float(v)


# ------------------------------------------------------------------ label fractions
def fraction_indices(
    data_dir: str, train: dict, fraction: float, seed: int = 0
) -> tuple[np.ndarray, str]:
    """Row indices of the training subset for `fraction`, and where the subset came from."""
    from place_tf.data import splits

    n = len(train["labels"])
    if fraction >= 1.0:
        return np.arange(n), "all"
    ids = train.get("image_id")
    if ids is None:
        # No ids: the same selection rule over row numbers (still seeded and nested).
        triples = [
            (f"{i:09d}", int(c), [int(v) for v in lab])
            for i, (c, lab) in enumerate(zip(train["class_label"], train["labels"], strict=True))
        ]
        chosen = splits.label_fraction_subsets(triples, [fraction], seed=seed)[fraction]
        log.warning("train ids unavailable: label-fraction subset chosen over row numbers")
        return np.asarray(sorted(int(i) for i in chosen), np.int64), "computed_by_row"
    path = os.path.join(data_dir, splits.SPLITS_DIR, splits.split_file_name(fraction, "train"))
    if os.path.exists(path):
        chosen, source = set(splits.load_split_ids(path)), "file"
    else:
        triples = [
            (i, int(c), [int(v) for v in lab])
            for i, c, lab in zip(ids, train["class_label"], train["labels"], strict=True)
        ]
        chosen, source = (
            set(splits.label_fraction_subsets(triples, [fraction], seed=seed)[fraction]),
            "computed",
        )
    idx = np.asarray([i for i, x in enumerate(ids) if x in chosen], np.int64)
    if len(idx) == 0:
        raise ValueError(
            f"label fraction {fraction}: no training example selected ({source} {path})"
        )
    return idx, source


# ------------------------------------------------------------------ keras head training
def _standardise(train_x: np.ndarray, *others: np.ndarray):
    mean = train_x.mean(axis=0)
    std = np.maximum(train_x.std(axis=0), 1e-6)
    return [(x - mean) / std for x in (train_x, *others)]


def _masked_bce(num_outputs: int):
    """BCE-with-logits over entries whose mask is 1; y_true packs [targets | mask]."""
    from keras import ops

    def loss(y_true, logits):
        t, m = y_true[:, :num_outputs], y_true[:, num_outputs:]
        z = logits
        per = ops.maximum(z, 0.0) - z * t + ops.log1p(ops.exp(-ops.abs(z)))
        return ops.sum(per * m) / ops.maximum(ops.sum(m), 1.0)

    return loss


def _head_loss_and_y(protocol, y, mask):
    import keras

    if protocol == "multiclass":
        return keras.losses.SparseCategoricalCrossentropy(from_logits=True), y
    return _masked_bce(y.shape[1]), np.concatenate([y, mask.astype(np.float64)], axis=1).astype(
        np.float32
    )


def _probabilities(protocol, logits: np.ndarray) -> np.ndarray:
    logits = np.asarray(logits, np.float64)
    if protocol == "multiclass":
        e = np.exp(logits - logits.max(axis=1, keepdims=True))
        return e / e.sum(axis=1, keepdims=True)
    return 1.0 / (1.0 + np.exp(-logits))


def _make_early_stopping(predict_val, score_fn, patience):
    import keras

    class BestOnValidation(keras.callbacks.Callback):
        """Stop after `patience` epochs without a better validation score; restore the best.

        A validation score that is undefined (e.g. no positive label) is ignored, so an
        uninformative validation split trains for the full epoch budget.
        """

        def __init__(self):
            super().__init__()
            self.best, self.best_epoch, self.best_weights, self.wait = -math.inf, -1, None, 0

        def on_epoch_end(self, epoch, logs=None):
            score = score_fn(predict_val())
            if not math.isfinite(score):
                return  # undefined on this validation set: no evidence either way
            if score > self.best:
                self.best, self.best_epoch, self.wait = score, epoch, 0
                self.best_weights = self.model.get_weights()
            else:
                self.wait += 1
                if self.wait >= patience:
                    self.model.stop_training = True

        def on_train_end(self, logs=None):
            if self.best_weights is not None:
                self.model.set_weights(self.best_weights)

    return BestOnValidation()


def train_linear_head(
    protocol: str,
    x_train: np.ndarray,
    y_train: np.ndarray,
    mask_train,
    x_val: np.ndarray,
    val_score_fn,
    num_outputs: int,
    epochs: int = 100,
    batch_size: int = 64,
    learning_rate: float = 1e-3,
    patience: int = 10,
    seed: int = 0,
):
    """Keras linear head on frozen features; returns (predict_fn(x) -> probs, info dict)."""
    import keras

    keras.utils.set_random_seed(seed)
    head = keras.Sequential(
        [keras.Input((x_train.shape[1],)), keras.layers.Dense(num_outputs)], name="linear_head"
    )
    loss, y = _head_loss_and_y(protocol, y_train, mask_train)
    head.compile(optimizer=keras.optimizers.Adam(learning_rate), loss=loss)

    def predict(x):
        w, b = head.get_weights()
        return _probabilities(protocol, x @ w + b)

    stopper = _make_early_stopping(lambda: predict(x_val), val_score_fn, patience)
    hist = head.fit(
        x_train.astype(np.float32),
        y,
        batch_size=batch_size,
        epochs=epochs,
        shuffle=True,
        verbose=0,
        callbacks=[stopper],
    )
    info = {
        "epochs_run": len(hist.history.get("loss", [])),
        "best_epoch": stopper.best_epoch + 1,
        "val_metric": stopper.best,
        "final_train_loss": float(hist.history["loss"][-1]) if hist.history.get("loss") else None,
    }
    return predict, info


class _ScoreFn:
    """Validation score (higher is better) of head probabilities."""

    def __init__(self, protocol, data, names):
        self.protocol, self.data, self.names = protocol, data, names

    def __call__(self, probs):
        return _val_metric(self.protocol, self.data, self.names, probs)


# ------------------------------------------------------------------ fine-tuning
def build_finetune_net(model, num_outputs: int, feature: str = "image_features"):
    """keras.Model: the PLACE image encoder (+ projection for "image_embedding"), trainable,
    then a linear head producing logits. Shares (and so changes) the encoder's weights."""
    import keras

    class FinetuneNet(keras.Model):
        def __init__(self):
            super().__init__(name="finetune_net")
            self.encoder = model.image_encoder
            self.projection = model.image_projection if feature == "image_embedding" else None
            self.head = keras.layers.Dense(num_outputs, name="head")

        def call(self, images, training=False):
            feats, _ = self.encoder(images, training=training)
            if self.projection is not None:
                feats = self.projection(feats, training=training)
            return self.head(feats)

    return FinetuneNet()


def _finetune(
    model,
    protocol,
    names,
    data_dir,
    tokenizer,
    image_size,
    train,
    idx,
    y,
    mask,
    val,
    val_score,
    *,
    epochs,
    batch_size,
    learning_rate,
    patience,
    seed,
    feature,
):
    """Unfrozen image encoder + linear head, trained on the subset's images."""
    import keras
    import tensorflow as tf

    from place_tf.data import pipeline

    keras.utils.set_random_seed(seed)
    out_dim = y.shape[1] if protocol != "multiclass" else len(names)

    net = build_finetune_net(model, out_dim, feature)
    loss, y_packed = _head_loss_and_y(protocol, y, mask)
    keep = np.zeros(len(train["labels"]), bool)
    keep[idx] = True
    full_y = np.zeros((len(keep),) + np.asarray(y_packed).shape[1:], np.asarray(y_packed).dtype)
    full_y[idx] = y_packed

    def images_of(split):
        ds = pipeline.make_eval_dataset(  # the rows emb_lib.extract read (image-only)
            data_dir,
            split,
            tokenizer,
            batch_size=batch_size,
            image_size=image_size,
            require_report=False,
        )
        return ds.map(lambda b: b["image"])

    train_ds = (
        tf.data.Dataset.zip(
            images_of("train").unbatch(),
            tf.data.Dataset.from_tensor_slices((full_y, keep)),
        )
        .filter(lambda img, yk: yk[1])
        .map(lambda img, yk: (img, yk[0]))
        .shuffle(min(int(keep.sum()), 4096), seed=seed, reshuffle_each_iteration=True)
        .repeat()
        .batch(batch_size)
        .prefetch(2)
    )
    steps = max(1, math.ceil(int(keep.sum()) / batch_size))
    val_ds = images_of("validate")
    net.compile(optimizer=keras.optimizers.Adam(learning_rate), loss=loss)
    net(tf.zeros([1, image_size, image_size, 1]))
    infer = tf.function(lambda images: net(images, training=False), reduce_retracing=True)

    def predict(ds):
        logits = [infer(images).numpy() for images in ds]
        return _probabilities(protocol, np.concatenate(logits, axis=0))

    stopper = _make_early_stopping(lambda: predict(val_ds), val_score, patience)
    hist = net.fit(
        train_ds,
        epochs=epochs,
        steps_per_epoch=steps,
        shuffle=False,
        verbose=0,
        callbacks=[stopper],
    )
    info = {
        "epochs_run": len(hist.history.get("loss", [])),
        "best_epoch": stopper.best_epoch + 1,
        "val_metric": stopper.best,
        "final_train_loss": float(hist.history["loss"][-1]) if hist.history.get("loss") else None,
    }
    return predict(images_of("test")), info


# ------------------------------------------------------------------ task entry point
def run(
    model,
    data_dir: str,
    tokenizer,
    fractions: Sequence[float] = (0.01, 0.1, 1.0),
    finetune: bool = False,
    feature: str = "image_features",
    protocol: str = "auto",
    uncertain: str = "zeros",
    image_size: int | None = None,
    epochs: int | None = None,
    batch_size: int = 64,
    learning_rate: float | None = None,
    patience: int | None = None,
    seed: int = 0,
) -> dict:
    """Linear probe (or fine-tuning) at each label fraction; see module docstring.

    Returns {"task", "protocol", "feature", "labels", "skipped_labels", "fractions":
    {"0.01": {"macro_auroc", "per_label", "accuracy"?, "n_train", "subset_source",
    "epochs_run", "best_epoch", "val_metric"}, ...}, "n_val", "n_test"}.
    """
    if feature not in FEATURES:
        raise ValueError(f"feature must be one of {FEATURES}, got {feature!r}")
    image_size = image_size or emb_lib.image_size_of(model)
    outputs = () if finetune else (feature,)
    splits_data = {
        s: emb_lib.extract(
            model, data_dir, s, tokenizer, image_size, batch_size, image_outputs=outputs
        )
        for s in ("train", "validate", "test")
    }
    train, val, test = splits_data["train"], splits_data["validate"], splits_data["test"]
    protocol = choose_protocol(train["labels"], train["class_label"], protocol)
    names = label_names(protocol, train)
    if not names:
        raise ValueError(f"{data_dir}: protocol {protocol} has no label with a positive in train")
    val_score = _ScoreFn(protocol, val, names)
    epochs = epochs or (10 if finetune else 100)
    patience = patience or (3 if finetune else 10)
    lr = learning_rate or (1e-4 if finetune else 1e-3)
    result = {
        "task": "finetune" if finetune else "linear",
        "protocol": protocol,
        "feature": feature,
        "labels": list(names),
        "uncertain_policy_train": uncertain,
        "n_val": int(len(val["labels"])),
        "n_test": int(len(test["labels"])),
        "fractions": {},
    }
    if not finetune:
        x_tr_all, x_val, x_te = train[feature], val[feature], test[feature]
    for f in fractions:
        if not 0 < f <= 1:
            raise ValueError(f"label fraction {f} must be in (0, 1]")
        idx, source = fraction_indices(data_dir, train, f, seed)
        sub = {k: (v[idx] if isinstance(v, np.ndarray) else None) for k, v in train.items()}
        y, mask = targets(protocol, sub, names, uncertain)
        if finetune:
            # Fine-tuning changes the encoder: each fraction starts from the loaded weights.
            tuned = [model.image_encoder] + (
                [model.image_projection] if feature == "image_embedding" else []
            )
            start = [layer.get_weights() for layer in tuned]
            probs, info = _finetune(
                model,
                protocol,
                names,
                data_dir,
                tokenizer,
                image_size,
                train,
                idx,
                y,
                mask,
                val,
                val_score,
                epochs=epochs,
                batch_size=batch_size,
                learning_rate=lr,
                patience=patience,
                seed=seed,
                feature=feature,
            )
            for layer, weights in zip(tuned, start, strict=True):
                layer.set_weights(weights)
        else:
            xs = _standardise(x_tr_all[idx], x_val, x_te)
            predict, info = train_linear_head(
                protocol,
                xs[0],
                y,
                mask,
                xs[1],
                val_score,
                len(names),
                epochs=epochs,
                batch_size=batch_size,
                learning_rate=lr,
                patience=patience,
                seed=seed,
            )
            probs = predict(xs[2])
        r = evaluate_scores(protocol, test, names, probs)
        entry = {
            "macro_auroc": r["macro_auroc"],
            "per_label": r["per_label"],
            "n_train": int(len(idx)),
            "subset_source": source,
            **info,
        }
        if "accuracy" in r:
            entry["accuracy"] = r["accuracy"]
        result["skipped_labels"] = r.get("skipped", {})
        result["fractions"][_frac_key(f)] = entry
        log.info("%s fraction %s: macro AUROC %.4f", result["task"], _frac_key(f), r["macro_auroc"])
    return result


def _frac_key(f: float) -> str:
    return f"{f:g}"


def format_table(result: dict) -> str:
    """Markdown table: one row per label fraction, macro then per-label AUROC."""
    names = result.get("labels", [])
    acc = any("accuracy" in e for e in result.get("fractions", {}).values())
    head = ["fraction", "n_train", "macro AUROC"] + (["accuracy"] if acc else []) + list(names)
    lines = [
        f"### {result.get('task', 'linear')} ({result.get('protocol')}, feature {result.get('feature')})",
        "",
        "| " + " | ".join(head) + " |",
        "|" + "---|" * len(head),
    ]
    for f, e in result.get("fractions", {}).items():
        row = [f"{float(f) * 100:g} %", str(e.get("n_train")), emb_lib.fmt(e.get("macro_auroc"))]
        if acc:
            row.append(emb_lib.fmt(e.get("accuracy")))
        row += [emb_lib.fmt(e.get("per_label", {}).get(n)) for n in names]
        lines.append("| " + " | ".join(row) + " |")
    skipped = result.get("skipped_labels") or {}
    if skipped:
        lines += ["", "Skipped on test: " + "; ".join(f"{k} ({v})" for k, v in skipped.items())]
    return "\n".join(lines)


# ------------------------------------------------------------------ quick probe (trainer)
def _sigmoid(z):
    return 0.5 * (1.0 + np.tanh(0.5 * z))


def fit_logistic(
    x: np.ndarray, y: np.ndarray, l2: float = 1e-2, max_iter: int = 50, tol: float = 1e-6
):
    """L2-regularised logistic regression by Newton's method: returns (w [D], b).

    Minimises mean_i BCE(y_i, σ(w·x_i + b)) + l2/2 ||w||² (bias not penalised); Newton's
    step solves (Xᵀ S X / n + l2 I) Δ = ∇ with S = diag(p(1 - p)).
    """
    n, d = x.shape
    xb = np.concatenate([x, np.ones((n, 1))], axis=1)
    w = np.zeros(d + 1)
    reg = np.full(d + 1, l2)
    reg[-1] = 1e-8
    for _ in range(max_iter):
        p = _sigmoid(xb @ w)
        grad = xb.T @ (p - y) / n + reg * w
        s = p * (1.0 - p)
        hess = (xb * s[:, None]).T @ xb / n + np.diag(reg)
        step = np.linalg.solve(hess, grad)
        w -= step
        if np.max(np.abs(step)) < tol:
            break
    return w[:-1], float(w[-1])


def _pca(train_x: np.ndarray, max_dim: int):
    """Projection onto the top `max_dim` principal directions of the (centred) train features."""
    mean = train_x.mean(axis=0)
    _, _, vt = np.linalg.svd(train_x - mean, full_matrices=False)
    basis = vt[:max_dim].T
    return lambda x: (x - mean) @ basis


def _quick_probe(feats: dict, names: Sequence[str], uncertain: str = "zeros") -> dict:
    """Newton logistic probe per label on train, L2 picked on validate, AUROC on test."""
    x_tr, x_val, x_te = (feats[s]["x"].astype(np.float64) for s in ("train", "validate", "test"))
    if x_tr.shape[1] > NEWTON_MAX_DIM:
        proj = _pca(x_tr, NEWTON_MAX_DIM)
        x_tr, x_val, x_te = proj(x_tr), proj(x_val), proj(x_te)
    x_tr, x_val, x_te = _standardise(x_tr, x_val, x_te)
    cols = [schema.label_index(n) for n in names]
    y_tr, m_tr = M.apply_uncertain_policy(feats["train"]["labels"][:, cols], uncertain)
    best = None
    for l2 in L2_GRID if len(x_val) else (1e-2,):
        ws = []
        for c in range(len(cols)):
            m = m_tr[:, c]
            ws.append(fit_logistic(x_tr[m], y_tr[m, c], l2=l2))
        w = np.stack([a for a, _ in ws], axis=1)
        b = np.asarray([b for _, b in ws])
        score = math.nan
        if len(x_val):
            score = M.multilabel_auroc(feats["validate"]["labels"][:, cols], x_val @ w + b, names)[
                "macro_auroc"
            ]
        if best is None or (not math.isnan(score) and (math.isnan(best[0]) or score > best[0])):
            best = (score, l2, w, b)
    _, l2, w, b = best
    r = M.multilabel_auroc(
        feats["test"]["labels"][:, cols], x_te @ w + b, names, uncertain="ignore"
    )
    return {
        "macro_auroc": r["macro_auroc"],
        "per_label": r["per_label"],
        "l2": l2,
        "skipped": r["skipped"],
    }


def compare_with_random_init(model, tokenizer, cfg, batch_size: int = 128) -> dict:
    """Frozen-feature linear probe of `model` vs a random-init twin (same configs).

    cfg: place_tf.config.Configs (uses data.corpus_dir, data.image_size, train.seed).
    Also the same probe on raw pixels ("raw_pixels"), the floor a trained encoder should
    clear on a corpus that is not trivial.
    Returns {"trained": {"macro_auroc", "per_label", "l2"}, "random_init": {...},
    "raw_pixels": {...},
    "labels": [...], "skipped_labels": {...}, "feature", "n_train", "n_test"}; values are
    plain floats (NaN where undefined) so the trainer can json.dump them.
    """
    data_dir, image_size = cfg.data.corpus_dir, cfg.data.image_size
    seed = int(getattr(cfg.train, "seed", 0))
    feature = "image_features"

    def features_of(m):
        out = {}
        for s in ("train", "validate", "test"):
            try:
                d = emb_lib.extract(
                    m,
                    data_dir,
                    s,
                    tokenizer,
                    image_size,
                    batch_size,
                    image_outputs=(feature,),
                    max_examples=PROBE_MAX_EXAMPLES,
                )
                out[s] = {"x": d[feature], "labels": d["labels"]}
            except ValueError:
                if s != "validate":
                    raise
                out[s] = {"x": np.zeros((0, 1)), "labels": np.zeros((0, schema.NUM_CHEXPERT))}
        return out

    trained = features_of(model)
    names = [
        schema.COMPETITION_LABELS[j]
        for j, i in enumerate(COMPETITION_IDX)
        if np.any(trained["train"]["labels"][:, i] == 1)
    ]
    result = {
        "labels": names,
        "feature": feature,
        "n_train": int(len(trained["train"]["x"])),
        "n_test": int(len(trained["test"]["x"])),
    }
    if not names:
        nan = {"macro_auroc": float("nan"), "per_label": {}}
        result.update(
            trained=nan,
            random_init=dict(nan),
            skipped_labels={},
            note="no competition label has a positive in train",
        )
        return result
    r_trained = _quick_probe(trained, names)
    twin = random_init_twin_for(model, seed)
    r_random = _quick_probe(features_of(twin), names)
    result["skipped_labels"] = r_trained.pop("skipped")
    r_random.pop("skipped")
    result["trained"], result["random_init"] = r_trained, r_random
    raw = raw_pixel_probe(data_dir, image_size, names)
    result["raw_pixels"] = {k: raw[k] for k in ("macro_auroc", "per_label", "l2")}
    return result


RAW_PIXEL_MAX_SIDE = 64  # raw-pixel features: images average-pooled to at most 64x64
# The end-of-run probes (trained, random init, raw pixels) read at most the first 20k
# examples of a split (corpus order): enough for a stable AUROC, bounded on MIMIC.
PROBE_MAX_EXAMPLES = 20_000


def raw_pixel_features(
    data_dir: str,
    image_size: int,
    batch_size: int = 128,
    max_side: int = RAW_PIXEL_MAX_SIDE,
    max_examples: int = PROBE_MAX_EXAMPLES,
) -> dict:
    """{split: {"x": flattened normalised pixels [N, s*s], "labels"}} of train/validate/test.

    The baseline of "is the corpus trivial?": what a linear probe reads from the pixels
    alone, at the resolution the encoder sees. Bounded so the end-of-run probe of a
    MIMIC-scale run cannot exhaust memory (300k images at 224 px would be 60 GB): images
    larger than `max_side` are average-pooled by ceil(S / max_side), and at most
    `max_examples` per split are read (SynthCXR at 64 px is untouched by either bound).
    """
    import tensorflow as tf

    from place_tf.data import pipeline

    factor = -(-image_size // max_side)
    side = image_size // factor
    out = {}
    for s in ("train", "validate", "test"):
        xs, ys, n = [], [], 0
        try:
            ds = pipeline.make_eval_dataset(
                data_dir,
                s,
                None,
                batch_size=batch_size,
                image_size=image_size,
                require_report=False,
            )
            for b in ds:
                img = b["image"]
                if factor > 1:
                    img = tf.nn.avg_pool2d(img, factor, factor, "VALID")
                xs.append(img.numpy().reshape(int(img.shape[0]), -1))
                ys.append(b["labels"].numpy().astype(np.float32))
                n += len(xs[-1])
                if n >= max_examples:
                    break
        except ValueError:
            if s != "validate":
                raise
        if not xs and s != "validate":
            raise ValueError(f"{data_dir}: split {s!r} has no examples")
        out[s] = {
            "x": np.concatenate(xs)[:max_examples] if xs else np.zeros((0, side * side)),
            "labels": np.concatenate(ys)[:max_examples]
            if ys
            else np.zeros((0, schema.NUM_CHEXPERT)),
        }
    return out


def raw_pixel_probe(data_dir: str, image_size: int, names=None) -> dict:
    """The quick probe (as compare_with_random_init) on raw pixels: {"macro_auroc",
    "per_label", "l2", "feature": "raw_pixels", "image_size", "labels"}."""
    feats = raw_pixel_features(data_dir, image_size)
    if names is None:
        names = [
            schema.COMPETITION_LABELS[j]
            for j, i in enumerate(COMPETITION_IDX)
            if np.any(feats["train"]["labels"][:, i] == 1)
        ]
    r = _quick_probe(feats, names)
    r.pop("skipped")
    r.update(feature="raw_pixels", image_size=int(image_size), labels=list(names))
    return r


def random_init_twin_for(model, seed: int):
    """Random-init twin with a seed distinct from training's, so it is not the init itself."""
    from place_tf.models import factory

    return factory.twin_of(model, seed + 1, build=False)
