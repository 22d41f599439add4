"""Objectives: the one table of the pre-training methods (their loss terms and display
names), the ObjectiveConfig, and its presets.

The objective's NAME fixes the set of terms; each term's λ weights it, and a term whose
λ is 0 is skipped entirely (its branch is neither built nor run). So a plain
`ObjectiveConfig()` (name "place") trains ITA + PCMA + CCE even though its λ_cta/λ_cpa
fields default to 1. The CLI's --objective choices, the comparison's methods and the
logged total loss all derive from OBJECTIVE_TABLE.

This module imports nothing of the project: config.py re-exports ObjectiveConfig and
objective_config, and the models read the table, without an import cycle.
"""

from __future__ import annotations

import dataclasses

# Every loss term, in the order the total loss sums them.
TERMS = ("ita", "pcma", "cce", "cta", "cpa")


@dataclasses.dataclass(frozen=True)
class Objective:
    terms: tuple[str, ...]
    label: str  # how reports and plots name the method


OBJECTIVE_TABLE: dict[str, Objective] = {
    "convirt": Objective(("ita",), "ConVIRT"),
    "mgca": Objective(("ita", "cta", "cpa"), "MGCA"),
    "place": Objective(("ita", "pcma", "cce"), "PLACE"),
    "place_no_pcma": Objective(("ita", "cce"), "PLACE w/o PCMA"),
    "place_no_cce": Objective(("ita", "pcma"), "PLACE w/o CCE"),
}
OBJECTIVE_TERMS: dict[str, tuple[str, ...]] = {n: o.terms for n, o in OBJECTIVE_TABLE.items()}
OBJECTIVES = set(OBJECTIVE_TABLE)

# Settings a preset changes besides its λ (explicit overrides still win). MGCA as its code
# runs (HKU-MedAI/MGCA mgca/models/mgca/mgca_module.py, mgca/models/backbones/encoder.py):
# a fixed ITA temperature 0.07 (softmax_temperature) with the two cross-entropies summed,
# parameter-free token attention (use_local_atten=False) with word weights from the last
# layer's [CLS] attention clipped to its 10-90 % quantiles, Linear-BN-ReLU-Linear-BN heads
# with hidden 2048, prototypes frozen in epoch 0 (freeze_prototypes_epochs=1). Its λ stay
# 1/1/1: the README's command (`python mgca_module.py --gpus 2 --strategy ddp`) passes the
# argparse defaults --lambda_1/2/3 = 1 to MGCA(**args.__dict__), which override the
# constructor's 1/0.7/0.5.
PRESET_SETTINGS: dict[str, dict] = {
    "mgca": dict(
        learn_temperature=False,
        temperature_init=0.07,
        ita_sum_directions=True,
        cta_attention="parameter_free",
        cta_word_weights="cls_attention",
        projection_head="mgca",
        projection_hidden=2048,
        freeze_prototypes_epochs=1,
    ),
}

CCE_TEACHERS = ("stopgrad", "ema")
CHOICES = {
    "pcma_presence": ("none", "text_attention"),
    "cta_attention": ("learned", "parameter_free"),
    "cta_word_weights": ("uniform", "cls_attention"),
    "projection_head": ("mlp", "mgca"),
}


@dataclasses.dataclass
class ObjectiveConfig:
    name: str = "place"  # a key of OBJECTIVE_TABLE
    lambda_ita: float = 1.0
    lambda_pcma: float = 1.0
    lambda_cce: float = 1.0
    lambda_cta: float = 1.0
    lambda_cpa: float = 1.0
    temperature_init: float = 0.07
    learn_temperature: bool = True
    cce_target_temperature: float = 0.05
    cce_student_temperature: float = 0.1
    cce_teacher: str = "stopgrad"  # "stopgrad" | "ema"
    ema_momentum: float = 0.996
    sinkhorn_epsilon: float = 0.05
    sinkhorn_iterations: int = 3
    # Method diagnostics (issue #21) as extra "diag/..." keys of compute_losses' dict.
    diagnostics: bool = True
    # [design] variants of issue #21 (the defaults are the recipe of place-method.md).
    pcma_presence: str = "none"  # "none" | "text_attention": presence-weighted L_inter
    cce_exclude_diagonal: bool = False  # CCE target and student without self-similarity
    cce_center: bool = False  # CCE on mean-centred patch tokens ("covariance" target)
    # MGCA's code (HKU-MedAI/MGCA); objective_config("mgca") sets these.
    ita_sum_directions: bool = False  # ITA = CE(i->t) + CE(t->i) instead of their mean
    cta_attention: str = "learned"  # "learned" (MultiHeadAttention) | "parameter_free"
    cta_word_weights: str = "uniform"  # "uniform" | "cls_attention" (parameter_free only)
    projection_head: str = "mlp"  # global/local heads: "mlp" | "mgca" (Linear-BN-ReLU-Linear-BN)
    projection_hidden: int = 0  # hidden width of those heads; 0 = 4 * embed_dim
    freeze_prototypes_epochs: int = 0  # CPA prototypes get no gradient in these epochs


def _check_name(name: str) -> None:
    if name not in OBJECTIVES:
        raise ValueError(f"unknown objective {name!r}; expected one of {sorted(OBJECTIVES)}")


def objective_config(name: str, **overrides) -> ObjectiveConfig:
    """ObjectiveConfig for a preset: λ=1 for its terms, λ=0 for the others; then overrides."""
    _check_name(name)
    fields = {f"lambda_{t}": (1.0 if t in OBJECTIVE_TERMS[name] else 0.0) for t in TERMS}
    fields["name"] = name
    fields.update(PRESET_SETTINGS.get(name, {}))
    if "name" in overrides and overrides["name"] != name:
        raise ValueError(f"objective_config({name!r}) got a conflicting name={overrides['name']!r}")
    fields.update(overrides)
    unknown = sorted(set(fields) - {f.name for f in dataclasses.fields(ObjectiveConfig)})
    if unknown:
        raise ValueError(f"unknown ObjectiveConfig fields: {unknown}")
    cfg = ObjectiveConfig(**{**dataclasses.asdict(ObjectiveConfig()), **fields})
    validate(cfg)
    return cfg


def validate(cfg: ObjectiveConfig) -> None:
    """Raise ValueError for an unknown name, a negative λ, a bad teacher or temperature."""
    _check_name(cfg.name)
    for t in TERMS:
        if getattr(cfg, f"lambda_{t}") < 0:
            raise ValueError(f"ObjectiveConfig.lambda_{t} must be >= 0")
    if cfg.cce_teacher not in CCE_TEACHERS:
        raise ValueError(
            f"ObjectiveConfig.cce_teacher must be one of {CCE_TEACHERS}, got {cfg.cce_teacher!r}"
        )
    if cfg.temperature_init <= 0:
        raise ValueError("ObjectiveConfig.temperature_init must be > 0")
    if not 0.0 <= cfg.ema_momentum <= 1.0:
        raise ValueError("ObjectiveConfig.ema_momentum must be in [0, 1]")
    for field, allowed in CHOICES.items():
        if getattr(cfg, field) not in allowed:
            raise ValueError(
                f"ObjectiveConfig.{field} must be one of {allowed}, got {getattr(cfg, field)!r}"
            )
    if cfg.projection_hidden < 0 or cfg.freeze_prototypes_epochs < 0:
        raise ValueError(
            "ObjectiveConfig.projection_hidden and freeze_prototypes_epochs must be >= 0"
        )


def term_weights(cfg: ObjectiveConfig) -> dict[str, float]:
    """{term: λ} of every term (the total loss is the λ-weighted sum of the active ones)."""
    return {t: getattr(cfg, f"lambda_{t}") for t in TERMS}


def active_terms(cfg: ObjectiveConfig) -> tuple[str, ...]:
    """The terms the model builds and computes: the objective's terms with λ > 0."""
    _check_name(cfg.name)
    return tuple(t for t in OBJECTIVE_TERMS[cfg.name] if getattr(cfg, f"lambda_{t}") > 0)


def loss_keys(cfg: ObjectiveConfig) -> tuple[str, ...]:
    """Keys of the dict PLACEModel.compute_losses returns for `cfg` (total excluded)."""
    keys: list[str] = []
    for t in active_terms(cfg):
        keys.append(t)
        if t == "pcma":
            keys += ["pcma_inter", "pcma_slot"]
    keys.append("temperature")
    return tuple(keys)
