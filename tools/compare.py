"""Method comparison on one SynthCXR corpus: random init, ConVIRT, MGCA, PLACE and its ablations.

  tools/run python tools/compare.py --config configs/compare_synth.yaml [--seeds N] [--quick]
      [--output results] [--work_dir runs/compare]

Every method is pre-trained on the SAME corpus with the same budget (steps, batch, learning
rate, model size) and seeds; "random_init" is the same model untrained. Each pre-trained model
then runs every downstream task of the config with small fixed budgets. Output:
  <output>/compare.md    table (rows = methods, cells mean ± sample std over seeds), the
                         config, wall time, and which method wins each metric (from the numbers)
  <output>/compare.json  every raw number (per method, seed and task)
  <output>/compare_<task>.png  bar plots (mean, error bar = std)

Robustness: each (method, seed) runs in its own subprocess (TensorFlow global state, memory
and a crash stay inside it); the parent never imports TensorFlow. Every (method, seed, task)
result is a JSON file under <work_dir>/results/ and a model's training run lives under
<work_dir>/models/ (the trainer resumes from its checkpoints), so an interrupted comparison
continues where it stopped. A result is reused only if it was computed with the same settings
(a hash of the corpus, pre-training and task settings is stored with it).
"""

from __future__ import annotations

import argparse
import copy
import datetime
import hashlib
import json
import math
import os
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
    sys.path.insert(0, REPO)

from place_tf import fileio  # noqa: E402
from place_tf.evaluate.__main__ import TASKS as EVALUATE_TASKS  # noqa: E402
from place_tf.objectives import OBJECTIVE_TABLE  # noqa: E402

# The untrained baseline, then every pre-training objective (place_tf/objectives.py).
METHODS = ("random_init", *OBJECTIVE_TABLE)
METHOD_LABELS = {"random_init": "Random init", **{n: o.label for n, o in OBJECTIVE_TABLE.items()}}
# Every task of `python -m place_tf.evaluate` (a stdlib-only module) but full fine-tuning,
# which the comparison leaves out (it measures the frozen pre-trained encoders).
TASKS = tuple(t for t in EVALUATE_TASKS if t != "finetune")


class ConfigError(ValueError):
    """A comparison config problem; the message names the file and the key."""


# ------------------------------------------------------------------ config
def _pos_int(v):
    return isinstance(v, int) and not isinstance(v, bool) and v >= 1


def _nonneg_int(v):
    return isinstance(v, int) and not isinstance(v, bool) and v >= 0


def _pos_float(v):
    return isinstance(v, int | float) and not isinstance(v, bool) and v > 0


def _fraction(v):
    return isinstance(v, int | float) and not isinstance(v, bool) and 0 < v <= 1


def _fractions(v):
    return isinstance(v, list) and len(v) > 0 and all(_fraction(x) for x in v)


def _str(v):
    return isinstance(v, str) and bool(v)


_CHECKS = {
    _pos_int: "a positive integer",
    _nonneg_int: "an integer >= 0",
    _pos_float: "a positive number",
    _fraction: "a number in (0, 1]",
    _fractions: "a non-empty list of numbers in (0, 1]",
    _str: "a non-empty string",
}

# Options each task accepts (passed to its entry point as keyword arguments).
TASK_OPTIONS = {
    "linear": {
        "fractions": _fractions,
        "epochs": _pos_int,
        "patience": _pos_int,
        "batch_size": _pos_int,
        "learning_rate": _pos_float,
    },
    "zero_shot": {"per_class": _pos_int, "batch_size": _pos_int},
    "retrieval": {"per_class": _pos_int, "batch_size": _pos_int},
    "localization": {"batch_size": _pos_int},
    "segmentation": {
        "epochs": _pos_int,
        "batch_size": _pos_int,
        "fraction": _fraction,
        "learning_rate": _pos_float,
        "decoder_width": _pos_int,
        "target": _str,
    },
    "detection": {
        "epochs": _pos_int,
        "batch_size": _pos_int,
        "fraction": _fraction,
        "learning_rate": _pos_float,
        "head_width": _pos_int,
        "labels": _str,
    },
    "report_generation": {
        "epochs": _pos_int,
        "batch_size": _pos_int,
        "fraction": _fraction,
        "learning_rate": _pos_float,
        "width": _pos_int,
        "num_layers": _pos_int,
        "num_heads": _pos_int,
        "intermediate_dim": _pos_int,
        "num_beams": _pos_int,
        "max_test_examples": _nonneg_int,
        "max_decode_length": _pos_int,
    },
}
CORPUS_KEYS = {"dir": _str, "images": _pos_int, "image_size": _pos_int, "seed": _nonneg_int}
# Pre-training settings the runner sets itself (per method / seed / corpus).
RUNNER_SET = ("corpus_dir", "model_dir", "seed", "image_size", "train_files", "eval_files")
TOP_KEYS = (
    "corpus",
    "methods",
    "seeds",
    "pretrain",
    "tasks",
    "work_dir",
    "output",
    "jobs",
    "quick",
)
QUICK_KEYS = {"steps": _pos_int, "epochs": _pos_int, "seeds": _pos_int}
DEFAULT_QUICK = {"steps": 8, "epochs": 1, "seeds": 1}


def _check(where: str, value, check) -> None:
    if not check(value):
        raise ConfigError(f"{where}: expected {_CHECKS[check]}, got {value!r}")


def _check_pretrain(where: str, pretrain: dict) -> None:
    """Names and value types of the flat training settings (place_tf.config fields)."""
    import dataclasses

    from place_tf import config as config_lib

    defaults = {}
    for cls in config_lib.SECTIONS.values():
        for f in dataclasses.fields(cls):
            d = f.default if f.default is not dataclasses.MISSING else f.default_factory()
            defaults.setdefault(f.name, d)
    known = config_lib.field_names()
    for key, value in pretrain.items():
        path = f"{where}: pretrain.{key}"
        if key in RUNNER_SET:
            raise ConfigError(f"{path}: set by the runner (per method/seed/corpus); remove it")
        if key not in known:
            raise ConfigError(f"{path}: unknown training setting (see place_tf/config.py)")
        d = defaults[key]
        ok = (
            isinstance(value, bool)
            if isinstance(d, bool)
            else (isinstance(value, int) and not isinstance(value, bool))
            if isinstance(d, int)
            else (isinstance(value, int | float) and not isinstance(value, bool))
            if isinstance(d, float)
            else isinstance(value, str)
        )
        if not ok:
            raise ConfigError(f"{path}: expected {type(d).__name__}, got {value!r}")
    if not pretrain.get("max_steps"):
        raise ConfigError(f"{where}: pretrain.max_steps: required (the shared step budget)")


def validate(raw, where: str = "config") -> dict:
    """Check a loaded YAML mapping; return the normalised config (seeds as a list, every
    section present). Every error is a ConfigError naming `where` and the key."""
    if not isinstance(raw, dict):
        raise ConfigError(f"{where}: expected a mapping at the top level, got {type(raw).__name__}")
    unknown = sorted(set(raw) - set(TOP_KEYS))
    if unknown:
        raise ConfigError(f"{where}: unknown top-level key(s) {unknown} (allowed: {TOP_KEYS})")
    cfg: dict = {}
    corpus = raw.get("corpus")
    if not isinstance(corpus, dict):
        raise ConfigError(f"{where}: corpus: required mapping (dir, images, image_size, seed)")
    for key in corpus:
        if key not in CORPUS_KEYS:
            raise ConfigError(f"{where}: corpus.{key}: unknown key (allowed: {list(CORPUS_KEYS)})")
    for key in ("dir", "images", "image_size"):
        if key not in corpus:
            raise ConfigError(f"{where}: corpus.{key}: required")
    for key, value in corpus.items():
        _check(f"{where}: corpus.{key}", value, CORPUS_KEYS[key])
    cfg["corpus"] = {"seed": 0, **corpus}

    methods = raw.get("methods", list(METHODS))
    if not isinstance(methods, list) or not methods:
        raise ConfigError(f"{where}: methods: expected a non-empty list, got {methods!r}")
    for i, m in enumerate(methods):
        if m not in METHODS:
            raise ConfigError(f"{where}: methods[{i}]: unknown method {m!r} (known: {METHODS})")
    if len(set(methods)) != len(methods):
        raise ConfigError(f"{where}: methods: a method is listed twice")
    cfg["methods"] = list(methods)

    seeds = raw.get("seeds", 3)
    if isinstance(seeds, list):
        if not seeds or not all(_nonneg_int(s) for s in seeds) or len(set(seeds)) != len(seeds):
            raise ConfigError(f"{where}: seeds: expected distinct integers >= 0, got {seeds!r}")
        cfg["seeds"] = list(seeds)
    else:
        _check(f"{where}: seeds", seeds, _pos_int)
        cfg["seeds"] = list(range(seeds))

    pretrain = raw.get("pretrain")
    if not isinstance(pretrain, dict):
        raise ConfigError(f"{where}: pretrain: required mapping of training settings")
    _check_pretrain(where, pretrain)
    cfg["pretrain"] = dict(pretrain)

    tasks = raw.get("tasks")
    if not isinstance(tasks, dict) or not tasks:
        raise ConfigError(f"{where}: tasks: required non-empty mapping task -> options")
    cfg["tasks"] = {}
    for name, opts in tasks.items():
        if name not in TASK_OPTIONS:
            raise ConfigError(f"{where}: tasks.{name}: unknown task (known: {TASKS})")
        opts = {} if opts is None else opts
        if not isinstance(opts, dict):
            raise ConfigError(f"{where}: tasks.{name}: expected a mapping of options")
        for key, value in opts.items():
            if key not in TASK_OPTIONS[name]:
                raise ConfigError(
                    f"{where}: tasks.{name}.{key}: unknown option "
                    f"(allowed: {sorted(TASK_OPTIONS[name])})"
                )
            _check(f"{where}: tasks.{name}.{key}", value, TASK_OPTIONS[name][key])
        cfg["tasks"][name] = dict(opts)

    for key in ("work_dir", "output"):
        if key in raw:
            _check(f"{where}: {key}", raw[key], _str)
    cfg["work_dir"] = raw.get("work_dir", "runs/compare")
    cfg["output"] = raw.get("output", "results")
    _check(f"{where}: jobs", raw.get("jobs", 1), _pos_int)
    cfg["jobs"] = raw.get("jobs", 1)
    quick = raw.get("quick") or {}
    if not isinstance(quick, dict):
        raise ConfigError(f"{where}: quick: expected a mapping")
    for key, value in quick.items():
        if key not in QUICK_KEYS:
            raise ConfigError(f"{where}: quick.{key}: unknown key (allowed: {list(QUICK_KEYS)})")
        _check(f"{where}: quick.{key}", value, QUICK_KEYS[key])
    cfg["quick"] = {**DEFAULT_QUICK, **quick}
    return cfg


def load_config(path: str) -> dict:
    """yaml.safe_load + validate; errors name the file and the key."""
    import yaml

    try:
        with open(path) as f:
            raw = yaml.safe_load(f)
    except OSError as e:
        raise ConfigError(f"{path}: cannot read ({e})") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML ({e})") from None
    return validate(raw, path)


def apply_overrides(cfg: dict, seeds: int | None = None, quick: bool = False) -> dict:
    """--quick: the quick step/epoch/seed budget; --seeds N: seeds 0..N-1."""
    cfg = copy.deepcopy(cfg)
    if quick:
        q = cfg["quick"]
        cfg["seeds"] = cfg["seeds"][: q["seeds"]]
        cfg["pretrain"]["max_steps"] = min(cfg["pretrain"]["max_steps"], q["steps"])
        if "warmup_steps" in cfg["pretrain"]:
            cfg["pretrain"]["warmup_steps"] = min(cfg["pretrain"]["warmup_steps"], q["steps"] // 2)
        for opts in cfg["tasks"].values():
            if "epochs" in opts:
                opts["epochs"] = min(opts["epochs"], q["epochs"])
    if seeds is not None:
        if seeds < 1:
            raise ConfigError(f"--seeds: expected a positive integer, got {seeds}")
        cfg["seeds"] = list(range(seeds))
    return cfg


def settings_hash(*parts) -> str:
    blob = json.dumps(parts, sort_keys=True, default=str).encode()
    return hashlib.sha1(blob).hexdigest()[:10]


def pretrain_key(cfg: dict) -> str:
    """Keys stored models and results: a new SynthCXR generator version is a new corpus,
    so results measured on the old one are never reused after an upgrade."""
    from place_tf.data import synthetic  # numpy and Pillow only, no TensorFlow

    made_by = {
        "generator": synthetic.GENERATOR_NAME,
        "version": synthetic.GENERATOR_VERSION,
        "render_size": synthetic.render_size(cfg["corpus"]["image_size"]),
    }
    return settings_hash(cfg["corpus"], made_by, cfg["pretrain"])


def task_key(cfg: dict, task: str) -> str:
    return settings_hash(pretrain_key(cfg), task, cfg["tasks"][task])


def result_path(work_dir: str, method: str, seed: int, task: str) -> str:
    return os.path.join(work_dir, "results", method, f"seed{seed}", f"{task}.json")


def model_dir(work_dir: str, cfg: dict, method: str, seed: int) -> str:
    return os.path.join(work_dir, "models", f"{method}_seed{seed}_{pretrain_key(cfg)}")


def read_done(path: str, key: str) -> dict | None:
    """The stored task record if it exists and was computed with settings `key`."""
    try:
        with open(path) as f:
            rec = json.load(f)
    except (OSError, json.JSONDecodeError):
        return None
    return rec if rec.get("settings_key") == key else None


# ------------------------------------------------------------------ metrics
def _pct(f: float) -> str:
    return f"{f * 100:g}%"


def metric_specs(cfg: dict) -> list[dict]:
    """The table columns: key, label, task and the path into the task's result dict."""
    out = []
    t = cfg["tasks"]
    if "linear" in t:
        for f in t["linear"].get("fractions", [0.01, 0.1, 1.0]):
            out.append(
                {
                    "key": f"linear_auroc_{_pct(f)}",
                    "label": f"Linear AUROC {_pct(f)}",
                    "task": "linear",
                    "path": ["fractions", f"{f:g}", "macro_auroc"],
                    "chance": 0.5,
                }
            )
    # (task, key, label, path, chance: a constant, a path into the result, or None)
    table = [
        ("zero_shot", "zero_shot_auroc", "Zero-shot AUROC", ["multilabel", "macro_auroc"], 0.5),
        ("zero_shot", "zero_shot_acc", "Zero-shot acc", ["multiclass", "accuracy"], "uniform"),
        ("retrieval", "i2t_p1", "I→T P@1", ["image_to_text", "P@1"], ["chance", "P@1"]),
        ("retrieval", "i2t_p5", "I→T P@5", ["image_to_text", "P@5"], ["chance", "P@5"]),
        ("retrieval", "i2t_p10", "I→T P@10", ["image_to_text", "P@10"], ["chance", "P@10"]),
        (
            "localization",
            "loc_pointing",
            "Loc. pointing",
            ["mean", "pointing_game"],
            ["mean", "chance_pointing"],
        ),
        ("localization", "loc_iou", "Loc. IoU", ["mean", "iou"], ["mean", "chance_iou"]),
        ("segmentation", "seg_dice", "Seg. Dice", ["dice"], None),
        ("detection", "det_map", "Det. mAP", ["map"], None),
        ("report_generation", "bleu_4", "BLEU-4", ["bleu_4"], None),
        ("report_generation", "rouge_l", "ROUGE-L", ["rouge_l"], None),
    ]
    for task, key, label, path, chance in table:
        if task in t:
            out.append({"key": key, "label": label, "task": task, "path": path, "chance": chance})
    return out


def chance_value(spec: dict, result: dict) -> float:
    """The metric's chance level for one task result (NaN when it has none)."""
    c = spec.get("chance")
    if c is None:
        return float("nan")
    if isinstance(c, int | float):
        return float(c)
    if c == "uniform":  # a uniform guess over the classes present
        classes = [k for k, v in (result.get("multiclass", {}).get("classes") or {}).items() if v]
        return 1.0 / len(classes) if classes else float("nan")
    return extract_metric(result, c)


def extract_metric(result: dict, path: list[str]) -> float:
    x = result
    for p in path:
        if not isinstance(x, dict) or p not in x:
            return float("nan")
        x = x[p]
    try:
        return float(x) if x is not None else float("nan")
    except (TypeError, ValueError):
        return float("nan")


def mean_std(values) -> tuple[float, float, int]:
    """(mean, sample std with ddof=1, n) over the finite values; std is NaN for n < 2."""
    xs = [float(v) for v in values if v is not None and math.isfinite(float(v))]
    n = len(xs)
    if n == 0:
        return float("nan"), float("nan"), 0
    m = sum(xs) / n
    if n < 2:
        return m, float("nan"), n
    var = sum((x - m) ** 2 for x in xs) / (n - 1)
    return m, math.sqrt(var), n


def fmt_mean_std(mean: float, std: float, digits: int = 3) -> str:
    """'0.812 ± 0.010'; just the mean when std is NaN (one seed); '-' without values."""
    if mean is None or not math.isfinite(mean):
        return "-"
    if std is None or not math.isfinite(std):
        return f"{mean:.{digits}f}"
    return f"{mean:.{digits}f} ± {std:.{digits}f}"


def aggregate(raw: dict, specs: list[dict], methods, seeds) -> dict:
    """{method: {metric key: {"mean", "std", "n", "values"}}} from raw[method][seed][key]."""
    out = {}
    for m in methods:
        out[m] = {}
        for s in specs:
            vals = [raw.get(m, {}).get(str(seed), {}).get(s["key"], float("nan")) for seed in seeds]
            mean, std, n = mean_std(vals)
            out[m][s["key"]] = {"mean": mean, "std": std, "n": n, "values": vals}
    return out


# ------------------------------------------------------------------ winners
def _std0(x: float) -> float:
    return x if x is not None and math.isfinite(x) else 0.0


TIE_TOLERANCE = 0.0005  # a gap that does not show at 3 decimals is no win


def metric_winner(agg: dict, key: str, methods) -> dict | None:
    """Best method on `key` (higher is better) and who is within noise of it.

    A method is "within noise" of the best when the gap of the means is at most the larger
    of the two standard deviations (no std, e.g. one seed, counts as 0) or TIE_TOLERANCE."""
    ranked = [(agg[m][key]["mean"], m) for m in methods if math.isfinite(agg[m][key]["mean"])]
    if not ranked:
        return None
    ranked.sort(key=lambda t: -t[0])
    best_mean, best = ranked[0]
    best_std = _std0(agg[best][key]["std"])
    tied = [
        m
        for mean, m in ranked[1:]
        if best_mean - mean <= max(best_std, _std0(agg[m][key]["std"]), TIE_TOLERANCE)
    ]
    runner = ranked[1][1] if len(ranked) > 1 else None
    margin = best_mean - ranked[1][0] if len(ranked) > 1 else float("nan")
    return {"best": best, "tied": tied, "runner_up": runner, "margin": margin, "clear": not tied}


def winner_sentences(agg: dict, specs: list[dict], methods) -> list[str]:
    """One sentence per metric, written from the numbers."""
    lines = []
    for s in specs:
        w = metric_winner(agg, s["key"], methods)
        if w is None:
            lines.append(f"- **{s['label']}**: no result.")
            continue
        b = agg[w["best"]][s["key"]]
        head = (
            f"- **{s['label']}**: {METHOD_LABELS[w['best']]} is best "
            f"({fmt_mean_std(b['mean'], b['std'])})"
        )
        if w["runner_up"] is None:
            lines.append(head + ".")
        elif w["clear"]:
            r = agg[w["runner_up"]][s["key"]]
            lines.append(
                head + f", ahead of {METHOD_LABELS[w['runner_up']]} "
                f"({fmt_mean_std(r['mean'], r['std'])}) by more than one std."
            )
        else:
            tied = ", ".join(
                f"{METHOD_LABELS[m]} ({fmt_mean_std(agg[m][s['key']]['mean'], agg[m][s['key']]['std'])})"
                for m in w["tied"]
            )
            lines.append(head + f", but within one std of {tied}: not separated.")
    return lines


def summary_paragraph(agg: dict, specs: list[dict], methods) -> str:
    """Who wins how many metrics, PLACE vs each method, and what pre-training bought."""
    if not specs:
        return "No metrics."
    wins: dict[str, int] = {m: 0 for m in methods}
    clear: dict[str, int] = {m: 0 for m in methods}
    for s in specs:
        w = metric_winner(agg, s["key"], methods)
        if w:
            wins[w["best"]] += 1
            clear[w["best"]] += int(w["clear"])
    n = len(specs)
    parts = []
    order = sorted(methods, key=lambda m: (-wins[m], methods.index(m)))
    tally = ", ".join(
        f"{METHOD_LABELS[m]} {wins[m]} ({clear[m]} clearly)" for m in order if wins[m]
    )
    parts.append(f"Best mean per metric, out of {n} metrics: {tally or 'none'}.")
    if "place" in methods:
        for other in methods:
            if other == "place":
                continue
            higher = sum(
                1
                for s in specs
                if math.isfinite(agg["place"][s["key"]]["mean"])
                and math.isfinite(agg[other][s["key"]]["mean"])
                and agg["place"][s["key"]]["mean"] > agg[other][s["key"]]["mean"]
            )
            comparable = sum(
                1
                for s in specs
                if math.isfinite(agg["place"][s["key"]]["mean"])
                and math.isfinite(agg[other][s["key"]]["mean"])
            )
            parts.append(
                f"PLACE has the higher mean than {METHOD_LABELS[other]} on {higher} of "
                f"{comparable} metrics."
            )
    if "random_init" in methods:
        pre = [m for m in methods if m != "random_init"]
        beaten = sum(
            1
            for s in specs
            if math.isfinite(agg["random_init"][s["key"]]["mean"])
            and any(
                math.isfinite(agg[m][s["key"]]["mean"])
                and agg[m][s["key"]]["mean"] > agg["random_init"][s["key"]]["mean"]
                for m in pre
            )
        )
        if pre:
            parts.append(
                f"At least one pre-trained model beats the random-init encoder on {beaten} of "
                f"{n} metrics."
            )
    return " ".join(parts)


# ------------------------------------------------------------------ outputs
def markdown_table(agg: dict, specs: list[dict], methods, chance: dict | None = None) -> str:
    """Rows = methods, columns = metrics, mean ± std; the best mean per column in bold; a
    last row with each metric's chance level when `chance` ({key: value}) is given."""
    head = ["Method"] + [s["label"] for s in specs]
    lines = ["| " + " | ".join(head) + " |", "|---" * len(head) + "|"]
    best = {s["key"]: (metric_winner(agg, s["key"], methods) or {}).get("best") for s in specs}
    for m in methods:
        cells = [METHOD_LABELS[m]]
        for s in specs:
            a = agg[m][s["key"]]
            c = fmt_mean_std(a["mean"], a["std"])
            cells.append(f"**{c}**" if best[s["key"]] == m else c)
        lines.append("| " + " | ".join(cells) + " |")
    if chance:
        cells = ["*chance*"] + [
            f"*{chance[s['key']]:.3f}*" if math.isfinite(chance.get(s["key"], float("nan"))) else ""
            for s in specs
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _minutes(seconds: float) -> str:
    return f"{seconds / 60:.1f} min"


def write_markdown(path: str, report: dict) -> str:
    import yaml

    cfg = report["config"]
    specs, methods, seeds = report["metrics"], cfg["methods"], cfg["seeds"]
    agg = report["aggregate"]
    linear = cfg["tasks"].get("linear")
    lines = [
        "# Method comparison on SynthCXR",
        "",
        f"Generated by `{report['command']}` on {report['finished']}. "
        f"{len(seeds)} seed(s) {seeds}; every cell is the mean ± sample standard deviation "
        "(ddof = 1) over seeds (a single value when only one seed finished). Higher is better "
        "for every metric; the best mean per column is in bold.",
        "",
        "Every method is pre-trained on the same corpus with the same budget "
        f"({cfg['pretrain']['max_steps']} steps, batch {cfg['pretrain'].get('per_replica_batch')}, "
        f"learning rate {cfg['pretrain'].get('learning_rate')}, the same model size); "
        "*Random init* is the same model without any training. The seed sets both the "
        "pre-training and the downstream heads.",
        "",
        markdown_table(agg, specs, methods, report.get("chance")),
        "",
        "*chance*: what an uninformative model scores (AUROC 0.5; zero-shot accuracy of a "
        "uniform guess; retrieval precision of a random ranking and the pointing game / IoU of "
        "a random point / region, averaged over the stored results). Chance-level cells mean "
        "the budget was too small for that task to separate anything.",
        "",
    ]
    if linear is not None:
        fr = ", ".join(_pct(f) for f in linear.get("fractions", [0.01, 0.1, 1.0]))
        lines.append(
            f"Linear probe: frozen image features, label fractions {fr} of the training split, "
            "macro AUROC over the CheXpert competition labels."
        )
    lines += [
        "Zero-shot: prompt-ensemble AUROC (multi-label) and single-label accuracy; retrieval: "
        "image-to-text precision@K on the 5×N single-label subset; localization: pointing "
        "game / top-10 % IoU of the best pathology query's attention (chosen on validation); "
        "segmentation Dice, detection mAP@[0.40:0.75], report-generation BLEU-4 / ROUGE-L "
        "with frozen encoders and small heads.",
        "",
        "## Who wins each metric",
        "",
        "Written from the numbers above. A method is *within noise* of the best when the gap "
        "between their means is at most the larger of their standard deviations (or below "
        f"{TIE_TOLERANCE}, invisible at three decimals).",
        "",
        summary_paragraph(agg, specs, methods),
        "",
        *winner_sentences(agg, specs, methods),
        "",
    ]
    if report.get("failures"):
        lines += ["## Failures", ""]
        lines += [f"- {f}" for f in report["failures"]]
        lines.append("")
    w = report["wall"]
    lines += [
        "## Wall time",
        "",
        f"- end to end: {_minutes(w['invocations_seconds'])} over {w['invocations']} "
        "invocation(s) of the runner with these settings (an interrupted run resumed counts "
        "each part)",
        f"- this invocation: {_minutes(w['this_invocation_seconds'])} "
        f"({w['reused_results']} (method, seed) runs were already complete at the start)",
        f"- compute summed over every stored result (pre-training + tasks): "
        f"{_minutes(w['pretrain_seconds'] + w['task_seconds'])} "
        f"(pre-training {_minutes(w['pretrain_seconds'])}, tasks {_minutes(w['task_seconds'])})",
        f"- machine: {report['machine']}",
        "",
        "Per method (mean over seeds, seconds): "
        + "; ".join(
            f"{METHOD_LABELS[m]} pre-train {w['per_method'][m]['pretrain']:.0f}, "
            f"tasks {w['per_method'][m]['tasks']:.0f}"
            for m in methods
        ),
        "",
        "## Config",
        "",
        "```yaml",
        yaml.safe_dump(cfg, sort_keys=False).rstrip(),
        "```",
        "",
        f"Raw numbers: `{os.path.basename(report['json'])}`; plots: "
        + ", ".join(f"`{os.path.basename(p)}`" for p in report["plots"]),
        "",
    ]
    text = "\n".join(lines)
    with open(path, "w") as f:
        f.write(text)
    return text


def write_plots(
    out_dir: str, agg: dict, specs: list[dict], methods, chance: dict | None = None
) -> list[str]:
    """One PNG per task: a panel per metric, a bar per method (error bar = std), a dashed
    line at the chance level when known."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    tasks = []
    for s in specs:
        if s["task"] not in tasks:
            tasks.append(s["task"])
    colors = plt.get_cmap("tab10")
    for task in tasks:
        group = [s for s in specs if s["task"] == task]
        fig, axes = plt.subplots(1, len(group), figsize=(3.6 * len(group), 3.4), squeeze=False)
        for ax, s in zip(axes[0], group, strict=True):
            means = [agg[m][s["key"]]["mean"] for m in methods]
            stds = [_std0(agg[m][s["key"]]["std"]) for m in methods]
            x = range(len(methods))
            ax.bar(
                x,
                [v if math.isfinite(v) else 0.0 for v in means],
                yerr=stds,
                capsize=3,
                color=[colors(i % 10) for i in range(len(methods))],
            )
            ax.set_xticks(list(x))
            ax.set_xticklabels([METHOD_LABELS[m] for m in methods], rotation=45, ha="right")
            c = (chance or {}).get(s["key"], float("nan"))
            if math.isfinite(c):
                ax.axhline(c, color="black", linestyle="--", linewidth=1, label="chance")
                ax.legend(loc="lower right", fontsize=7)
            ax.set_title(s["label"])
            ax.grid(axis="y", alpha=0.3)
        fig.suptitle(f"{task.replace('_', ' ')} (mean ± std over seeds)")
        fig.tight_layout()
        p = os.path.join(out_dir, f"compare_{task}.png")
        fig.savefig(p, dpi=100)
        plt.close(fig)
        paths.append(p)
    return paths


def _json_safe(x):
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, dict):
        return {str(k): _json_safe(v) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return [_json_safe(v) for v in x]
    return x


def _machine() -> str:
    try:
        load = os.getloadavg()
        load_s = f", load average at the end {load[0]:.1f}/{load[1]:.1f}/{load[2]:.1f}"
    except OSError:
        load_s = ""
    return f"{os.cpu_count()} CPU core(s){load_s}"


def collect(cfg: dict, work_dir: str) -> tuple[dict, dict, dict, list[str]]:
    """(metrics raw[method][seed][key], full results, seconds, missing) from the work dir."""
    specs = metric_specs(cfg)
    raw: dict = {}
    full: dict = {}
    secs: dict = {}
    missing = []
    chances: dict[str, list[float]] = {s["key"]: [] for s in specs}
    for m in cfg["methods"]:
        for seed in cfg["seeds"]:
            r = raw.setdefault(m, {}).setdefault(str(seed), {})
            fr = full.setdefault(m, {}).setdefault(str(seed), {})
            sc = secs.setdefault(m, {}).setdefault(str(seed), {"pretrain": 0.0, "tasks": 0.0})
            pre = read_done(
                os.path.join(work_dir, "results", m, f"seed{seed}", "pretrain.json"),
                pretrain_key(cfg),
            )
            if pre:
                sc["pretrain"] = float(pre.get("wall_seconds") or 0.0)
                fr["pretrain"] = pre.get("result")
            for task in cfg["tasks"]:
                rec = read_done(result_path(work_dir, m, seed, task), task_key(cfg, task))
                if rec is None:
                    err = os.path.join(work_dir, "results", m, f"seed{seed}", f"{task}.error.txt")
                    why = f" (error: {err})" if os.path.exists(err) else ""
                    missing.append(f"{m} seed {seed} {task}{why}")
                    continue
                fr[task] = rec["result"]
                sc["tasks"] += float(rec.get("wall_seconds") or 0.0)
                for s in specs:
                    if s["task"] == task:
                        r[s["key"]] = extract_metric(rec["result"], s["path"])
                        chances[s["key"]].append(chance_value(s, rec["result"]))
    chance = {k: mean_std(v)[0] for k, v in chances.items()}
    return raw, full, secs, missing, chance


def invocations_path(work_dir: str, cfg: dict) -> str:
    return os.path.join(work_dir, f"invocations_{pretrain_key(cfg)}.json")


def read_invocations(work_dir: str, cfg: dict) -> list[dict]:
    """Finished runner invocations with these settings: [{"started", "seconds", "ran"}]."""
    try:
        with open(invocations_path(work_dir, cfg)) as f:
            return list(json.load(f))
    except (OSError, json.JSONDecodeError, TypeError):
        return []


def record_invocation(work_dir: str, cfg: dict, started: float, seconds: float, ran: int) -> None:
    """Append this invocation (only one that ran a worker: a report-only call adds no time)."""
    if not ran:
        return
    items = read_invocations(work_dir, cfg)
    items.append(
        {
            "started": datetime.datetime.fromtimestamp(started).isoformat(timespec="seconds"),
            "seconds": round(seconds, 1),
            "ran": ran,
        }
    )
    fileio.write_json(invocations_path(work_dir, cfg), items, indent=1, sort_keys=False)


def write_report(
    cfg: dict, work_dir: str, out_dir: str, command: str, t_invocation: float, reused: int = 0
) -> dict:
    """Aggregate the stored results into compare.md / compare.json / compare_*.png."""
    os.makedirs(out_dir, exist_ok=True)
    specs = metric_specs(cfg)
    raw, full, secs, missing, chance = collect(cfg, work_dir)
    invocations = read_invocations(work_dir, cfg)
    agg = aggregate(raw, specs, cfg["methods"], cfg["seeds"])
    per_method = {}
    for m in cfg["methods"]:
        ss = list(secs[m].values())
        per_method[m] = {
            "pretrain": sum(s["pretrain"] for s in ss) / max(len(ss), 1),
            "tasks": sum(s["tasks"] for s in ss) / max(len(ss), 1),
        }
    wall = {
        "this_invocation_seconds": round(t_invocation, 1),
        "invocations": len(invocations),
        "invocations_seconds": round(
            sum(i["seconds"] for i in invocations) if invocations else t_invocation, 1
        ),
        "reused_results": reused,
        "pretrain_seconds": sum(s["pretrain"] for m in secs.values() for s in m.values()),
        "task_seconds": sum(s["tasks"] for m in secs.values() for s in m.values()),
        "per_method": per_method,
        "per_run": secs,
    }
    json_path = os.path.join(out_dir, "compare.json")
    plots = write_plots(out_dir, agg, specs, cfg["methods"], chance)
    report = {
        "command": command,
        "finished": datetime.datetime.now().strftime("%Y-%m-%d %H:%M"),
        "machine": _machine(),
        "config": cfg,
        "metrics": specs,
        "aggregate": agg,
        "chance": chance,
        "raw": raw,
        "results": full,
        "wall": wall,
        "failures": [f"missing: {x}" for x in missing],
        "json": json_path,
        "plots": plots,
        "winners": {s["key"]: metric_winner(agg, s["key"], cfg["methods"]) for s in specs},
    }
    fileio.write_json(json_path, _json_safe(report), indent=1, allow_nan=False)
    write_markdown(os.path.join(out_dir, "compare.md"), report)
    return report


# ------------------------------------------------------------------ worker (one method, seed)
def _write_record(path: str, key: str, result: dict, seconds: float) -> None:
    from place_tf.evaluate.metrics import nan_to_none

    os.makedirs(os.path.dirname(path), exist_ok=True)
    rec = {"settings_key": key, "wall_seconds": round(seconds, 2), "result": result}
    fileio.write_json(path, nan_to_none(rec), indent=1, allow_nan=False)


def _flat_settings(cfg: dict, run_dir: str, seed: int) -> dict:
    flat = dict(cfg["pretrain"])
    flat.update(
        corpus_dir=cfg["corpus"]["dir"],
        image_size=cfg["corpus"]["image_size"],
        model_dir=run_dir,
        seed=int(seed),
    )
    return flat


def _random_init_model(cfg: dict, seed: int):
    """The untrained twin: the PLACE-objective model (all branches) at this seed."""
    import dataclasses

    from place_tf import config as config_lib
    from place_tf.config import Configs
    from place_tf.data import tokenizer as tok
    from place_tf.models import factory

    corpus = cfg["corpus"]["dir"]
    cfgs = Configs(**config_lib.from_flat(_flat_settings(cfg, "", seed), "place"))
    tokenizer = tok.ReportTokenizer(
        tok.load_vocabulary(os.path.join(corpus, "vocab.txt")), max_length=cfgs.data.max_length
    )
    mc = dataclasses.replace(
        cfgs.model, vocab_size=tokenizer.vocabulary_size, max_length=cfgs.data.max_length
    )
    return factory.random_init_twin(mc, cfgs.objective, seed), tokenizer


def _pretrained_model(cfg: dict, work_dir: str, method: str, seed: int):
    from place_tf import config as config_lib
    from place_tf import train
    from place_tf.config import Configs
    from place_tf.evaluate import embeddings as emb_lib
    from place_tf.training.run_dir import SUMMARY_FILE

    run_dir = model_dir(work_dir, cfg, method, seed)
    rec_path = os.path.join(work_dir, "results", method, f"seed{seed}", "pretrain.json")
    key = pretrain_key(cfg)
    if read_done(rec_path, key) is None or not os.path.exists(os.path.join(run_dir, SUMMARY_FILE)):
        cfgs = Configs(**config_lib.from_flat(_flat_settings(cfg, run_dir, seed), method))
        print(f"[compare] pre-training {method} seed {seed} -> {run_dir}", flush=True)
        t0 = time.time()
        summary = train.run(cfgs, export=False, probe=False)
        summary = {k: v for k, v in summary.items() if k != "model"}
        _write_record(rec_path, key, summary, time.time() - t0)
        print(f"[compare] pre-trained {method} seed {seed} in {time.time() - t0:.0f}s", flush=True)
    model = emb_lib.load_model(run_dir)
    tokenizer = emb_lib.load_tokenizer(model, run_dir, cfg["corpus"]["dir"])
    return model, tokenizer


def run_task(task: str, model, tokenizer, data_dir: str, opts: dict, seed: int) -> dict:
    """One downstream task with the config's budget `opts`; returns its result dict."""
    opts = dict(opts)
    if task == "linear":
        from place_tf.evaluate import linear_probe

        fractions = tuple(opts.pop("fractions", (0.01, 0.1, 1.0)))
        return linear_probe.run(model, data_dir, tokenizer, fractions=fractions, seed=seed, **opts)
    if task in ("zero_shot", "retrieval"):
        import importlib

        mod = importlib.import_module(f"place_tf.evaluate.{task}")
        return mod.run(model, data_dir, tokenizer, seed=seed, **opts)
    if task == "localization":
        from place_tf.evaluate import localization

        return localization.run(model, data_dir, tokenizer, **opts)
    if task == "segmentation":
        from place_tf.evaluate import segmentation

        return segmentation.evaluate(model, data_dir, seed=seed, **opts)
    if task == "detection":
        from place_tf.evaluate import detection

        return detection.evaluate(model, data_dir, seed=seed, **opts)
    if task == "report_generation":
        from place_tf.evaluate import report_generation

        return report_generation.evaluate(model, data_dir, tokenizer=tokenizer, seed=seed, **opts)
    raise ValueError(f"unknown task {task!r}")


def prepare_corpus(cfg: dict) -> int:
    """Generate the SynthCXR corpus unless it exists with the same parameters."""
    from place_tf.data import synthetic

    c = cfg["corpus"]
    if not synthetic.refresh_cache(c["dir"], c["images"], c["image_size"], seed=c["seed"]):
        raise ConfigError(f"corpus.dir {c['dir']}: holds a corpus SynthCXR did not make")
    return 0


def worker(cfg: dict, work_dir: str, method: str, seed: int) -> int:
    """Pre-train (or build) one model and run every task not yet stored; 0 if all succeeded."""
    import traceback

    todo = [
        t
        for t in cfg["tasks"]
        if read_done(result_path(work_dir, method, seed, t), task_key(cfg, t)) is None
    ]
    if not todo:
        return 0
    import keras

    c = cfg["corpus"]
    prepare_corpus(cfg)
    if method == "random_init":
        model, tokenizer = _random_init_model(cfg, seed)
    else:
        model, tokenizer = _pretrained_model(cfg, work_dir, method, seed)
    failed = 0
    for task in todo:
        keras.utils.set_random_seed(seed)
        t0 = time.time()
        try:
            result = run_task(task, model, tokenizer, c["dir"], cfg["tasks"][task], seed)
        except Exception:  # noqa: BLE001  (recorded, the other tasks still run)
            failed += 1
            err = os.path.join(work_dir, "results", method, f"seed{seed}", f"{task}.error.txt")
            os.makedirs(os.path.dirname(err), exist_ok=True)
            with open(err, "w") as f:
                f.write(traceback.format_exc())
            print(f"[compare] {method} seed {seed} {task} FAILED (see {err})", flush=True)
            continue
        dt = time.time() - t0
        _write_record(result_path(work_dir, method, seed, task), task_key(cfg, task), result, dt)
        print(f"[compare] {method} seed {seed} {task} done in {dt:.0f}s", flush=True)
    return 1 if failed else 0


# ------------------------------------------------------------------ driver
def pending(cfg: dict, work_dir: str) -> list[tuple[str, int]]:
    """(method, seed) pairs with at least one task not stored with the current settings."""
    out = []
    for seed in cfg["seeds"]:
        for m in cfg["methods"]:
            if any(
                read_done(result_path(work_dir, m, seed, t), task_key(cfg, t)) is None
                for t in cfg["tasks"]
            ):
                out.append((m, seed))
    return out


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="tools/compare.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--config", required=True, help="YAML comparison config")
    p.add_argument("--seeds", type=int, default=None, help="use seeds 0..N-1")
    p.add_argument("--quick", action="store_true", help="tiny budget (the config's quick:)")
    p.add_argument("--output", default=None, help="results directory (default: config output)")
    p.add_argument("--work_dir", default=None, help="resumable work dir (default: config)")
    p.add_argument(
        "--jobs", type=int, default=None, help="(method, seed) workers at once (default: config)"
    )
    p.add_argument("--worker", nargs=2, metavar=("METHOD", "SEED"), help=argparse.SUPPRESS)
    p.add_argument("--resolved", default=None, help=argparse.SUPPRESS)
    p.add_argument("--prepare", action="store_true", help=argparse.SUPPRESS)
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    if args.worker or args.prepare:
        with open(args.resolved) as f:
            cfg = json.load(f)
        if args.prepare:
            return prepare_corpus(cfg)
        return worker(cfg, args.work_dir, args.worker[0], int(args.worker[1]))
    t0 = time.time()
    try:
        cfg = apply_overrides(load_config(args.config), args.seeds, args.quick)
    except ConfigError as e:
        print(f"tools/compare.py: config error: {e}", file=sys.stderr)
        return 2
    work_dir = args.work_dir or cfg["work_dir"]
    out_dir = args.output or cfg["output"]
    cfg["work_dir"], cfg["output"] = work_dir, out_dir
    os.makedirs(work_dir, exist_ok=True)
    resolved = os.path.join(work_dir, f"resolved_{pretrain_key(cfg)}.json")
    with open(resolved, "w") as f:
        json.dump(cfg, f, indent=1)  # key order kept: the tasks run in the config's order
    todo = pending(cfg, work_dir)
    total = len(cfg["methods"]) * len(cfg["seeds"])
    reused = total - len(todo)
    command = "tools/compare.py " + " ".join(argv if argv is not None else sys.argv[1:])
    print(
        f"[compare] {total - len(todo)} of {total} (method, seed) runs already complete; "
        f"{len(todo)} to run",
        flush=True,
    )
    env = dict(os.environ)
    env.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    env["PYTHONPATH"] = REPO + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    jobs = max(1, int(args.jobs or cfg["jobs"]))
    failures = 0
    if todo:  # once, before parallel workers could race to generate it
        base = [sys.executable, os.path.abspath(__file__), "--config", args.config]
        if subprocess.call(base + ["--resolved", resolved, "--prepare"], env=env) != 0:
            print("[compare] corpus preparation failed", file=sys.stderr, flush=True)
            return 1
    running: list[tuple[subprocess.Popen, str, int]] = []
    queue = list(todo)
    started = 0
    while queue or running:
        while queue and len(running) < jobs:
            m, seed = queue.pop(0)
            started += 1
            print(
                f"[compare] ({started}/{len(todo)}) {m} seed {seed} "
                f"[{(time.time() - t0) / 60:.1f} min elapsed]",
                flush=True,
            )
            cmd = [
                sys.executable,
                os.path.abspath(__file__),
                "--config",
                args.config,
                "--work_dir",
                work_dir,
                "--resolved",
                resolved,
                "--worker",
                m,
                str(seed),
            ]
            running.append((subprocess.Popen(cmd, env=env), m, seed))
        time.sleep(0.5)
        for item in list(running):
            proc, m, seed = item
            rc = proc.poll()
            if rc is None:
                continue
            running.remove(item)
            if rc != 0:
                failures += 1
                print(f"[compare] {m} seed {seed}: worker exited with {rc}", flush=True)
            try:  # an interim report after every finished run: partial results are visible
                write_report(
                    cfg, work_dir, out_dir, "(interim) " + command, time.time() - t0, reused
                )
            except Exception as e:  # noqa: BLE001  (the final report below still runs)
                print(f"[compare] interim report failed: {e}", flush=True)
    record_invocation(work_dir, cfg, t0, time.time() - t0, len(todo))
    report = write_report(cfg, work_dir, out_dir, command, time.time() - t0, reused=reused)
    print(f"[compare] wrote {out_dir}/compare.md, compare.json and {len(report['plots'])} plot(s)")
    return 1 if failures or report["failures"] else 0


if __name__ == "__main__":
    sys.exit(main())
