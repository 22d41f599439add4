"""Objective presets: which loss terms an objective uses, and their λ weights.

The objective's NAME fixes the set of terms; each term's λ weights it, and a term whose
λ is 0 is skipped entirely (its branch is neither built nor run). So a plain
`ObjectiveConfig()` (name "place") trains ITA + PCMA + CCE even though its λ_cta/λ_cpa
fields default to 1.
"""

from __future__ import annotations

import dataclasses

from place_tf.config import ObjectiveConfig, from_dict

TERMS = ("ita", "pcma", "cce", "cta", "cpa")

OBJECTIVE_TERMS: dict[str, tuple[str, ...]] = {
    "convirt": ("ita",),
    "mgca": ("ita", "cta", "cpa"),
    "place": ("ita", "pcma", "cce"),
    "place_no_pcma": ("ita", "cce"),
    "place_no_cce": ("ita", "pcma"),
}
OBJECTIVES = set(OBJECTIVE_TERMS)

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


def _check_name(name: str) -> None:
    if name not in OBJECTIVE_TERMS:
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
    cfg = from_dict(ObjectiveConfig, {**dataclasses.asdict(ObjectiveConfig()), **fields})
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
