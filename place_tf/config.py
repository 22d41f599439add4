"""Typed configs (dataclasses) for data, model, objective and training.

Flags (place_tf.train) and the TFX `custom_config` are converted into these once; the
library only ever sees the dataclasses. Every [design] choice of the method
(../shared/design/place-method.md) is a field here, so a later reading of the paper can
change it without a rewrite.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any

from place_tf import presets

# The objective configs live with the objective table (objectives.py imports nothing).
from place_tf.objectives import ObjectiveConfig, objective_config

__all__ = [  # the re-exported names are part of this module's API
    "Configs",
    "DataConfig",
    "ModelConfig",
    "ObjectiveConfig",
    "TrainConfig",
    "from_dict",
    "from_flat",
    "objective_config",
    "preset_model_config",
    "tiny_model_config",
]


@dataclasses.dataclass
class DataConfig:
    corpus_dir: str = ""  # directory with manifest.json + TFRecord shards
    # Alternatively explicit TFRecord globs (comma-separated), e.g. TFX Examples splits;
    # GZIP compression is detected from the ".gz" suffix.
    train_files: str = ""
    eval_files: str = ""  # held-out examples for the end-of-run TensorBoard images
    image_size: int = 224
    max_length: int = 112  # report tokens, [CLS] and [SEP] included
    vocab_file: str = ""  # WordPiece vocabulary (one token per line)
    vocab_size: int = 30522  # used when learning a vocabulary
    # Lower-case report text before tokenization even when the text checkpoint's
    # tokenizer is cased (MGCA does); learned vocabularies are lower-case anyway.
    lowercase_reports: bool = False
    augment: bool = True
    shuffle_buffer: int = 2048
    deterministic: bool = False
    frontal_only: bool = True
    # Section order of the report text (data/reports.py REPORT_ORDERS); MGCA's recipe
    # (configs/objective_mgca.flags) reads IMPRESSION then FINDINGS.
    report_order: str = "findings_impression"


@dataclasses.dataclass
class ModelConfig:
    image_encoder: str = "vit"  # "vit" | "resnet50"
    image_size: int = 224
    patch_size: int = 16
    vit_layers: int = 12
    vit_heads: int = 12
    vit_width: int = 768
    vit_mlp: int = 3072
    text_layers: int = 6
    text_heads: int = 12
    text_width: int = 768
    text_mlp: int = 3072
    text_pooling: str = "mean"  # "mean" over tokens | "cls" (see models/text_encoder.py)
    vocab_size: int = 30522
    max_length: int = 112
    embed_dim: int = 128  # shared projection space
    num_queries: int = 16  # K pathology queries (VPOE / T-POR)
    query_layers: int = 2
    query_heads: int = 8
    query_width: int = 256
    cce_decoder_layers: int = 2
    cce_decoder_width: int = 256
    cce_mask_ratio: float = 0.5
    num_prototypes: int = 500  # MGCA CPA
    dropout: float = 0.0
    # Pre-trained initialisation (place_tf/pretrained.py): a keras-hub preset name,
    # kaggle://..., hf://owner/name, or a local keras-hub / Hugging Face directory.
    # The encoders' architecture then comes from the checkpoint, and with text_init the
    # tokenizer (vocabulary, casing) too. "" = random initialisation.
    image_init: str = ""
    text_init: str = ""


# The tiny preset (place_tf/presets.py) as flat fields: tests and fault-injection runs
# pass it as flags or TFX settings; the vocabulary size comes from the corpus or the caller.
TINY_MODEL_FIELDS: dict[str, int] = presets.model_fields("tiny")


def preset_model_config(name: str, **overrides: Any) -> ModelConfig:
    """ModelConfig of model preset `name` (place_tf/presets.py), `overrides` replacing
    any field."""
    return ModelConfig(**{**presets.model_fields(name), **overrides})


def tiny_model_config(vocab_size: int = 64, **overrides: Any) -> ModelConfig:
    """ModelConfig of the tiny model; `overrides` replace any of its fields."""
    return ModelConfig(**{**TINY_MODEL_FIELDS, "vocab_size": vocab_size, **overrides})


@dataclasses.dataclass
class TrainConfig:
    model_dir: str = "runs/quickstart"
    per_replica_batch: int = 16
    epochs: int = 1
    steps_per_epoch: int = 0  # 0 = one pass over the data
    max_steps: int = 0  # 0 = epochs * steps_per_epoch
    learning_rate: float = 2e-5
    weight_decay: float = 0.05
    beta_1: float = 0.9
    beta_2: float = 0.999
    warmup_steps: int = 0
    strategy: str = "default"  # default | one_device | mirrored | multiworker | tpu
    num_cpu_devices: int = 0  # >1: split the CPU into logical devices (tests, benchmarks)
    jit_compile: bool = True
    mixed_precision: str = "float32"  # float32 | mixed_bfloat16 | mixed_float16
    checkpoint_every: int = 100
    keep_checkpoints: int = 3
    log_every: int = 10  # losses and counters are read back to the host this often
    # Training steps per tf.function call (>1 saves per-call dispatch on accelerators;
    # checkpoints, logs and signals are then handled between calls).
    steps_per_call: int = 1
    seed: int = 0
    deterministic: bool = False
    max_bad_steps: int = 20  # non-finite losses tolerated before stopping


def to_dict(cfg: Any) -> dict:
    return dataclasses.asdict(cfg)


def from_dict(cls, d: dict):
    """Build `cls` from a dict, rejecting unknown keys with a clear message."""
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - names)
    if unknown:
        raise ValueError(f"unknown {cls.__name__} fields: {unknown}")
    return cls(**d)


SECTIONS = {
    "data": DataConfig,
    "model": ModelConfig,
    "objective": ObjectiveConfig,
    "train": TrainConfig,
}


def field_names() -> set[str]:
    """All settable names; a name shared by sections (image_size, ...) sets all of them."""
    return {f.name for cls in SECTIONS.values() for f in dataclasses.fields(cls)} - {"name"}


def from_flat(values: dict, objective: str = "place") -> dict:
    """{"data": DataConfig, ...} from one flat dict of settings (CLI flags, TFX custom_config).

    The objective starts from the named preset (place_tf.objectives); objective keys in
    `values` override it. A "model_preset" key starts the model from that preset
    (place_tf/presets.py); model keys in `values` override it. Unknown keys are an error
    naming them.
    """
    values = dict(values)
    preset = values.pop("model_preset", "")
    if preset:
        values = {**presets.model_fields(preset), **values}
    unknown = sorted(set(values) - field_names())
    if unknown:
        raise ValueError(f"unknown training settings: {unknown}")
    out = {}
    for section, cls in SECTIONS.items():
        names = {f.name for f in dataclasses.fields(cls)}
        picked = {k: v for k, v in values.items() if k in names}
        if section == "objective":
            out[section] = objective_config(objective, **picked)
        else:
            out[section] = cls(**picked)
    return out


@dataclasses.dataclass
class Configs:
    """The four configs of a training run."""

    data: DataConfig
    model: ModelConfig
    objective: ObjectiveConfig
    train: TrainConfig


def dumps(**cfgs: Any) -> str:
    return json.dumps({k: to_dict(v) for k, v in cfgs.items()}, indent=2, sort_keys=True)
