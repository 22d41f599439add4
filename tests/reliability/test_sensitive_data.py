"""Sensitive data: report text and patient/study/image ids never reach logs (at INFO,
C++ logs included), TensorBoard, checkpoints, run_info/summary JSON, the .keras archive or
the SavedModel; Keras archives load with safe_mode=True; the library has no unsafe
deserialization (pickle, eval/exec, yaml.load without SafeLoader, allow_pickle, ...).

The canary corpus (conftest.canary_run) carries unique canary strings in every report and
id, also in corrupt records (the path where a TF parse error could print record bytes).
"""

import ast
import os
import re
import zipfile

import numpy as np
import pytest
import reliability_util as U

CANARIES = [U.CANARY_REPORT, *U.CANARY_IDS.values()]


def needles() -> list[bytes]:
    out = []
    for c in CANARIES:
        for v in {c, c.lower(), c.upper()}:
            out.append(v.encode())
            out.append(v.encode("utf-16-le"))
    return out


def output_blobs(run) -> dict[str, bytes]:
    """Every output of the run: the captured log, every file under model_dir (the
    SavedModel included), and each member of zip archives (.keras) decompressed."""
    blobs = {"<stdout+stderr>": open(run["log"], "rb").read()}
    for root, _, files in os.walk(run["model_dir"]):
        for name in files:
            path = os.path.join(root, name)
            data = open(path, "rb").read()
            blobs[path] = data
            if zipfile.is_zipfile(path):
                with zipfile.ZipFile(path) as z:
                    for member in z.namelist():
                        blobs[f"{path}!{member}"] = z.read(member)
    return blobs


@pytest.mark.slow
def test_canaries_went_through_training(canary_run):
    """The search below is meaningful: the data held the canaries and was trained on."""
    shard = os.path.join(canary_run["corpus"], "train-00000-of-00002.tfrecord")
    data = open(shard, "rb").read()
    assert all(c.encode() in data for c in CANARIES)
    summary = U.read_json(os.path.join(canary_run["model_dir"], "summary.json"))
    assert summary["steps"] == 3
    skipped = summary["skipped_records"]
    assert skipped["corrupt_record"] >= 2 and skipped["empty_report"] >= 1
    assert skipped["bad_image"] >= 1
    # The vocabulary was learned from the canary reports: their words are vocabulary
    # entries, so the tokenizer and the model did see the canary text.
    assert {"marmoset", "quokka"} <= set(canary_run["vocab"])


@pytest.mark.slow
def test_no_canary_in_any_output(canary_run):
    blobs = output_blobs(canary_run)
    kinds = {os.path.basename(k.split("!")[0]).split(".")[0] for k in blobs}
    # What was searched: logs, TensorBoard, checkpoints, JSON, .keras, SavedModel.
    assert any("events" in k for k in kinds) and any("ckpt" in k for k in kinds)
    assert {"run_info", "summary", "model", "saved_model", "vocab"} <= kinds
    assert len(blobs["<stdout+stderr>"]) > 1000  # INFO logging did happen
    leaks = [
        (where, n.decode("latin-1")) for where, b in blobs.items() for n in needles() if n in b
    ]
    assert not leaks, f"canaries found in outputs: {leaks}"


@pytest.mark.slow
def test_vocabulary_holds_only_wordpieces(canary_run):
    lines = open(os.path.join(canary_run["export_dir"], "assets", "vocab.txt")).read().split("\n")
    assert "marmoset" in lines  # pieces of the canary may be vocabulary entries ...
    for line in lines:  # ... never the canary itself, never text with separators
        assert not any(ch.isspace() for ch in line), line
        assert not re.search(r"\w-\w", line), line  # no hyphenated compound survived
    lowered = "\n".join(lines).lower()
    assert not any(c.lower() in lowered for c in CANARIES)


@pytest.mark.slow
def test_keras_archive_loads_in_safe_mode(canary_run):
    import keras

    import place_tf.models.place_model  # noqa: F401  (registers the classes)

    model = keras.saving.load_model(
        os.path.join(canary_run["model_dir"], "model.keras"), safe_mode=True
    )
    out = model.encode_image(np.zeros([1, 32, 32, 1], np.float32))
    emb = np.asarray(out["image_embedding"])
    assert emb.shape == (1, 16) and np.all(np.isfinite(emb))


UNSAFE_CALLS = {
    ("pickle", "load"),
    ("pickle", "loads"),
    ("cPickle", "load"),
    ("cPickle", "loads"),
    ("dill", "load"),
    ("dill", "loads"),
    ("cloudpickle", "load"),
    ("cloudpickle", "loads"),
    ("marshal", "load"),
    ("marshal", "loads"),
    ("shelve", "open"),
    ("yaml", "unsafe_load"),
    ("yaml", "full_load"),
}


def unsafe_uses(source: str) -> list[str]:
    """Calls that deserialize or execute untrusted data, found in the AST (so comments,
    strings and `model.eval()`-like methods do not count)."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if not isinstance(node, ast.Call):
            continue
        f = node.func
        kw = {k.arg: k.value for k in node.keywords}
        if isinstance(f, ast.Name) and f.id in ("eval", "exec", "__import__"):
            found.append(f"{f.id}() at line {node.lineno}")
        if isinstance(f, ast.Attribute) and isinstance(f.value, ast.Name):
            pair = (f.value.id, f.attr)
            if pair in UNSAFE_CALLS:
                found.append(f"{f.value.id}.{f.attr}() at line {node.lineno}")
            if pair == ("yaml", "load"):
                loader = kw.get("Loader") or (node.args[1] if len(node.args) > 1 else None)
                if not (isinstance(loader, ast.Attribute) and "Safe" in loader.attr) and not (
                    isinstance(loader, ast.Name) and "Safe" in loader.id
                ):
                    found.append(f"yaml.load() without SafeLoader at line {node.lineno}")
        for name, bad in (("allow_pickle", True), ("safe_mode", False), ("shell", True)):
            v = kw.get(name)
            if isinstance(v, ast.Constant) and v.value is bad:
                found.append(f"{name}={bad} at line {node.lineno}")
    return sorted(found, key=lambda s: int(s.rsplit(" ", 1)[1]))


def test_unsafe_use_detector_detects():
    src = (
        "import pickle, yaml\npickle.loads(b)\neval('1')\nyaml.load(s)\n"
        "yaml.load(s, Loader=yaml.SafeLoader)\nnp.load(p, allow_pickle=True)\n"
        "keras.saving.load_model(p, safe_mode=False)\nmodel.eval()\n# pickle.load(f)\n"
    )
    assert unsafe_uses(src) == [
        "pickle.loads() at line 2",
        "eval() at line 3",
        "yaml.load() without SafeLoader at line 4",
        "allow_pickle=True at line 6",
        "safe_mode=False at line 7",
    ]


def test_library_has_no_unsafe_deserialization():
    offenders = {}
    for top in ("place_tf", "pipelines"):
        for root, _, files in os.walk(os.path.join(U.REPO, top)):
            for name in files:
                if name.endswith(".py"):
                    path = os.path.join(root, name)
                    found = unsafe_uses(open(path, encoding="utf-8").read())
                    if found:
                        offenders[os.path.relpath(path, U.REPO)] = found
    assert not offenders, offenders
