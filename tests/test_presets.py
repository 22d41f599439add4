"""Named model presets: one table, selected by --model_preset, overridable field by field;
the flag files that use them give the configs their explicit fields used to give."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import textwrap

import pytest

from place_tf import config, flops, presets

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# What configs/quickstart.flags spelled out field by field before it named its preset.
QUICKSTART_BEFORE = dict(
    image_size=64, max_length=48, image_encoder="vit", patch_size=8, vit_layers=2,
    vit_heads=4, vit_width=128, vit_mlp=256, text_layers=2, text_heads=4, text_width=128,
    text_mlp=256, embed_dim=64, num_queries=8, query_layers=1, query_heads=4,
    query_width=128, cce_decoder_layers=1, cce_decoder_width=128, num_prototypes=64,
)  # fmt: skip


def test_every_preset_field_is_a_model_field_and_unknown_names_fail():
    fields = {f.name for f in dataclasses.fields(config.ModelConfig)}
    for name, preset in presets.MODEL_PRESETS.items():
        assert set(preset) <= fields, name
    with pytest.raises(ValueError, match=r"unknown model preset 'huge'.*'base'"):
        presets.model_fields("huge")
    assert config.preset_model_config("tiny", vocab_size=7).vocab_size == 7
    assert config.tiny_model_config().vit_width == 32 == config.TINY_MODEL_FIELDS["vit_width"]
    # The reference benchmark's full config is ViT-B/16 + BERT-6 at 224 px, 112 tokens.
    full = flops.BENCH_FULL
    assert (full.vit_layers, full.vit_width, full.text_layers, full.patch_size) == (12, 768, 6, 16)
    assert (flops.BENCH_SMALL.vit_layers, flops.BENCH_SMALL.vit_width) == (4, 256)


def test_from_flat_takes_a_model_preset_and_explicit_settings_override_it():
    cfgs = config.from_flat({"model_preset": "quickstart", "vit_layers": 3, "max_steps": 5})
    model = dataclasses.asdict(cfgs["model"])
    expected = dict(QUICKSTART_BEFORE, vit_layers=3)
    assert {k: model[k] for k in expected} == expected
    assert cfgs["data"].image_size == 64 and cfgs["train"].max_steps == 5
    with pytest.raises(ValueError, match="unknown model preset"):
        config.from_flat({"model_preset": "huge"})


_PARSE = textwrap.dedent(
    """
    import dataclasses, json, sys
    from place_tf import train
    train.FLAGS(["train", *sys.argv[1:]])
    cfg = train.configs_from_flags()
    print(json.dumps({"model": dataclasses.asdict(cfg.model),
                      "data": dataclasses.asdict(cfg.data)}))
    """
)


def _parse(*argv) -> dict:
    out = subprocess.run(
        [sys.executable, "-c", _PARSE, *argv],
        capture_output=True, text=True, cwd=REPO, timeout=300,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_quickstart_flags_name_the_preset_and_explicit_flags_override_it():
    got = _parse("--flagfile=configs/quickstart.flags", "--vit_layers=3", "--max_length=40")
    model = got["model"]
    expected = dict(QUICKSTART_BEFORE, vit_layers=3, max_length=40)
    assert {k: model[k] for k in expected} == expected
    # Shared names: the preset (and the override) set the input pipeline's too.
    assert got["data"]["image_size"] == 64 and got["data"]["max_length"] == 40
    # No preset: ModelConfig's defaults.
    plain = _parse("--vit_layers=3")["model"]
    assert plain["vit_width"] == config.ModelConfig().vit_width and plain["vit_layers"] == 3
