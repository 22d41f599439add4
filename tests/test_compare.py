"""tools/compare.py: config validation, aggregation, markdown/winner logic, --quick end to end."""

import json
import math
import os
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, "tools"))

import compare  # noqa: E402


def _raw_config(**over):
    cfg = {
        "corpus": {"dir": "c", "images": 40, "image_size": 32},
        "methods": ["random_init", "place"],
        "seeds": 2,
        "pretrain": {"max_steps": 10, "vit_layers": 1, "learning_rate": 1e-3},
        "tasks": {"linear": {"fractions": [0.1, 1.0], "epochs": 2}, "retrieval": {}},
    }
    cfg.update(over)
    return cfg


# ------------------------------------------------------------------ config loader
def test_validate_normalises_defaults():
    cfg = compare.validate(_raw_config())
    assert cfg["seeds"] == [0, 1]
    assert cfg["corpus"]["seed"] == 0
    assert cfg["work_dir"] == "runs/compare" and cfg["output"] == "results"
    assert cfg["quick"] == {"steps": 8, "epochs": 1, "seeds": 1}
    assert cfg["tasks"]["retrieval"] == {}


def test_jobs_must_be_positive():
    with pytest.raises(compare.ConfigError, match="my.yaml: jobs: expected a positive integer"):
        compare.validate(_raw_config(jobs=0), "my.yaml")


@pytest.mark.parametrize(
    "over, needle",
    [
        ({"bogus": 1}, "unknown top-level key(s) ['bogus']"),
        ({"corpus": {"dir": "c", "images": 40}}, "corpus.image_size: required"),
        (
            {"corpus": {"dir": "c", "images": 0, "image_size": 32}},
            "corpus.images: expected a positive integer",
        ),
        ({"methods": ["place", "clip"]}, "methods[1]: unknown method 'clip'"),
        ({"seeds": 0}, "seeds: expected a positive integer"),
        (
            {"pretrain": {"max_steps": 5, "vit_layerz": 2}},
            "pretrain.vit_layerz: unknown training setting",
        ),
        ({"pretrain": {"max_steps": 5, "vit_layers": 1.5}}, "pretrain.vit_layers: expected int"),
        ({"pretrain": {"max_steps": 5, "model_dir": "x"}}, "pretrain.model_dir: set by the runner"),
        ({"pretrain": {"vit_layers": 1}}, "pretrain.max_steps: required"),
        (
            {"tasks": {"segmentation": {"epochs": -1}}},
            "tasks.segmentation.epochs: expected a positive integer",
        ),
        (
            {"tasks": {"linear": {"fractions": [0.1, 2.0]}}},
            "tasks.linear.fractions: expected a non-empty list",
        ),
        ({"tasks": {"linear": {"epoch": 3}}}, "tasks.linear.epoch: unknown option"),
        ({"tasks": {"ocr": {}}}, "tasks.ocr: unknown task"),
        ({"quick": {"steps": "8"}}, "quick.steps: expected a positive integer"),
    ],
)
def test_validation_errors_name_the_key(over, needle):
    with pytest.raises(compare.ConfigError) as e:
        compare.validate(_raw_config(**over), "my.yaml")
    assert needle in str(e.value)
    assert str(e.value).startswith("my.yaml: ")


def test_load_config_reads_yaml_and_names_file(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text(
        "corpus: {dir: c, images: 10, image_size: 32}\npretrain: {max_steps: 3}\n"
        "tasks: {zero_shot: {per_class: 5}}\nseeds: [4, 7]\n"
    )
    cfg = compare.load_config(str(p))
    assert cfg["seeds"] == [4, 7] and cfg["methods"] == list(compare.METHODS)
    p.write_text("corpus: [\n")
    with pytest.raises(compare.ConfigError, match="not valid YAML"):
        compare.load_config(str(p))


def test_default_config_is_valid():
    cfg = compare.load_config(os.path.join(REPO, "configs", "compare_synth.yaml"))
    assert len(cfg["seeds"]) >= 3
    assert cfg["methods"] == list(compare.METHODS)
    assert set(cfg["tasks"]) == set(compare.TASKS)


def test_quick_and_seed_overrides():
    cfg = compare.validate(_raw_config(seeds=3, pretrain={"max_steps": 100, "warmup_steps": 10}))
    cfg["tasks"]["linear"]["epochs"] = 30
    q = compare.apply_overrides(cfg, quick=True)
    assert q["seeds"] == [0] and q["pretrain"]["max_steps"] == 8
    assert q["pretrain"]["warmup_steps"] == 4 and q["tasks"]["linear"]["epochs"] == 1
    assert cfg["pretrain"]["max_steps"] == 100  # the input is not modified
    assert compare.apply_overrides(cfg, seeds=5)["seeds"] == [0, 1, 2, 3, 4]
    # Settings hashes: a changed budget invalidates stored task results.
    assert compare.task_key(q, "linear") != compare.task_key(cfg, "linear")
    assert compare.task_key(cfg, "retrieval") == compare.task_key(copy_of(cfg), "retrieval")


def copy_of(cfg):
    return json.loads(json.dumps(cfg))


def test_settings_hash_follows_the_synthcxr_generator_version(monkeypatch):
    """Models and results from an older SynthCXR are not reused after an upgrade."""
    from place_tf.data import synthetic

    cfg = compare.validate(_raw_config())
    before = (compare.pretrain_key(cfg), compare.task_key(cfg, "linear"))
    monkeypatch.setattr(synthetic, "GENERATOR_VERSION", synthetic.GENERATOR_VERSION + 1)
    after = (compare.pretrain_key(cfg), compare.task_key(cfg, "linear"))
    assert before[0] != after[0] and before[1] != after[1]
    # So does the size the corpus is rendered at (a new STORED_IMAGE_SIZE is a new corpus).
    monkeypatch.setattr(synthetic, "STORED_IMAGE_SIZE", synthetic.STORED_IMAGE_SIZE + 32)
    assert compare.pretrain_key(cfg) != after[0]


def test_prepare_corpus_renders_at_the_stored_size_and_keeps_user_data(tmp_path):
    from place_tf.data import manifest, synthetic

    cfg = compare.validate(_raw_config())
    cfg["corpus"].update(dir=str(tmp_path / "c"), images=12, image_size=16, seed=1)
    assert compare.prepare_corpus(cfg) == 0
    assert synthetic.corpus_is_valid(cfg["corpus"]["dir"], 12, synthetic.STORED_IMAGE_SIZE, 1)
    path = os.path.join(cfg["corpus"]["dir"], manifest.MANIFEST_NAME)
    doc = json.load(open(path))
    doc["generator"] = {"name": "mimic-cxr"}
    json.dump(doc, open(path, "w"))
    with pytest.raises(compare.ConfigError, match="SynthCXR did not make"):
        compare.prepare_corpus(cfg)
    assert json.load(open(path))["generator"] == {"name": "mimic-cxr"}


# ------------------------------------------------------------------ aggregation
def test_mean_std_hand_computed():
    m, s, n = compare.mean_std([0.70, 0.80, 0.90])
    assert n == 3 and m == pytest.approx(0.80)
    assert s == pytest.approx(0.10)  # sample std: sqrt((0.01 + 0 + 0.01) / 2)
    m, s, n = compare.mean_std([0.5, float("nan"), None])
    assert (m, n) == (0.5, 1) and math.isnan(s)
    m, s, n = compare.mean_std([])
    assert n == 0 and math.isnan(m)


def test_fmt_mean_std():
    assert compare.fmt_mean_std(0.8, 0.1) == "0.800 ± 0.100"
    assert compare.fmt_mean_std(0.81234, float("nan")) == "0.812"
    assert compare.fmt_mean_std(float("nan"), 0.1) == "-"


SPECS = [
    {"key": "a", "label": "Metric A", "task": "t", "path": ["a"]},
    {"key": "b", "label": "Metric B", "task": "t", "path": ["b"]},
]
METHODS = ["random_init", "convirt", "place"]
RAW = {
    "random_init": {"0": {"a": 0.50, "b": 0.10}, "1": {"a": 0.52, "b": 0.12}},
    "convirt": {"0": {"a": 0.60, "b": 0.30}, "1": {"a": 0.64, "b": 0.34}},
    "place": {"0": {"a": 0.70, "b": 0.31}, "1": {"a": 0.72, "b": 0.35}},
}


def test_aggregate_and_extract():
    agg = compare.aggregate(RAW, SPECS, METHODS, [0, 1])
    assert agg["convirt"]["a"]["mean"] == pytest.approx(0.62)
    assert agg["convirt"]["a"]["std"] == pytest.approx(math.sqrt(2 * 0.02**2))
    assert agg["place"]["b"]["values"] == [0.31, 0.35]
    assert compare.extract_metric({"x": {"P@1": 0.25}}, ["x", "P@1"]) == 0.25
    assert math.isnan(compare.extract_metric({"x": {}}, ["x", "P@1"]))
    assert math.isnan(compare.extract_metric({"x": None}, ["x"]))


def test_winner_logic_and_sentences():
    agg = compare.aggregate(RAW, SPECS, METHODS, [0, 1])
    wa = compare.metric_winner(agg, "a", METHODS)
    # place 0.71 vs convirt 0.62: gap 0.09 > stds (~0.014, ~0.028) -> a clear win.
    assert wa["best"] == "place" and wa["clear"] and wa["runner_up"] == "convirt"
    assert wa["margin"] == pytest.approx(0.09)
    wb = compare.metric_winner(agg, "b", METHODS)
    # place 0.33 vs convirt 0.32 with std 0.028: not separated.
    assert wb["best"] == "place" and wb["tied"] == ["convirt"] and not wb["clear"]
    lines = compare.winner_sentences(agg, SPECS, METHODS)
    assert lines[0] == (
        "- **Metric A**: PLACE is best (0.710 ± 0.014), ahead of ConVIRT (0.620 ± 0.028) "
        "by more than one std."
    )
    assert lines[1] == (
        "- **Metric B**: PLACE is best (0.330 ± 0.028), but within one std of ConVIRT "
        "(0.320 ± 0.028): not separated."
    )
    para = compare.summary_paragraph(agg, SPECS, METHODS)
    assert "out of 2 metrics: PLACE 2 (1 clearly)." in para
    assert "PLACE has the higher mean than ConVIRT on 2 of 2 metrics." in para
    assert "beats the random-init encoder on 2 of 2 metrics" in para


def test_winner_when_place_loses():
    raw = {m: {"0": dict(v["0"])} for m, v in RAW.items()}
    raw["convirt"]["0"]["a"] = 0.9
    agg = compare.aggregate(raw, SPECS, METHODS, [0])
    w = compare.metric_winner(agg, "a", METHODS)
    assert w["best"] == "convirt" and w["clear"]  # one seed: std counts as 0
    para = compare.summary_paragraph(agg, SPECS, METHODS)
    assert "PLACE has the higher mean than ConVIRT on 1 of 2 metrics." in para
    assert "ConVIRT 1 (1 clearly), PLACE 1 (1 clearly)" in para


def test_tiny_gaps_are_ties():
    raw = {"random_init": {"0": {"a": 0.0001}}, "convirt": {"0": {"a": 0.0}}, "place": {}}
    agg = compare.aggregate(raw, SPECS[:1], METHODS, [0])
    w = compare.metric_winner(agg, "a", METHODS)
    assert w["best"] == "random_init" and w["tied"] == ["convirt"] and not w["clear"]


def test_chance_values():
    lin, zs_acc, p1 = (
        {"chance": 0.5},
        {"chance": "uniform"},
        {"chance": ["chance", "P@1"]},
    )
    assert compare.chance_value(lin, {}) == 0.5
    result = {"multiclass": {"classes": {"A": 3, "B": 0, "C": 1, "D": 2}}}
    assert compare.chance_value(zs_acc, result) == pytest.approx(1 / 3)  # 3 classes present
    assert compare.chance_value(p1, {"chance": {"P@1": 0.25}}) == 0.25
    assert math.isnan(compare.chance_value({"chance": None}, {}))


def test_markdown_table_bolds_the_best():
    agg = compare.aggregate(RAW, SPECS, METHODS, [0, 1])
    table = compare.markdown_table(agg, SPECS, METHODS).splitlines()
    assert table[0] == "| Method | Metric A | Metric B |"
    assert table[1] == "|---|---|---|"
    assert table[2] == "| Random init | 0.510 ± 0.014 | 0.110 ± 0.014 |"
    assert table[4] == "| PLACE | **0.710 ± 0.014** | **0.330 ± 0.028** |"
    with_chance = compare.markdown_table(agg, SPECS, METHODS, {"a": 0.5, "b": float("nan")})
    assert with_chance.splitlines()[-1] == "| *chance* | *0.500* |  |"


def test_metric_specs_follow_the_tasks():
    cfg = compare.validate(_raw_config())
    keys = [s["key"] for s in compare.metric_specs(cfg)]
    assert keys == ["linear_auroc_10%", "linear_auroc_100%", "i2t_p1", "i2t_p5", "i2t_p10"]
    spec = compare.metric_specs(cfg)[1]
    result = {"fractions": {"1": {"macro_auroc": 0.75}}}
    assert compare.extract_metric(result, spec["path"]) == 0.75


def test_write_report_from_stored_results(tmp_path):
    """Stored task records -> compare.md/json/png; a stale settings key is not reused."""
    cfg = compare.validate(
        _raw_config(methods=["random_init", "place"], seeds=2, tasks={"retrieval": {}})
    )
    work = str(tmp_path / "work")
    vals = {("random_init", 0): 0.2, ("random_init", 1): 0.3, ("place", 0): 0.5, ("place", 1): 0.7}
    for (m, s), v in vals.items():
        p = compare.result_path(work, m, s, "retrieval")
        os.makedirs(os.path.dirname(p))
        key = compare.task_key(cfg, "retrieval") if (m, s) != ("place", 1) else "stale"
        rec = {
            "settings_key": key,
            "wall_seconds": 2.0,
            "result": {
                "image_to_text": {"P@1": v, "P@5": v, "P@10": v},
                "chance": {"P@1": 0.2, "P@5": 0.2, "P@10": v},
            },
        }
        with open(p, "w") as f:
            json.dump(rec, f)
    assert compare.pending(cfg, work) == [("place", 1)]
    out = str(tmp_path / "out")
    report = compare.write_report(cfg, work, out, "tools/compare.py --config x", 12.0)
    assert report["aggregate"]["random_init"]["i2t_p1"]["mean"] == pytest.approx(0.25)
    assert report["aggregate"]["place"]["i2t_p1"]["n"] == 1
    assert report["failures"] == ["missing: place seed 1 retrieval"]
    md = open(os.path.join(out, "compare.md")).read()
    assert "| PLACE | **0.500** | **0.500** | **0.500** |" in md
    assert "| Random init | 0.250 ± 0.071 |" in md
    assert "missing: place seed 1 retrieval" in md
    # Chance row: the mean of the stored results' chance levels (P@10: (0.2+0.3+0.5)/3).
    assert "| *chance* | *0.200* | *0.200* | *0.333* |" in md
    assert report["chance"]["i2t_p10"] == pytest.approx(1 / 3)
    data = json.load(open(os.path.join(out, "compare.json")))
    assert data["raw"]["place"]["1"] == {}
    assert data["wall"]["task_seconds"] == pytest.approx(6.0)
    with open(os.path.join(out, "compare_retrieval.png"), "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    # End-to-end wall time: the invocations that ran workers add up; a report-only one does not.
    assert data["wall"]["invocations"] == 0 and data["wall"]["invocations_seconds"] == 12.0
    compare.record_invocation(work, cfg, 0.0, 100.0, ran=3)
    compare.record_invocation(work, cfg, 0.0, 5.0, ran=0)
    compare.record_invocation(work, cfg, 0.0, 50.5, ran=1)
    report = compare.write_report(cfg, work, out, "x", 1.0)
    assert report["wall"]["invocations"] == 2
    assert report["wall"]["invocations_seconds"] == pytest.approx(150.5)
    assert (
        "- end to end: 2.5 min over 2 invocation(s)" in open(os.path.join(out, "compare.md")).read()
    )


# ------------------------------------------------------------------ end to end
TINY = """\
corpus: {{dir: {corpus}, images: 60, image_size: 32, seed: 0}}
methods: [random_init, place]
seeds: 2
pretrain:
  max_length: 32
  patch_size: 8
  vit_layers: 1
  vit_heads: 2
  vit_width: 32
  vit_mlp: 64
  text_layers: 1
  text_heads: 2
  text_width: 32
  text_mlp: 64
  embed_dim: 16
  num_queries: 4
  query_layers: 1
  query_heads: 2
  query_width: 32
  cce_decoder_layers: 1
  cce_decoder_width: 32
  num_prototypes: 8
  per_replica_batch: 8
  max_steps: 50
  warmup_steps: 2
  checkpoint_every: 100
  jit_compile: false
tasks:
  linear: {{fractions: [1.0], epochs: 3}}
  retrieval: {{per_class: 20}}
work_dir: {work}
output: {out}
"""


@pytest.mark.slow
def test_quick_end_to_end_and_resume(tmp_path):
    cfg_path = tmp_path / "tiny.yaml"
    work, out = tmp_path / "work", tmp_path / "out"
    cfg_path.write_text(TINY.format(corpus=tmp_path / "corpus", work=work, out=out))
    assert compare.main(["--config", str(cfg_path), "--quick"]) == 0
    data = json.load(open(out / "compare.json"))
    assert data["config"]["seeds"] == [0] and data["config"]["pretrain"]["max_steps"] == 8
    pre = data["results"]["place"]["0"]["pretrain"]
    assert pre["steps"] == 8
    for m in ("random_init", "place"):
        auroc = data["raw"][m]["0"]["linear_auroc_100%"]
        assert 0.0 <= auroc <= 1.0
        assert 0.0 <= data["raw"][m]["0"]["i2t_p1"] <= 1.0
    md = (out / "compare.md").read_text()
    assert "| Random init |" in md and "| PLACE |" in md and "## Who wins each metric" in md
    assert (out / "compare_linear.png").read_bytes()[:4] == b"\x89PNG"
    assert (out / "compare_retrieval.png").read_bytes()[:4] == b"\x89PNG"
    # Resume: everything is stored, so a second invocation runs no worker.
    stamp = os.path.getmtime(compare.result_path(str(work), "place", 0, "linear"))
    assert compare.main(["--config", str(cfg_path), "--quick"]) == 0
    assert os.path.getmtime(compare.result_path(str(work), "place", 0, "linear")) == stamp
    wall = json.load(open(out / "compare.json"))["wall"]
    assert wall["reused_results"] == 2 and wall["invocations"] == 1
