"""SynthCXR: seeded synthetic chest radiographs with free-text reports and ground truth.

Why: the real corpora (MIMIC-CXR, CheXpert, ...) need credentials and days of download;
the whole stack (pipeline, training, evaluation, TFX) must be testable and demonstrable
without them. SynthCXR renders 8-bit grayscale frontal radiograph-like images whose
findings are exactly what the paired report says, with per-finding masks and boxes, so
every downstream task (classification, retrieval, segmentation, detection) has a target.

Conventions
- Deterministic: example `i` depends only on (seed, i, image_size), never on the number
  of worker processes. Anatomy is drawn per *subject* (several studies share a body),
  positioning, exposure and findings per image.
- Radiographic convention: the patient's right is on the image left.
- Findings (report wording -> CheXpert labels, masks and boxes):
  cardiomegaly (bigger heart), pleural effusion (meniscus opacity at the base),
  pneumothorax (lucent rim without lung markings, pleural line), consolidation /
  pneumonia (patchy opacity; "pneumonia" wording also sets Pneumonia), edema (bilateral
  perihilar haze), atelectasis (band opacity, volume loss when moderate/severe),
  nodule / mass (round opacity -> "Lung Lesion"), support devices (bright tubes, lines,
  leads). Severity (mild / moderate / severe) scales size and density; mild cases sit
  close to the noise floor on purpose.
- Labels follow the CheXpert labeler's aggregation: positive mention -> 1, uncertain
  ("possible", "cannot exclude", "borderline") -> -1, negated mention -> 0, not mentioned
  -> LABEL_MISSING; a label mentioned several ways takes 1 over -1 over 0. "Lung Opacity"
  is set when a sentence uses the word opacity; "No Finding" is 1 when no pathology is
  positive or uncertain, else 0 (support devices do not count, as in CheXpert).
- Uncertain findings are rendered faintly (a fraction of the mild density) and get NO
  mask or box: the ground truth is what a reader would annotate with confidence.
- Masks: 8-bit 0/255 PNGs, one per positive label (Consolidation and Pneumonia share the
  same mask when the report calls it pneumonia); boxes are the normalised extent of the
  mask, so box and mask always agree.

This module imports numpy and Pillow only (no TensorFlow), so worker processes start fast.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
import struct
import zlib
from collections.abc import Collection
from functools import lru_cache

import numpy as np
from PIL import Image, ImageDraw

from place_tf.data import schema

GENERATOR_NAME = "SynthCXR"
# 1: first release. 2: a wider pose and exposure variant, reverted (it was never kept on
# main, but caches of it may exist). 3: patient centring varies as much as in real
# departments (sd 6 % of the field of view instead of 1.5 %): with every patient at the
# same pixels, a linear probe on raw pixels read the big findings from fixed positions
# (8k images: 0.83 macro AUROC, above the pre-trained quickstart encoder's 0.80); on v3
# it reads 0.73 and the encoder 0.79 (README "Data", results/eval/synthcxr_probe.json).
GENERATOR_VERSION = 3
SOURCE = "synthcxr"
# Patient positioning per image: rotation (degrees, uniform +-), magnification (uniform
# range) and centring (normal sd, clipped at 2 sd; fractions of the field of view).
# Wider rotation (8 deg) or magnification (0.86-1.06) lowered the raw-pixel probe by
# only 0.015, a wider exposure window not at all; they stay at the first release's.
POSE_ROTATION_DEG = 4.0
POSE_SCALE = (0.93, 1.05)
POSE_SHIFT_SD = 0.06
# The size corpora are rendered at when a trainer generates one. Like real corpora, they
# are stored larger than a small model sees and resized by the input pipeline, which
# averages the quantum noise: rendered directly at the quickstart's 64 px, the same
# pre-training reached 0.701 probe AUROC instead of 0.791 (raw pixels 0.717 vs 0.731).
STORED_IMAGE_SIZE = 224
# Exposure window per image: black level (uniform +-), white level and gamma (ranges).
EXPOSURE_BLACK = 0.04
EXPOSURE_WHITE = (0.68, 0.85)
EXPOSURE_GAMMA = (0.8, 1.25)

FINDING_KINDS: tuple[str, ...] = (
    "cardiomegaly",
    "effusion",
    "pneumothorax",
    "consolidation",
    "edema",
    "atelectasis",
    "lesion",
    "devices",
)
SEVERITIES: tuple[str, ...] = ("mild", "moderate", "severe")
SPLIT_FRACTIONS: tuple[tuple[str, float], ...] = (("train", 0.8), ("validate", 0.1), ("test", 0.1))

# CheXpert label each rendered finding kind is annotated with.
KIND_LABEL: dict[str, str] = {
    "cardiomegaly": "Cardiomegaly",
    "effusion": "Pleural Effusion",
    "pneumothorax": "Pneumothorax",
    "consolidation": "Consolidation",
    "edema": "Edema",
    "atelectasis": "Atelectasis",
    "lesion": "Lung Lesion",
    "devices": "Support Devices",
}
_L = {name: i for i, name in enumerate(schema.CHEXPERT_LABELS)}
# Pathologies for "No Finding" (everything except No Finding and Support Devices).
_PATHOLOGY_LABELS = [i for n, i in _L.items() if n not in ("No Finding", "Support Devices")]

_PATHOLOGY_WEIGHTS = {
    "cardiomegaly": 0.16,
    "effusion": 0.18,
    "pneumothorax": 0.08,
    "consolidation": 0.16,
    "edema": 0.12,
    "atelectasis": 0.15,
    "lesion": 0.15,
}
# Probability that an absent finding is explicitly negated in the report.
_NEGATION_PROB = {
    "cardiomegaly": 0.55,
    "effusion": 0.7,
    "pneumothorax": 0.65,
    "consolidation": 0.5,
    "edema": 0.35,
    "atelectasis": 0.1,
    "lesion": 0.1,
}
P_NORMAL = 0.35
P_UNCERTAIN = 0.12
P_DEVICES = 0.22


# --------------------------------------------------------------------------------------
# Case sampling
# --------------------------------------------------------------------------------------


@dataclasses.dataclass
class Finding:
    """One finding of a case: what is rendered and what the report says about it."""

    kind: str
    status: int  # 1 present, -1 uncertain (rendered faintly, no annotation)
    severity: str = "moderate"
    side: str = "right"  # patient side: right | left | bilateral
    zone: str = "lower"  # upper | middle | lower
    pneumonia: bool = False  # consolidation described as pneumonia
    devices: tuple[str, ...] = ()
    size: float = 0.0  # lesion diameter in mm


@dataclasses.dataclass
class Case:
    findings: list[Finding]
    negated: list[str]  # absent kinds the report negates explicitly


def _pick(rng: np.random.Generator, options):
    return options[int(rng.integers(len(options)))]


def _sample_case(rng: np.random.Generator) -> Case:
    """Which findings, where, how severe, and which absent ones the report negates."""
    findings: list[Finding] = []
    chosen: list[str] = []
    if rng.random() >= P_NORMAL:
        kinds = list(_PATHOLOGY_WEIGHTS)
        w = np.array([_PATHOLOGY_WEIGHTS[k] for k in kinds])
        n = int(rng.choice([1, 2, 3], p=[0.5, 0.35, 0.15]))
        chosen = list(rng.choice(kinds, size=n, replace=False, p=w / w.sum()))
        if "edema" in chosen:  # congestive pattern: big heart and effusions travel together
            if "cardiomegaly" not in chosen and rng.random() < 0.4:
                chosen.append("cardiomegaly")
            if "effusion" not in chosen and rng.random() < 0.3:
                chosen.append("effusion")
    used_sides: dict[str, str] = {}
    for kind in chosen:
        status = -1 if rng.random() < P_UNCERTAIN else 1
        sev = str(rng.choice(SEVERITIES, p=[0.4, 0.35, 0.25]))
        side = _pick(rng, ("right", "left"))
        zone = _pick(rng, ("upper", "middle", "lower"))
        f = Finding(kind=kind, status=status, severity=sev, side=side, zone=zone)
        if kind == "effusion":
            if "edema" in chosen or rng.random() < 0.2:
                f.side = "bilateral"
            f.zone = "lower"
        elif kind == "pneumothorax":
            f.zone = "upper"
        elif kind == "atelectasis":
            f.zone = _pick(rng, ("middle", "lower", "lower"))
        elif kind == "consolidation":
            f.pneumonia = bool(rng.random() < 0.45)
        elif kind == "lesion":
            f.size = (
                float(rng.uniform(6, 12))
                if sev == "mild"
                else float(rng.uniform(13, 25))
                if sev == "moderate"
                else float(rng.uniform(32, 55))
            )
        elif kind in ("edema",):
            f.side = "bilateral"
        used_sides[kind] = f.side
        findings.append(f)
    # A pneumothorax and an effusion on the same side would be a hydropneumothorax.
    if "pneumothorax" in used_sides and used_sides.get("effusion") == used_sides["pneumothorax"]:
        for f in findings:
            if f.kind == "pneumothorax":
                f.side = "left" if f.side == "right" else "right"
    if rng.random() < (P_DEVICES + (0.25 if {"edema", "effusion"} & set(chosen) else 0.0)):
        pool = ["ett", "ng", "cvc", "pacer", "ecg"]
        n = int(rng.choice([1, 2, 3], p=[0.55, 0.3, 0.15]))
        devs = tuple(sorted(rng.choice(pool, size=n, replace=False), key=pool.index))
        findings.append(Finding(kind="devices", status=1, devices=tuple(map(str, devs))))
    present = {f.kind for f in findings}
    negated = [k for k, p in _NEGATION_PROB.items() if k not in present and rng.random() < p]
    return Case(findings=findings, negated=negated)


# --------------------------------------------------------------------------------------
# Report text
# --------------------------------------------------------------------------------------

_SEV_ADJ = {
    "effusion": {"mild": ("small", "trace"), "moderate": ("moderate",), "severe": ("large",)},
    "pneumothorax": {"mild": ("small", "tiny"), "moderate": ("moderate",), "severe": ("large",)},
    "cardiomegaly": {"mild": ("mild",), "moderate": ("moderate",), "severe": ("severe", "marked")},
    "edema": {"mild": ("mild",), "moderate": ("moderate",), "severe": ("severe",)},
    "consolidation": {"mild": ("patchy", "mild"), "moderate": ("", "focal"), "severe": ("dense",)},
    "atelectasis": {
        "mild": ("minimal", "subsegmental"),
        "moderate": ("",),
        "severe": ("substantial",),
    },
}
_SEV_ADV = {"mild": "mildly", "moderate": "moderately", "severe": "severely"}
_LOBE = {
    ("right", "upper"): ("right upper lobe",),
    ("right", "middle"): ("right middle lobe",),
    ("right", "lower"): ("right lower lobe",),
    ("left", "upper"): ("left upper lobe",),
    ("left", "middle"): ("lingula",),
    ("left", "lower"): ("left lower lobe",),
}
_ZONE = {"upper": "upper lung zone", "middle": "mid lung zone", "lower": "lung base"}


def _cap(s: str) -> str:
    s = " ".join(s.split())
    return s[:1].upper() + s[1:]


def _lobe(rng, f: Finding) -> str:
    return _pick(rng, _LOBE[(f.side, f.zone)])


def _region(rng, f: Finding) -> str:
    """'the right lower lobe' or 'the right lung base'-style phrases."""
    if rng.random() < 0.5:
        return "the " + _lobe(rng, f)
    return f"the {f.side} {_ZONE[f.zone]}"


def _sev(rng, f: Finding) -> str:
    return _pick(rng, _SEV_ADJ[f.kind][f.severity])


Sentence = tuple[str, dict[str, int]]


def _positive(rng, f: Finding) -> tuple[list[Sentence], Sentence]:
    """(findings sentences, impression sentence) for a present finding."""
    k = f.kind
    if k == "effusion":
        sev = _sev(rng, f)
        if f.side == "bilateral":
            side_a, noun = "bilateral", "pleural effusions"
        else:
            side_a, noun = f.side, "pleural effusion"
        lab = {"Pleural Effusion": 1}
        t = _pick(
            rng,
            (
                f"{sev} {side_a} {noun}.",
                f"There {'are' if noun.endswith('s') else 'is a'} {sev} {side_a} {noun}.",
                f"{sev} {side_a} {noun} with blunting of the costophrenic angle"
                f"{'s' if f.side == 'bilateral' else ''}.",
                f"{sev} {side_a}-sided {noun} {'are' if noun.endswith('s') else 'is'} present.",
            ),
        )
        return [(_cap(t), lab)], (_cap(f"{sev} {side_a} {noun}."), lab)
    if k == "pneumothorax":
        sev = _sev(rng, f)
        apical = "apical " if f.severity == "mild" and rng.random() < 0.6 else ""
        lab = {"Pneumothorax": 1}
        t = _pick(
            rng,
            (
                f"{sev} {f.side} {apical}pneumothorax.",
                f"There is a {sev} {f.side} {apical}pneumothorax.",
                f"{sev} {f.side} {apical}pneumothorax with a visible pleural line.",
            ),
        )
        return [(_cap(t), lab)], (_cap(f"{sev} {f.side} pneumothorax."), lab)
    if k == "consolidation":
        sev = _sev(rng, f)
        region = _region(rng, f)
        lobe = _lobe(rng, f)
        if f.pneumonia:
            lab = {"Consolidation": 1, "Pneumonia": 1}
            t = _pick(
                rng,
                (
                    f"{sev} {lobe} consolidation consistent with pneumonia.",
                    f"{sev} consolidation in {region}, compatible with pneumonia.",
                    f"{sev} consolidation in {region} concerning for pneumonia.",
                ),
            )
            imp = _pick(rng, (f"{lobe} pneumonia.", f"Findings consistent with {lobe} pneumonia."))
            return [(_cap(t), lab)], (_cap(imp), {"Pneumonia": 1})
        lab = {"Consolidation": 1}
        choice = int(rng.integers(4))
        if choice == 3:
            t = f"{sev} consolidative opacity in {region}."
            lab = {"Consolidation": 1, "Lung Opacity": 1}
        else:
            t = (
                f"{sev} consolidation in {region}.",
                f"{sev} {lobe} consolidation.",
                f"There is {sev} airspace consolidation in {region}.",
            )[choice]
        return [(_cap(t), lab)], (_cap(f"{lobe} consolidation."), {"Consolidation": 1})
    if k == "edema":
        sev = _sev(rng, f)
        lab = {"Edema": 1}
        choice = int(rng.integers(4))
        if choice == 0:
            t = f"Bilateral perihilar opacities consistent with {sev} pulmonary edema."
            lab = {"Edema": 1, "Lung Opacity": 1}
        else:
            t = (
                "",
                f"{sev} pulmonary edema.",
                f"Findings are consistent with {sev} pulmonary edema.",
                f"There is {sev} interstitial edema with perihilar haziness.",
            )[choice]
        return [(_cap(t), lab)], (_cap(f"{sev} pulmonary edema."), {"Edema": 1})
    if k == "atelectasis":
        sev = _sev(rng, f)
        where_at = (
            f"at the {f.side} lung base" if f.zone == "lower" else f"in the {f.side} mid lung zone"
        )
        lab = {"Atelectasis": 1}
        if f.severity == "severe":
            t = f"{sev} {_lobe(rng, f)} atelectasis with volume loss."
        else:
            choice = int(rng.integers(3))
            if choice == 1:
                t = f"{f.side} {'basilar' if f.zone == 'lower' else 'mid lung'} linear opacity consistent with {sev} atelectasis."
                lab = {"Atelectasis": 1, "Lung Opacity": 1}
            else:
                t = (
                    f"{sev} atelectasis {where_at}.",
                    "",
                    f"Plate-like {sev} atelectasis in the {f.side} {_ZONE[f.zone]}.",
                )[choice]
        where = "basilar" if f.zone == "lower" else "mid lung"
        return [(_cap(t), lab)], (_cap(f"{f.side} {where} atelectasis."), {"Atelectasis": 1})
    if k == "lesion":
        lab = {"Lung Lesion": 1}
        zone = {"upper": "upper", "middle": "mid", "lower": "lower"}[f.zone]
        if f.severity == "severe":
            cm = f"{f.size / 10:.1f}"
            t = _pick(
                rng,
                (
                    f"{cm} cm mass in the {f.side} {zone} lung.",
                    f"A {cm} cm {f.side} {zone} lung mass is present.",
                ),
            )
            imp = f"{f.side} {zone} lung mass, concerning for malignancy. Recommend chest CT."
        else:
            mm = f"{round(f.size)}"
            t = _pick(
                rng,
                (
                    f"{mm} mm nodule in the {f.side} {zone} lung.",
                    f"There is {'an' if mm.startswith(('8', '11', '18')) else 'a'} {mm} mm {f.side} {zone} lung nodule.",
                    f"A {mm} mm pulmonary nodule projects over the {f.side} {zone} lung.",
                ),
            )
            imp = f"{f.side} {zone} lung nodule. Recommend chest CT for further evaluation."
        return [(_cap(t), lab)], (_cap(imp), lab)
    if k == "cardiomegaly":
        lab = {"Cardiomegaly": 1}
        t = _pick(
            rng,
            (
                f"The heart is {_SEV_ADV[f.severity]} enlarged.",
                f"{_sev(rng, f)} cardiomegaly.",
                f"There is {_sev(rng, f)} enlargement of the cardiac silhouette.",
                f"Heart size is {_SEV_ADV[f.severity]} enlarged.",
            ),
        )
        return [(_cap(t), lab)], (_cap(f"{_sev(rng, f)} cardiomegaly."), lab)
    if k == "devices":
        lab = {"Support Devices": 1}
        out = []
        for d in f.devices:
            if d == "ett":
                t = _pick(
                    rng,
                    (
                        f"Endotracheal tube terminates {int(rng.integers(3, 6))} cm above the carina.",
                        "Endotracheal tube in standard position.",
                    ),
                )
            elif d == "ng":
                t = _pick(
                    rng,
                    (
                        "An enteric tube courses below the diaphragm into the stomach.",
                        "Nasogastric tube with tip in the stomach.",
                    ),
                )
            elif d == "cvc":
                t = _pick(
                    rng,
                    (
                        "Right internal jugular central venous catheter with tip in the superior vena cava.",
                        "Right-sided central line terminates in the mid superior vena cava.",
                    ),
                )
            elif d == "pacer":
                t = "Left chest wall pacemaker with leads in the right heart."
            else:
                t = _pick(
                    rng,
                    (
                        "ECG leads overlie the chest.",
                        "External monitoring leads overlie the chest.",
                    ),
                )
            out.append((t, lab))
        imp = _pick(rng, ("Support devices as described.", "Lines and tubes as above."))
        return out, (imp, lab)
    raise ValueError(f"unknown finding kind {k!r}")


def _uncertain(rng, f: Finding) -> Sentence:
    k = f.kind
    side = f.side if f.side != "bilateral" else "left"
    if k == "effusion":
        return _pick(
            rng,
            (
                (f"Possible small {side} pleural effusion.", {"Pleural Effusion": -1}),
                (
                    f"Blunting of the {side} costophrenic angle, cannot exclude a small effusion.",
                    {"Pleural Effusion": -1},
                ),
            ),
        )
    if k == "pneumothorax":
        return _pick(
            rng,
            (
                (f"Questionable tiny {side} apical pneumothorax.", {"Pneumothorax": -1}),
                (f"Possible small {side} apical pneumothorax.", {"Pneumothorax": -1}),
            ),
        )
    if k == "consolidation":
        if f.pneumonia:
            return _pick(
                rng,
                (
                    (f"Possible early pneumonia in the {_lobe(rng, f)}.", {"Pneumonia": -1}),
                    (f"Cannot exclude pneumonia in the {_lobe(rng, f)}.", {"Pneumonia": -1}),
                ),
            )
        return (f"Possible subtle consolidation in the {_lobe(rng, f)}.", {"Consolidation": -1})
    if k == "edema":
        return _pick(
            rng,
            (
                ("Possible mild pulmonary edema.", {"Edema": -1}),
                ("Mild vascular congestion, cannot exclude early edema.", {"Edema": -1}),
            ),
        )
    if k == "atelectasis":
        return (f"Possible {side} basilar atelectasis.", {"Atelectasis": -1})
    if k == "lesion":
        zone = {"upper": "upper", "middle": "mid", "lower": "lower"}[f.zone]
        return _pick(
            rng,
            (
                (
                    f"Possible nodular opacity in the {side} {zone} lung.",
                    {"Lung Lesion": -1, "Lung Opacity": -1},
                ),
                (f"Cannot exclude a small nodule in the {side} {zone} lung.", {"Lung Lesion": -1}),
            ),
        )
    if k == "cardiomegaly":
        return _pick(
            rng,
            (
                ("Borderline cardiomegaly.", {"Cardiomegaly": -1}),
                ("Possible mild cardiomegaly.", {"Cardiomegaly": -1}),
                ("The heart size is borderline enlarged.", {"Cardiomegaly": -1}),
            ),
        )
    raise ValueError(f"finding kind {k!r} has no uncertain wording")


def _negated(rng, kind: str) -> Sentence:
    opts = {
        "effusion": ("No pleural effusion.", "There is no pleural effusion."),
        "pneumothorax": (
            "No pneumothorax.",
            "There is no pneumothorax.",
            "No evidence of pneumothorax.",
        ),
        "consolidation": (
            "No focal consolidation.",
            "There is no focal airspace consolidation.",
            "No consolidation.",
        ),
        "edema": ("No pulmonary edema.", "No evidence of pulmonary edema.", "There is no edema."),
        "atelectasis": ("No atelectasis.", "No focal atelectasis."),
        "lesion": ("No suspicious pulmonary nodules.", "No focal mass or nodule."),
        "cardiomegaly": (
            "Heart size is normal.",
            "The heart is not enlarged.",
            "Normal heart size.",
            "No cardiomegaly.",
        ),
    }[kind]
    label = {
        "effusion": "Pleural Effusion",
        "pneumothorax": "Pneumothorax",
        "consolidation": "Consolidation",
        "edema": "Edema",
        "atelectasis": "Atelectasis",
        "lesion": "Lung Lesion",
        "cardiomegaly": "Cardiomegaly",
    }[kind]
    return _pick(rng, opts), {label: 0}


_NORMAL_IMPRESSIONS = (
    "No acute cardiopulmonary process.",
    "No acute cardiopulmonary abnormality.",
    "Normal chest radiograph.",
    "No radiographic evidence of acute disease.",
)


def _write_report(rng: np.random.Generator, case: Case) -> tuple[str, str, list[int]]:
    """FINDINGS and IMPRESSION text plus the CheXpert label vector they imply."""
    by_kind = {f.kind: f for f in case.findings}
    findings: list[Sentence] = []
    impression: list[Sentence] = []
    lung_kinds = ("consolidation", "edema", "atelectasis", "lesion")
    order = ["devices", *lung_kinds, "effusion", "pneumothorax", "cardiomegaly"]
    negated = list(case.negated)
    lungs_clear = not any(k in by_kind for k in lung_kinds) and rng.random() < 0.6
    for kind in order:
        if kind == lung_kinds[0] and lungs_clear:
            findings.append(
                (_pick(rng, ("The lungs are clear.", "Lungs are well expanded and clear.")), {})
            )
        f = by_kind.get(kind)
        if f is not None:
            if f.status == 1:
                sents, imp = _positive(rng, f)
                findings.extend(sents)
                impression.append(imp)
            else:
                s = _uncertain(rng, f)
                findings.append(s)
                if rng.random() < 0.5:
                    impression.append(s)
        elif kind in negated:
            if kind == "effusion" and "pneumothorax" in negated and rng.random() < 0.5:
                findings.append(
                    (
                        "No pleural effusion or pneumothorax.",
                        {"Pleural Effusion": 0, "Pneumothorax": 0},
                    )
                )
                negated.remove("pneumothorax")
            elif kind == "cardiomegaly" and rng.random() < 0.3:
                findings.append(
                    (
                        "The cardiomediastinal silhouette is within normal limits.",
                        {"Cardiomegaly": 0, "Enlarged Cardiomediastinum": 0},
                    )
                )
            else:
                findings.append(_negated(rng, kind))
    if rng.random() < 0.3:
        findings.append(("No acute osseous abnormality.", {"Fracture": 0}))
    if not any(f.status in (1, -1) and f.kind != "devices" for f in case.findings):
        impression = [
            s for s in impression if "Support Devices" in s[1]
        ]  # devices only: keep their line
        impression.append((_pick(rng, _NORMAL_IMPRESSIONS), {}))
    # A few reports carry only one section, as in MIMIC-CXR; labels come from what is kept.
    u = rng.random()
    if u < 0.04 and impression:
        findings = []
    elif u > 0.96 and findings:
        impression = []
    labels = [schema.LABEL_MISSING] * schema.NUM_CHEXPERT
    rank = {1: 3, -1: 2, 0: 1, schema.LABEL_MISSING: 0}
    for _, lab in findings + impression:
        for name, v in lab.items():
            i = _L[name]
            if rank[v] > rank[labels[i]]:
                labels[i] = v
    pathology = any(labels[i] in (1, -1) for i in _PATHOLOGY_LABELS)
    labels[_L["No Finding"]] = 0 if pathology else 1
    f_text = " ".join(s for s, _ in findings)
    i_text = " ".join(s for s, _ in impression)
    return f_text, i_text, labels


# --------------------------------------------------------------------------------------
# Rendering
# --------------------------------------------------------------------------------------


@lru_cache(maxsize=8)
def _base_grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    c = (np.arange(size, dtype=np.float32) + 0.5) / size - 0.5
    u, v = np.meshgrid(c, c)  # centred pixel coordinates, x right / y down
    return u, v


def _ramp(z):
    return np.clip(z, 0.0, 1.0)


def _resize(a: np.ndarray, size: int, resample=Image.BILINEAR) -> np.ndarray:
    if a.shape[0] == size:
        return a
    im = Image.fromarray(np.ascontiguousarray(a, dtype=np.float32))
    return np.asarray(im.resize((size, size), resample))


def _smooth_noise(rng: np.random.Generator, cells: int, size: int) -> np.ndarray:
    """Band-limited noise: a small Gaussian grid upsampled bicubically (fast, seeded)."""
    return _resize(rng.standard_normal((cells, cells), dtype=np.float32), size, Image.BICUBIC)


@dataclasses.dataclass
class _Anatomy:
    cx: float
    tw: float  # thorax half-width
    apex: float  # lung apex y
    dome_r: float  # right hemidiaphragm apex y (image left)
    dome_l: float
    cp: float  # costophrenic depth below the dome
    mw: float  # mediastinum half-width
    ctr: float  # normal cardiothoracic ratio
    hh: float  # heart half-height
    rib_spacing: float
    rib_tilt: float
    soft: float  # soft tissue density
    lung_density: float


def _sample_anatomy(rng: np.random.Generator) -> _Anatomy:
    dome_r = float(rng.uniform(0.65, 0.71))
    return _Anatomy(
        cx=float(0.5 + rng.normal(0, 0.01)),
        tw=float(rng.uniform(0.36, 0.41)),
        apex=float(rng.uniform(0.11, 0.15)),
        dome_r=dome_r,
        dome_l=dome_r + float(rng.uniform(0.01, 0.035)),
        cp=float(rng.uniform(0.06, 0.09)),
        mw=float(rng.uniform(0.05, 0.065)),
        ctr=float(rng.uniform(0.40, 0.47)),
        hh=float(rng.uniform(0.11, 0.13)),
        rib_spacing=float(rng.uniform(0.068, 0.082)),
        rib_tilt=float(rng.uniform(0.22, 0.30)),
        soft=float(rng.uniform(0.34, 0.42)),
        lung_density=float(rng.uniform(0.08, 0.14)),
    )


def _lung_top(a: _Anatomy, tt):
    return a.apex + 0.10 * ((tt - 0.45) / 0.55) ** 2


def _lung_bottom(a: _Anatomy, tt, dome):
    """Hemidiaphragm: highest a little medial of mid-lung, deepest at the costophrenic angle."""
    med = 0.03 * ((0.4 - tt) / 0.4) ** 2
    lat = a.cp * ((tt - 0.4) / 0.6) ** 2
    return dome + np.where(tt < 0.4, med, lat)


def _lung_lat(a: _Anatomy, y):
    return a.tw * (0.55 + 0.40 * np.sqrt(_ramp((y - a.apex) / 0.35)))


class _Geometry:
    """Anatomical coordinates of every pixel of the render grid, and the lungs on them."""

    def __init__(self, a: _Anatomy, res: int, out: int, angle: float, scale: float, shift):
        u, v = _base_grid(res)
        ca, sa = math.cos(angle), math.sin(angle)
        self.res, self.out = res, out
        self.angle, self.scale, self.shift = angle, scale, shift
        self.x = (ca * u + sa * v) / scale + (0.5 + shift[0])
        self.y = (-sa * u + ca * v) / scale + (0.5 + shift[1])
        self.a = a
        self.left = self.x >= a.cx  # patient left = image right
        self.ax = np.abs(self.x - a.cx)

    def lungs(self, dome_r: float, dome_l: float):
        """Soft lung membership of both lungs, lateral coordinate t and lung bottom."""
        a = self.a
        self.lat = _lung_lat(a, self.y)
        self.dome = np.where(self.left, np.float32(dome_l), np.float32(dome_r))
        t = (self.ax - a.mw) / (self.lat - a.mw)
        tt = _ramp(t)
        self.t = t
        self.bottom = _lung_bottom(a, tt, self.dome)
        top = _lung_top(a, tt)
        self.lung = (
            _ramp(t / 0.08)
            * _ramp((1.0 - t) / 0.04)
            * _ramp((self.y - top) / 0.03)
            * _ramp((self.bottom - self.y) / 0.012)
        )
        return self.lung

    def point(self, side: str, t0: float, frac: float, dome_r: float, dome_l: float):
        """Anatomical (x, y) at lateral fraction t0 and vertical fraction `frac` of a lung."""
        a = self.a
        left = side == "left"
        top = float(_lung_top(a, t0))
        bottom = float(_lung_bottom(a, t0, dome_l if left else dome_r))
        y0 = top + frac * (bottom - top)
        lat = float(_lung_lat(a, y0))
        x0 = a.cx + (1 if left else -1) * (a.mw + t0 * (lat - a.mw))
        return x0, y0

    def to_pixels(self, pts):
        """Anatomical points -> output pixel coordinates (inverse of the pixel map)."""
        ca, sa = math.cos(self.angle), math.sin(self.angle)
        out = []
        for x, y in pts:
            dx = (x - 0.5 - self.shift[0]) * self.scale
            dy = (y - 0.5 - self.shift[1]) * self.scale
            u = ca * dx - sa * dy
            v = sa * dx + ca * dy
            out.append(((u + 0.5) * self.out, (v + 0.5) * self.out))
        return out

    def side_mask(self, side: str):
        if side == "bilateral":
            return np.ones_like(self.left)
        return self.left if side == "left" else ~self.left


_ZONE_FRAC = {"upper": 0.25, "middle": 0.5, "lower": 0.74}


def _heart_shift(f: Finding) -> float:
    """Left mid/lower opacities move laterally, clear of the heart: a finding hidden behind
    it would be annotated but invisible."""
    return 0.2 if f.side == "left" and f.zone != "upper" else 0.0


def _segment_distance(x, y, p0, p1):
    """Distance of every pixel (x, y) to the segment p0-p1."""
    dx, dy = p1[0] - p0[0], p1[1] - p0[1]
    ll = dx * dx + dy * dy
    s = _ramp(((x - p0[0]) * dx + (y - p0[1]) * dy) / ll)
    return np.hypot(x - (p0[0] + s * dx), y - (p0[1] + s * dy))


def _bbox(mask: np.ndarray) -> list[float]:
    h, w = mask.shape
    rows = np.flatnonzero(mask.any(axis=1))
    cols = np.flatnonzero(mask.any(axis=0))
    return [cols[0] / w, rows[0] / h, (cols[-1] + 1) / w, (rows[-1] + 1) / h]


@dataclasses.dataclass
class RenderedExample:
    image: np.ndarray  # uint8 [H, W]
    findings: str
    impression: str
    labels: list[int]
    masks: dict[int, np.ndarray]  # CheXpert index -> bool [H, W]
    boxes: dict[int, list[float]]  # CheXpert index -> [xmin, ymin, xmax, ymax], normalised
    subject_id: str
    study_id: str
    image_id: str
    view: str
    case: Case


def subject_of(index: int, seed: int) -> tuple[int, int]:
    """(block, group) of example `index`: blocks of 8 consecutive studies are split into
    subjects of 1-4 studies, so subjects have several studies and the map is O(1)."""
    block = index // 8
    rng = np.random.default_rng([seed, 7, block])
    ends = np.cumsum(rng.choice([1, 2, 3, 4], size=8, p=[0.4, 0.3, 0.2, 0.1]))
    return block, int(np.searchsorted(ends, index % 8, side="right"))


def subject_id_of(index: int, seed: int) -> str:
    block, group = subject_of(index, seed)
    return f"synth-{block:06d}-{group}"


def split_of(subject_id: str, seed: int) -> str:
    """Split by a hash of the subject id: all studies of a subject land in one split."""
    h = int.from_bytes(hashlib.sha256(f"{seed}:{subject_id}".encode()).digest()[:8], "big")
    u = h / 2.0**64
    acc = 0.0
    for name, frac in SPLIT_FRACTIONS:
        acc += frac
        if u < acc:
            return name
    return SPLIT_FRACTIONS[-1][0]


def _streams(index: int, seed: int) -> list[np.random.SeedSequence]:
    """Independent random streams of one example: case, text, pose, texture, noise,
    devices, then one per finding kind."""
    return np.random.SeedSequence([seed, 13, index]).spawn(6 + len(FINDING_KINDS))


def case_of(index: int, seed: int = 0) -> Case:
    """The findings of example `index` without rendering it (cheap; for selecting cases)."""
    return _sample_case(np.random.default_rng(_streams(index, seed)[0]))


def _render_resolution(image_size: int) -> int:
    """Smooth anatomy is rendered at half resolution from 96 px up (4x fewer pixels), then
    upsampled; noise, devices and masks are made at full resolution."""
    return image_size // 2 if image_size >= 96 else image_size


def _render(index: int, seed: int, image_size: int, omit: Collection[str] = ()) -> RenderedExample:
    if image_size < 16:
        raise ValueError(f"image_size must be >= 16, got {image_size}")
    unknown = set(omit) - set(FINDING_KINDS)
    if unknown:
        raise ValueError(f"omit has unknown finding kinds {sorted(unknown)}; use {FINDING_KINDS}")
    block, group = subject_of(index, seed)
    anat = _sample_anatomy(np.random.default_rng([seed, 11, block, group]))
    seqs = _streams(index, seed)
    r_case, r_text, r_pose, r_tex, r_noise, r_dev = (np.random.default_rng(s) for s in seqs[:6])
    # One stream per finding kind, used whether or not the finding is drawn, so that
    # omitting one finding leaves every other pixel unchanged.
    fr = {k: np.random.default_rng(s) for k, s in zip(FINDING_KINDS, seqs[6:], strict=True)}
    case = _sample_case(r_case)
    f_text, i_text, labels = _write_report(r_text, case)
    by_kind = {f.kind: f for f in case.findings}
    S = image_size
    R = _render_resolution(S)
    a = anat

    angle = math.radians(float(r_pose.uniform(-POSE_ROTATION_DEG, POSE_ROTATION_DEG)))
    scale = float(r_pose.uniform(*POSE_SCALE))
    shift = tuple(
        float(np.clip(r_pose.normal(0, POSE_SHIFT_SD), -2 * POSE_SHIFT_SD, 2 * POSE_SHIFT_SD))
        for _ in range(2)
    )
    view = "AP" if ("devices" in by_kind or r_pose.random() < 0.25) else "PA"
    geo = _Geometry(a, R, S, angle, scale, shift)
    x, y, ax = geo.x, geo.y, geo.ax
    faint = 0.35  # density of uncertain findings relative to mild

    def active(kind: str) -> Finding | None:
        f = by_kind.get(kind)
        return None if f is None or kind in omit else f

    # Volume loss from atelectasis raises that hemidiaphragm.
    dome_r, dome_l = a.dome_r, a.dome_l
    at = active("atelectasis")
    if at is not None and at.status == 1 and at.severity != "mild":
        lift = 0.02 if at.severity == "moderate" else 0.04
        if at.side == "left":
            dome_l -= lift
        else:
            dome_r -= lift

    # ---- anatomy (densities add up, as attenuation does) ----------------------------
    bw = (
        0.10
        + (a.tw + 0.09 - 0.10) * np.sqrt(_ramp((y - 0.02) / 0.13))
        - 0.02 * _ramp((y - 0.5) / 0.5)
    )
    body = _ramp((bw - ax) / 0.025) * _ramp((y + 0.05) / 0.05)
    img = 0.03 + (a.soft - 0.03) * body
    lung = geo.lungs(dome_r, dome_l)
    t = geo.t
    img += 0.07 * _ramp((y - geo.bottom) / 0.025) * body  # abdomen below the domes

    # Ribs (posterior arcs), clavicles, spine, upper mediastinum, trachea, aortic knob.
    q = ax / a.tw
    phase = (y - a.apex + 0.02 + 0.12 * q - a.rib_tilt * q * q) / a.rib_spacing
    fp = phase - np.floor(phase)
    rib = _ramp(np.minimum(fp, 0.33 - fp) * 14.0)
    thorax = (
        _ramp((geo.bottom + 0.02 - y) / 0.03)
        * _ramp((a.tw * 1.02 - ax) / 0.02)
        * _ramp((ax - 0.035) / 0.01)
        * (y > a.apex - 0.08)
    )
    rib_layer = float(r_tex.uniform(0.04, 0.065)) * rib * thorax
    dcl = _segment_distance(ax, y, (0.035, a.apex + 0.035), (a.tw * 0.85, a.apex - 0.035))
    rib_layer += 0.09 * _ramp((0.013 - dcl) / 0.006)
    vert = (y / 0.048) % 1.0
    rib_layer += _ramp((0.034 - ax) / 0.008) * body * (0.05 + 0.025 * (vert < 0.8))
    img += 0.05 * _ramp((a.mw + 0.005 - ax) / 0.01) * _ramp((0.44 - y) / 0.05) * (y > 0.04)
    trachea = _ramp((0.012 - np.abs(x - a.cx - 0.004)) / 0.004) * _ramp((0.33 - y) / 0.02)
    img -= 0.06 * trachea * (y > 0.02)
    img += 0.08 * _ramp((0.033 - np.hypot(x - (a.cx + a.mw + 0.004), y - 0.29)) / 0.01)

    # Heart (bigger with cardiomegaly), sitting on the left hemidiaphragm.
    cm = active("cardiomegaly")
    ctr = a.ctr
    if cm is not None:
        ctr = (
            {"mild": 0.52, "moderate": 0.575, "severe": 0.635}[cm.severity]
            * float(fr["cardiomegaly"].uniform(0.98, 1.02))
            if cm.status == 1
            else 0.49
        )
    hw = ctr * a.tw
    hh = a.hh * (1.0 + 0.8 * (ctr - 0.45))
    hx = a.cx + 0.42 * hw  # about 30 % of the heart lies right of the midline
    hy = dome_l - hh * 0.5
    hd = ((x - hx) / hw) ** 2 + ((y - hy) / hh) ** 2
    heart = _ramp((1.0 - hd) / 0.12) * _ramp((dome_l + 0.015 - y) / 0.02)
    # Opacities replace air: `air` is the aerated fraction of each lung pixel, so stacked
    # opacities (heart, fluid, consolidation) saturate at soft-tissue density.
    air = 1.0 - 0.93 * heart
    img += 0.025 * heart

    # Lung markings: vessels fan out from the hila.
    hil_x = a.cx + np.where(geo.left, np.float32(1.0), np.float32(-1.0)) * (a.mw + 0.03)
    dh2 = (x - hil_x) ** 2 + ((y - 0.43) * 0.8) ** 2
    n1 = _smooth_noise(r_tex, 8, R)
    n2 = _smooth_noise(r_tex, min(36, R // 2), R)
    markings = np.maximum(0.5 * n1 + 0.8 * n2, 0.0) * (1.0 - 0.7 * _ramp(np.sqrt(dh2) / 0.3))
    markings += 0.6 * _ramp(1.0 - dh2 / 0.004)  # hilar vessels

    soft_masks: dict[str, tuple[np.ndarray, tuple]] = {}
    if cm is not None and cm.status == 1:
        soft_masks["Cardiomegaly"] = (heart, (hx, hy))

    # Pneumothorax: lucent rim without markings, visible pleural line, denser lung.
    ptx = 0.0
    f = active("pneumothorax")
    if f is not None:
        rr = fr["pneumothorax"]
        frac = {"mild": 0.10, "moderate": 0.22, "severe": 0.38}[f.severity]
        frac *= float(rr.uniform(0.9, 1.1))
        if f.status != 1:
            frac = 0.07
        dome = dome_l if f.side == "left" else dome_r
        ylim = a.apex + (0.40 + frac) * (dome - a.apex)
        w = frac * np.sqrt(_ramp((ylim - y) / (ylim - a.apex)))
        side = geo.side_mask(f.side)
        edge = t - (1.0 - w)
        cap = (a.apex + 0.30 * frac) - y
        ptx = lung * side * np.maximum(_ramp(edge * 60.0), _ramp(cap * 120.0)) * (w > 0.004)
        width = np.maximum(geo.lat - a.mw, 1e-3)
        line = np.exp(-((edge * width / 0.005) ** 2)) * (w > 0.01) * lung * side
        amp = 1.0 if f.status == 1 else faint
        img -= amp * 0.07 * ptx
        img += amp * 0.10 * line * (1.0 - ptx)
        air = air * (1.0 - amp * 0.5 * frac * lung * side * (1.0 - ptx))  # collapsing lung
        if f.status == 1:
            soft_masks["Pneumothorax"] = (ptx, geo.point(f.side, 0.95, 0.15, dome_r, dome_l))

    # Pleural effusion: meniscus-shaped opacity filling the base.
    f = active("effusion")
    if f is not None:
        rr = fr["effusion"]
        sides = ("right", "left") if f.side == "bilateral" else (f.side,)
        h = {"mild": 0.045, "moderate": 0.11, "severe": 0.20}[f.severity]
        amp = {"mild": 0.55, "moderate": 0.75, "severe": 0.92}[f.severity]
        if f.status != 1:
            h, amp = 0.035, 0.55 * faint
        union = 0.0
        for s in sides:
            hs = h * float(rr.uniform(0.85, 1.15))
            level = (dome_l if s == "left" else dome_r) + a.cp - hs
            surface = level - 0.05 * _ramp(t) ** 2
            fluid = _ramp((y - surface) / 0.035) * lung * geo.side_mask(s)
            air = air * (1.0 - amp * fluid)
            union = np.maximum(union, fluid)
        if f.status == 1:
            soft_masks["Pleural Effusion"] = (union, geo.point(sides[0], 0.8, 0.95, dome_r, dome_l))

    # Consolidation / pneumonia: patchy airspace opacity in a lobe.
    f = active("consolidation")
    if f is not None:
        rr = fr["consolidation"]
        t0 = float(rr.uniform(0.3, 0.7)) + _heart_shift(f)
        fz = _ZONE_FRAC[f.zone] + float(rr.uniform(-0.05, 0.05))
        x0, y0 = geo.point(f.side, t0, fz, dome_r, dome_l)
        r = {"mild": 0.05, "moderate": 0.075, "severe": 0.105}[f.severity]
        r *= float(rr.uniform(0.85, 1.15))
        amp = {"mild": 0.35, "moderate": 0.55, "severe": 0.8}[f.severity]
        patch = _smooth_noise(rr, max(4, R // 12), R)
        if f.status != 1:
            r, amp = 0.05, 0.35 * faint
        field = 1.0 - ((x - x0) ** 2 + (y - y0) ** 2) / r**2 + 0.35 * patch
        cons = _ramp((field - 0.15) / 0.35) * lung * geo.side_mask(f.side)
        air = air * (1.0 - amp * cons * (0.8 + 0.2 * np.clip(patch, -1.0, 1.0)))
        if f.status == 1:
            soft_masks["Consolidation"] = (cons, (x0, y0))
            if f.pneumonia:
                soft_masks["Pneumonia"] = (cons, (x0, y0))

    # Edema: bilateral perihilar (bat-wing) haze.
    f = active("edema")
    if f is not None:
        rr = fr["edema"]
        r = {"mild": 0.15, "moderate": 0.19, "severe": 0.24}[f.severity] * float(
            rr.uniform(0.9, 1.1)
        )
        amp = {"mild": 0.25, "moderate": 0.42, "severe": 0.6}[f.severity]
        if f.status != 1:
            r, amp = 0.13, 0.25 * faint
        haze = np.exp(-(((x - hil_x) / (r * 0.9)) ** 2 + ((y - 0.45) / r) ** 2)) * lung
        air = air * (1.0 - amp * haze)
        if f.status == 1:
            soft_masks["Edema"] = (haze / 0.9, (a.cx - a.mw - 0.05, 0.45))

    # Atelectasis: plate-like band (volume loss is handled above).
    f = active("atelectasis")
    if f is not None:
        rr = fr["atelectasis"]
        t0 = float(rr.uniform(0.3, 0.6)) + _heart_shift(f)
        fz = (0.72 if f.zone == "lower" else 0.52) + float(rr.uniform(-0.04, 0.04))
        x0, y0 = geo.point(f.side, t0, fz, dome_r, dome_l)
        length = {"mild": 0.10, "moderate": 0.14, "severe": 0.18}[f.severity]
        thick = {"mild": 0.007, "moderate": 0.012, "severe": 0.02}[f.severity]
        amp = {"mild": 0.5, "moderate": 0.65, "severe": 0.8}[f.severity]
        ang = math.radians(float(rr.uniform(-18, 18)))
        if f.status != 1:
            length, thick, amp = 0.08, 0.006, 0.5 * faint
        thick = max(thick, 0.6 / S)  # at least ~1 output pixel wide
        c, s_ = 0.5 * length * math.cos(ang), 0.5 * length * math.sin(ang)
        dseg = _segment_distance(x, y, (x0 - c, y0 - s_), (x0 + c, y0 + s_))
        band = _ramp((thick - dseg) / 0.006 + 0.5) * lung * geo.side_mask(f.side)
        air = air * (1.0 - amp * band)
        if f.status == 1:
            soft_masks["Atelectasis"] = (band, (x0, y0))

    # Nodule / mass: round opacity (~430 mm across the unit square sets the radius).
    f = active("lesion")
    if f is not None:
        rr = fr["lesion"]
        t0 = min(float(rr.uniform(0.35, 0.75)) + _heart_shift(f), 0.85)
        fz = _ZONE_FRAC[f.zone] + float(rr.uniform(-0.06, 0.06))
        x0, y0 = geo.point(f.side, t0, fz, dome_r, dome_l)
        r = max((f.size if f.status == 1 else 8.0) / 430.0 / 2.0, 0.7 / S)
        amp = {"mild": 0.45, "moderate": 0.6, "severe": 0.8}[f.severity]
        if f.status != 1:
            amp = 0.45 * faint
        d = np.sqrt((x - x0) ** 2 + (y - y0) ** 2) / r
        air = air * (1.0 - amp * np.sqrt(_ramp(1.0 - d * d)) * lung)
        if f.status == 1:
            soft_masks["Lung Lesion"] = (_ramp((1.0 - d) * r / 0.004 + 0.5), (x0, y0))

    aerated = lung * air
    img -= (a.soft - a.lung_density) * aerated
    img += 0.06 * markings * aerated * (1.0 - ptx)
    img += rib_layer  # bones lie over everything

    # ---- acquisition: exposure window, gamma, quantum noise, then devices ----------
    lo = float(r_noise.uniform(-EXPOSURE_BLACK, EXPOSURE_BLACK))
    hi = float(r_noise.uniform(*EXPOSURE_WHITE))
    gamma = float(r_noise.uniform(*EXPOSURE_GAMMA))
    img = _ramp((img - lo) / (hi - lo)) ** gamma
    img = _resize(img, S, Image.BICUBIC)
    sigma = float(r_noise.uniform(0.012, 0.03))
    img = img + sigma * r_noise.standard_normal(img.shape, dtype=np.float32)

    masks: dict[int, np.ndarray] = {}
    boxes: dict[int, list[float]] = {}

    def annotate(name: str, mask: np.ndarray, center) -> None:
        if not mask.any():  # tiny finding at low resolution: the pixel holding its centre
            ((px, py),) = geo.to_pixels([center])
            mask = mask.copy()
            mask[min(max(int(py), 0), S - 1), min(max(int(px), 0), S - 1)] = True
        masks[_L[name]] = mask
        boxes[_L[name]] = _bbox(mask)

    for name, (soft, center) in soft_masks.items():
        # Annotate what the kept report text calls positive (an impression-only report
        # may call a consolidation just "pneumonia").
        if labels[_L[name]] == 1:
            annotate(name, _resize(soft, S) > 0.5, center)

    f = active("devices")
    if f is not None:
        dev = _draw_devices(geo, f.devices, fr["devices"], dome_l)
        img = np.maximum(img, float(r_dev.uniform(0.85, 0.97)) * (dev / np.float32(255.0)))
        if labels[_L["Support Devices"]] == 1:
            annotate("Support Devices", dev > 127, (a.cx, 0.3))

    image = (_ramp(img) * 255.0 + 0.5).astype(np.uint8)
    return RenderedExample(
        image=image,
        findings=f_text,
        impression=i_text,
        labels=labels,
        masks=masks,
        boxes=boxes,
        subject_id=f"synth-{block:06d}-{group}",
        study_id=f"synth-study-{index:07d}",
        image_id=f"synth-{index:07d}",
        view=view,
        case=case,
    )


def _draw_devices(geo: _Geometry, devices, rng: np.random.Generator, dome_l: float) -> np.ndarray:
    """Tubes, lines and leads as a 0/255 mask at output resolution, along landmarks."""
    S = geo.out
    a = geo.a
    im = Image.new("L", (S, S), 0)
    draw = ImageDraw.Draw(im)
    tube_w = max(1, round(S * 0.011))
    line_w = max(1, round(S * 0.006))

    def poly(points, width):
        draw.line(geo.to_pixels(points), fill=255, width=width, joint="curve")

    def j(s=0.01):
        return float(rng.normal(0, s))

    for d in devices:
        if d == "ett":
            poly([(a.cx + 0.004 + j(), -0.02), (a.cx + 0.004, 0.27 + j(0.015))], tube_w)
        elif d == "ng":
            poly(
                [
                    (a.cx - 0.006 + j(), -0.02),
                    (a.cx - 0.004, 0.45),
                    (a.cx + 0.01, dome_l + 0.04),
                    (a.cx + 0.11 + j(), dome_l + 0.09),
                ],
                line_w,
            )
        elif d == "cvc":
            poly(
                [
                    (a.cx - 0.15 + j(), 0.02),
                    (a.cx - 0.08, 0.17),
                    (a.cx - 0.035, 0.25),
                    (a.cx - 0.025, 0.36 + j(0.015)),
                ],
                line_w,
            )
        elif d == "pacer":
            gx, gy = a.cx + 0.24 + j(), 0.17 + j()
            (x0, y0), (x1, y1) = geo.to_pixels([(gx - 0.035, gy - 0.022), (gx + 0.035, gy + 0.022)])
            draw.rectangle([min(x0, x1), min(y0, y1), max(x0, x1), max(y0, y1)], fill=255)
            poly([(gx, gy), (a.cx + 0.03, 0.24), (a.cx - 0.03, 0.42), (a.cx + 0.02, 0.6)], line_w)
        elif d == "ecg":
            for _ in range(3):
                px, py = a.cx + float(rng.uniform(-0.3, 0.3)), float(rng.uniform(0.15, 0.7))
                ((cx, cy),) = geo.to_pixels([(px, py)])
                rad = max(1.0, S * 0.014)
                draw.ellipse([cx - rad, cy - rad, cx + rad, cy + rad], outline=255, width=line_w)
                poly([(px, py), (px + float(rng.uniform(-0.2, 0.2)), -0.02)], max(1, line_w - 1))
    return np.asarray(im)


def render_example(
    index: int, seed: int = 0, image_size: int = 224, omit: Collection[str] = ()
) -> tuple[np.ndarray, str, str, list[int], dict[int, np.ndarray], dict[int, list[float]]]:
    """Render example `index`: (uint8 image [H, W], findings text, impression text,
    CheXpert labels (schema order), masks {label index: bool [H, W]},
    boxes {label index: [xmin, ymin, xmax, ymax] normalised}).

    `omit` names finding kinds (FINDING_KINDS) to leave out of the pixels only (the report
    and labels are unchanged): tests use it to measure what a finding does to the image.
    """
    r = _render(index, seed, image_size, omit)
    return r.image, r.findings, r.impression, r.labels, r.masks, r.boxes


def _png_chunk(tag: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data))


def encode_png(array: np.ndarray, level: int = 1) -> bytes:
    """8-bit grayscale PNG with the 'Up' row filter and fast zlib.

    Why not Pillow: its adaptive filtering costs ~3x more than rendering a 224 px image;
    any PNG decoder (Pillow, tf.io.decode_png) reads these files.
    """
    a = np.ascontiguousarray(array, dtype=np.uint8)
    if a.ndim != 2:
        raise ValueError(f"encode_png expects a 2-D uint8 array, got shape {a.shape}")
    h, w = a.shape
    raw = np.empty((h, w + 1), np.uint8)
    raw[:, 0] = 2  # filter type Up: each row minus the row above (mod 256)
    raw[0, 1:] = a[0]
    np.subtract(a[1:], a[:-1], out=raw[1:, 1:])
    ihdr = struct.pack(">IIBBBBB", w, h, 8, 0, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + _png_chunk(b"IHDR", ihdr)
        + _png_chunk(b"IDAT", zlib.compress(raw.tobytes(), level))
        + _png_chunk(b"IEND", b"")
    )


def make_record_fields(index: int, seed: int, image_size: int) -> dict:
    """Everything one schema record needs, as plain Python (picklable, TensorFlow-free)."""
    r = _render(index, seed, image_size)
    labels_sorted = sorted(r.masks)
    return {
        "image": encode_png(r.image),
        "height": int(r.image.shape[0]),
        "width": int(r.image.shape[1]),
        "image_id": r.image_id,
        "study_id": r.study_id,
        "subject_id": r.subject_id,
        "view": r.view,
        "split": split_of(r.subject_id, seed),
        "findings": r.findings,
        "impression": r.impression,
        "chexpert": list(r.labels),
        "boxes": [r.boxes[i] for i in labels_sorted],
        "box_labels": labels_sorted,
        "masks": [encode_png(r.masks[i].astype(np.uint8) * 255) for i in labels_sorted],
        "mask_labels": labels_sorted,
    }


def to_record(fields: dict) -> schema.ExampleRecord:
    return schema.ExampleRecord(image_format="png", source=SOURCE, **fields)


# --------------------------------------------------------------------------------------
# Corpus writing
# --------------------------------------------------------------------------------------

VOCAB_NAME = "vocab.txt"
DEFAULT_VOCAB_SIZE = 1000


def generator_params(num_images: int, image_size: int, seed: int, num_shards: int) -> dict:
    """What identifies a SynthCXR corpus (stored as manifest.generator)."""
    return {
        "name": GENERATOR_NAME,
        "version": GENERATOR_VERSION,
        "num_images": int(num_images),
        "image_size": int(image_size),
        "seed": int(seed),
        "num_shards": int(num_shards),
        "split_fractions": dict(SPLIT_FRACTIONS),
    }


def _fields_task(args: tuple[int, int, int]) -> dict:
    return make_record_fields(*args)


def _iter_fields(num_images: int, seed: int, image_size: int, workers: int | None):
    """Record fields in index order; rendering fans out over `workers` processes.

    Workers are forked where the platform allows it: they only run numpy, Pillow and
    zlib (never TensorFlow, whose threads the parent may hold), and fork needs no
    `if __name__ == "__main__"` guard in the caller's script. Each example depends on its
    index alone, so the output is identical for any number of workers.
    """
    import multiprocessing
    import os
    import warnings

    workers = (os.cpu_count() or 1) if workers is None else int(workers)
    workers = max(1, min(workers, num_images // 32))
    tasks = ((i, seed, image_size) for i in range(num_images))
    if workers == 1:
        yield from map(_fields_task, tasks)
        return
    method = "fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn"
    with warnings.catch_warnings():
        # Python warns about forking a multi-threaded (TensorFlow) parent; the children
        # never touch TensorFlow.
        warnings.filterwarnings("ignore", message=".*fork.*", category=DeprecationWarning)
        pool = multiprocessing.get_context(method).Pool(workers)
    with pool:
        yield from pool.imap(_fields_task, tasks, chunksize=16)


def generate_corpus(
    out_dir: str,
    num_images: int,
    image_size: int = 224,
    seed: int = 0,
    num_shards: int = 4,
    workers: int | None = None,
    vocab_size: int = DEFAULT_VOCAB_SIZE,
) -> dict:
    """Render `num_images` examples into sharded TFRecords + manifest.json + vocab.txt.

    Splits (train/validate/test, ~80/10/10) are assigned by a hash of the subject id, so a
    subject's studies never straddle splits. Each split gets `num_shards` shards (fewer
    if it has fewer examples). The WordPiece vocabulary is learned from the train reports
    so that the corpus is self-contained. Returns the manifest as written.
    """
    import itertools
    import os
    from collections import Counter

    from place_tf.data import manifest as manifest_lib

    if num_images < 1:
        raise ValueError(f"num_images must be >= 1, got {num_images}")
    if num_shards < 1:
        raise ValueError(f"num_shards must be >= 1, got {num_shards}")
    if image_size < 16:
        raise ValueError(f"image_size must be >= 16, got {image_size}")
    os.makedirs(out_dir, exist_ok=True)
    # No manifest while writing: an interrupted run is never mistaken for a corpus.
    old = os.path.join(out_dir, manifest_lib.MANIFEST_NAME)
    if os.path.exists(old):
        os.remove(old)
    counts = Counter(split_of(subject_id_of(i, seed), seed) for i in range(num_images))
    shards = {name: max(1, min(num_shards, counts.get(name, 0))) for name, _ in SPLIT_FRACTIONS}
    # Start the workers first: they render while this process imports TensorFlow.
    fields_iter = _iter_fields(num_images, seed, image_size, workers)
    first = next(fields_iter)
    from place_tf.data import tokenizer as tokenizer_lib  # imports Keras / TensorFlow

    m = manifest_lib.Manifest(source=SOURCE)
    m.generator = generator_params(num_images, image_size, seed, num_shards)
    m.generator.update({"vocab_file": VOCAB_NAME, "vocab_size": int(vocab_size)})
    writer = manifest_lib.ShardedWriter(out_dir, m, shards)
    texts: dict[str, list[str]] = {name: [] for name, _ in SPLIT_FRACTIONS}
    for fields in itertools.chain([first], fields_iter):
        rec = to_record(fields)
        writer.write(rec.split, schema.to_example(rec).SerializeToString())
        texts[rec.split].append(schema.report_text(rec.findings, rec.impression))
    writer.close()
    # Learn from train reports only (a tiny corpus without train subjects uses them all).
    vocab_texts = texts["train"] or [t for v in texts.values() for t in v]
    tokenizer_lib.learn_vocabulary(vocab_texts, vocab_size, os.path.join(out_dir, VOCAB_NAME))
    m.write(out_dir)
    return manifest_lib.read_manifest(out_dir)


def corpus_is_valid(
    out_dir: str, num_images: int, image_size: int = 224, seed: int = 0, num_shards: int = 4
) -> bool:
    """True when out_dir holds a complete SynthCXR corpus made with these parameters."""
    import os

    from place_tf.data import manifest as manifest_lib

    try:
        m = manifest_lib.read_manifest(out_dir)
    except (FileNotFoundError, ValueError, OSError):
        return False
    gen = m.get("generator", {})
    want = generator_params(num_images, image_size, seed, num_shards)
    if any(gen.get(k) != v for k, v in want.items()):
        return False
    names = [n for info in m.get("splits", {}).values() for n in info.get("shards", [])]
    needed = [*names, gen.get("vocab_file", VOCAB_NAME)]
    return all(os.path.exists(os.path.join(out_dir, n)) for n in needed)


def ensure_corpus(
    out_dir: str,
    num_images: int,
    image_size: int = 224,
    seed: int = 0,
    num_shards: int = 4,
    workers: int | None = None,
) -> dict:
    """Generate the corpus unless out_dir already holds one with the same parameters."""
    from place_tf.data import manifest as manifest_lib

    if corpus_is_valid(out_dir, num_images, image_size, seed, num_shards):
        return manifest_lib.read_manifest(out_dir)
    return generate_corpus(out_dir, num_images, image_size, seed, num_shards, workers)


def render_size(image_size: int) -> int:
    """The size a corpus for a model of `image_size` px is rendered at (STORED_IMAGE_SIZE)."""
    return max(int(image_size), STORED_IMAGE_SIZE)


def refresh_cache(out_dir: str, num_images: int, image_size: int, seed: int = 0) -> bool:
    """Make out_dir hold the SynthCXR corpus a model of `image_size` px trains on.

    The one policy of every command that generates a corpus on its own (the trainer, the
    TFX runner, tools/compare.py): absent -> generated at render_size(image_size); a
    SynthCXR cache made by another generator version or with another number of images,
    seed or render size, or with files missing -> regenerated (its sharding kept), with a
    warning; the same -> reused. A corpus SynthCXR did not make is the user's data and is
    never touched: returns False then, True when out_dir now holds the corpus asked for.
    """
    import logging
    import os

    from place_tf.data import manifest as manifest_lib

    size = render_size(image_size)
    log = logging.getLogger(__name__)
    if not os.path.exists(os.path.join(out_dir, manifest_lib.MANIFEST_NAME)):
        log.info("generating SynthCXR (%d images, %d px) in %s", num_images, size, out_dir)
        generate_corpus(out_dir, num_images, image_size=size, seed=seed)
        return True
    made_by = manifest_lib.read_manifest(out_dir).get("generator") or {}
    if made_by.get("name") != GENERATOR_NAME:
        return False
    shards = int(made_by.get("num_shards", 4))
    if corpus_is_valid(out_dir, num_images, size, seed, shards):
        return True
    wanted = generator_params(num_images, size, seed, shards)
    log.warning(
        "%s was made by %s with %s; regenerating it with %s",
        out_dir,
        GENERATOR_NAME,
        {k: made_by.get(k) for k in wanted},
        wanted,
    )
    generate_corpus(out_dir, num_images, image_size=size, seed=seed, num_shards=shards)
    return True
