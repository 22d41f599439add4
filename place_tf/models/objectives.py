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

CCE_TEACHERS = ("stopgrad", "ema")


def _check_name(name: str) -> None:
    if name not in OBJECTIVE_TERMS:
        raise ValueError(f"unknown objective {name!r}; expected one of {sorted(OBJECTIVES)}")


def objective_config(name: str, **overrides) -> ObjectiveConfig:
    """ObjectiveConfig for a preset: λ=1 for its terms, λ=0 for the others; then overrides."""
    _check_name(name)
    fields = {f"lambda_{t}": (1.0 if t in OBJECTIVE_TERMS[name] else 0.0) for t in TERMS}
    fields["name"] = name
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
