"""Tiny pre-trained checkpoints written the way their publishers lay them out (no network).

- Hugging Face BERT (`BertForMaskedLM`-style names with the `bert.` prefix, LayerNorm as
  weight/bias): config.json, model.safetensors, vocab.txt [, tokenizer_config.json].
- Hugging Face ViT (`ViTForImageClassification`, as google/vit-base-patch16-224 and
  facebook/deit-base-patch16-224): config.json, model.safetensors, preprocessor_config.json.
- keras-hub presets through `save_to_preset`.
Weights are seeded random numbers; tensors use PyTorch's layouts ([out, in] linear weights,
[out, in, kh, kw] convolutions), which keras-hub's converters transpose.
"""

from __future__ import annotations

import json
import os

import numpy as np

# A cased WordPiece vocabulary laid out as BERT-base-cased / Bio_ClinicalBERT's: [PAD] at
# 0, unused slots, [UNK] [CLS] [SEP] [MASK], then pieces (upper-case ones included).
CASED_VOCAB = (
    ["[PAD]", "[unused1]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    + ["the", "left", "lung", "is", "clear", ".", ",", "no", "pneumo", "##thorax"]
    + ["Left", "Lung", "No", "PA", "AP", "heart", "size", "normal", "##s", "effusion"]
    + ["There", "small", "right", "pleural", "CT", "a", "mild", "edema", "##ema", "ed"]
)
BERT = dict(vocab_size=len(CASED_VOCAB), hidden=32, heads=2, layers=4, mlp=64, positions=64)
VIT = dict(image_size=32, patch=8, hidden=32, heads=2, layers=2, mlp=64)
IMAGENET_MEAN = [0.485, 0.456, 0.406]
IMAGENET_STD = [0.229, 0.224, 0.225]


def _write_json(path: str, obj: dict) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=2)


def _save(tensors: dict, path: str) -> dict:
    """Write float32 tensors; returns exactly what was written."""
    from safetensors.numpy import save_file

    tensors = {k: np.ascontiguousarray(v, dtype=np.float32) for k, v in tensors.items()}
    save_file(tensors, path)
    return tensors


def _layer(r, prefix: str, attention: str, norms, h: int, m: int) -> dict:
    """One transformer layer in Hugging Face's names (BERT and ViT differ only in the
    attention scope and the two LayerNorms' names)."""
    t = {}
    linears = [(f"{attention}.{n}", h, h) for n in ("query", "key", "value")]
    linears += [("attention.output.dense", h, h), ("intermediate.dense", m, h)]
    linears += [("output.dense", h, m)]
    for name, out, inp in linears:
        t[f"{prefix}{name}.weight"] = r(out, inp)
        t[f"{prefix}{name}.bias"] = r(out)
    for name in norms:
        t[f"{prefix}{name}.weight"] = 1 + r(h)
        t[f"{prefix}{name}.bias"] = r(h)
    return t


def hf_bert_tensors(seed: int = 0, **arch) -> dict:
    a = {**BERT, **arch}
    rng = np.random.default_rng(seed)
    h, m = a["hidden"], a["mlp"]

    def r(*shape):
        return rng.normal(0, 0.05, shape)

    t = {
        "bert.embeddings.word_embeddings.weight": r(a["vocab_size"], h),
        "bert.embeddings.position_embeddings.weight": r(a["positions"], h),
        "bert.embeddings.token_type_embeddings.weight": r(2, h),
        "bert.embeddings.LayerNorm.weight": 1 + r(h),
        "bert.embeddings.LayerNorm.bias": r(h),
        "bert.pooler.dense.weight": r(h, h),
        "bert.pooler.dense.bias": r(h),
    }
    norms = ("attention.output.LayerNorm", "output.LayerNorm")
    for i in range(a["layers"]):
        t.update(_layer(r, f"bert.encoder.layer.{i}.", "attention.self", norms, h, m))
    return t


def write_hf_bert(
    path: str, seed: int = 0, do_lower_case: bool | None = False, vocab=CASED_VOCAB, **arch
) -> dict:
    """A Hugging Face BERT directory; returns its tensors. do_lower_case=None: no
    tokenizer_config.json (as emilyalsentzer/Bio_ClinicalBERT)."""
    a = {**BERT, **arch, "vocab_size": len(vocab)}
    os.makedirs(path, exist_ok=True)
    _write_json(
        os.path.join(path, "config.json"),
        {
            "architectures": ["BertForMaskedLM"],
            "model_type": "bert",
            "vocab_size": a["vocab_size"],
            "hidden_size": a["hidden"],
            "num_hidden_layers": a["layers"],
            "num_attention_heads": a["heads"],
            "intermediate_size": a["mlp"],
            "max_position_embeddings": a["positions"],
            "type_vocab_size": 2,
            "hidden_act": "gelu",
            "hidden_dropout_prob": 0.1,
            "attention_probs_dropout_prob": 0.1,
            "layer_norm_eps": 1e-12,
        },
    )
    tensors = _save(hf_bert_tensors(seed, **a), os.path.join(path, "model.safetensors"))
    with open(os.path.join(path, "vocab.txt"), "w", encoding="utf-8") as f:
        f.write("".join(t + "\n" for t in vocab))
    if do_lower_case is not None:
        _write_json(
            os.path.join(path, "tokenizer_config.json"),
            {"do_lower_case": do_lower_case, "tokenizer_class": "BertTokenizer"},
        )
    return tensors


def write_hf_vit(path: str, seed: int = 0, mean=IMAGENET_MEAN, std=IMAGENET_STD, **arch) -> dict:
    """A Hugging Face ViTForImageClassification directory; returns its tensors."""
    a = {**VIT, **arch}
    rng = np.random.default_rng(seed)
    h, m, p = a["hidden"], a["mlp"], a["patch"]
    n = (a["image_size"] // p) ** 2

    def r(*shape):
        return rng.normal(0, 0.05, shape)

    os.makedirs(path, exist_ok=True)
    _write_json(
        os.path.join(path, "config.json"),
        {
            "architectures": ["ViTForImageClassification"],
            "model_type": "vit",
            "image_size": a["image_size"],
            "patch_size": p,
            "num_channels": 3,
            "hidden_size": h,
            "num_hidden_layers": a["layers"],
            "num_attention_heads": a["heads"],
            "intermediate_size": m,
            "hidden_act": "gelu",
            "hidden_dropout_prob": 0.0,
            "attention_probs_dropout_prob": 0.0,
            "layer_norm_eps": 1e-12,
            "qkv_bias": True,
        },
    )
    _write_json(
        os.path.join(path, "preprocessor_config.json"),
        {
            "image_processor_type": "ViTImageProcessor",
            "image_mean": list(mean),
            "image_std": list(std),
            "size": {"height": a["image_size"], "width": a["image_size"]},
        },
    )
    t = {
        "vit.embeddings.cls_token": r(1, 1, h),
        "vit.embeddings.position_embeddings": r(1, n + 1, h),
        "vit.embeddings.patch_embeddings.projection.weight": r(h, 3, p, p),
        "vit.embeddings.patch_embeddings.projection.bias": r(h),
        "vit.layernorm.weight": 1 + r(h),
        "vit.layernorm.bias": r(h),
    }
    norms = ("layernorm_before", "layernorm_after")
    for i in range(a["layers"]):
        t.update(_layer(r, f"vit.encoder.layer.{i}.", "attention.attention", norms, h, m))
    return _save(t, os.path.join(path, "model.safetensors"))


def write_keras_hub_bert(path: str, lowercase: bool = False, **arch):
    """A keras-hub BERT preset (backbone + tokenizer); returns the backbone."""
    import keras_hub

    a = {**BERT, **arch}
    backbone = keras_hub.models.BertBackbone(
        vocabulary_size=len(CASED_VOCAB),
        num_layers=a["layers"],
        num_heads=a["heads"],
        hidden_dim=a["hidden"],
        intermediate_dim=a["mlp"],
        max_sequence_length=a["positions"],
    )
    backbone.save_to_preset(path)
    keras_hub.models.BertTokenizer(
        vocabulary=list(CASED_VOCAB), lowercase=lowercase
    ).save_to_preset(path)
    return backbone


def write_keras_hub_vit(path: str, **arch):
    """A keras-hub ViT preset (RGB backbone, no image converter); returns the backbone."""
    import keras_hub

    a = {**VIT, **arch}
    backbone = keras_hub.models.ViTBackbone(
        image_shape=(a["image_size"], a["image_size"], 3),
        patch_size=a["patch"],
        num_layers=a["layers"],
        num_heads=a["heads"],
        hidden_dim=a["hidden"],
        mlp_dim=a["mlp"],
    )
    backbone.save_to_preset(path)
    return backbone
