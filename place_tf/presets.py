"""Named model sizes: the one table. `--model_preset=NAME` (place_tf.train) starts the
model from a preset; any model flag given explicitly overrides that field. A field a
preset leaves out keeps ModelConfig's default. image_size and max_length are shared with
DataConfig, so a preset sets the input pipeline's as well (as the flag of that name does).

This module imports nothing, so config.py can read it without an import cycle.
"""

from __future__ import annotations

MODEL_PRESETS: dict[str, dict] = {
    # The smallest model the code accepts (32-px images, 16 tokens, one layer per stack):
    # tests, benchmarks and fault-injection runs.
    "tiny": dict(
        image_size=32,
        patch_size=8,
        vit_layers=1,
        vit_heads=2,
        vit_width=32,
        vit_mlp=64,
        text_layers=1,
        text_heads=2,
        text_width=32,
        text_mlp=64,
        max_length=16,
        embed_dim=16,
        num_queries=4,
        query_layers=1,
        query_heads=2,
        query_width=32,
        cce_decoder_layers=1,
        cce_decoder_width=32,
        num_prototypes=8,
    ),
    # configs/quickstart.flags: learns SynthCXR on two CPU cores in minutes.
    "quickstart": dict(
        image_size=64,
        max_length=48,
        image_encoder="vit",
        patch_size=8,
        vit_layers=2,
        vit_heads=4,
        vit_width=128,
        vit_mlp=256,
        text_layers=2,
        text_heads=4,
        text_width=128,
        text_mlp=256,
        embed_dim=64,
        num_queries=8,
        query_layers=1,
        query_heads=4,
        query_width=128,
        cce_decoder_layers=1,
        cce_decoder_width=128,
        num_prototypes=64,
    ),
    # The shared reference benchmark's "small" config: base with 4 + 2 narrow layers.
    "small": dict(
        image_size=224,
        max_length=112,
        image_encoder="vit",
        patch_size=16,
        vit_layers=4,
        vit_heads=4,
        vit_width=256,
        vit_mlp=1024,
        text_layers=2,
        text_heads=4,
        text_width=256,
        text_mlp=1024,
        embed_dim=128,
        num_queries=16,
    ),
    # PLACE's pre-training model (configs/pretrain.flags): ViT-B/16 + a 6-layer BERT,
    # 112 report tokens; also the reference benchmark's "full" config.
    "base": dict(
        image_size=224,
        max_length=112,
        image_encoder="vit",
        patch_size=16,
        vit_layers=12,
        vit_heads=12,
        vit_width=768,
        vit_mlp=3072,
        text_layers=6,
        text_heads=12,
        text_width=768,
        text_mlp=3072,
        embed_dim=128,
        num_queries=16,
    ),
}


def model_fields(name: str) -> dict:
    """The fields preset `name` sets (a copy); ValueError naming the presets otherwise."""
    if name not in MODEL_PRESETS:
        raise ValueError(f"unknown model preset {name!r}: use one of {sorted(MODEL_PRESETS)}")
    return dict(MODEL_PRESETS[name])
