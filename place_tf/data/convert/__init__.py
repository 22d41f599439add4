"""Converters from the official dataset downloads to PLACE-TF TFRecord corpora (Apache Beam).

    python -m place_tf.data.convert <source> --input DIR --output DIR [--shards N] [beam args]

Sources: mimic, chexpert, chexpert_5x200, rsna, covidx, siim, object_cxr, generic (your
own CSV), r2gen (R2Gen's annotation.json: IU X-Ray, MIMIC-CXR report generation) (one
module each over `beam_skeleton`). Modules are imported on demand, so `import place_tf.data.convert`
stays cheap.
"""

from __future__ import annotations

import importlib

SOURCES: dict[str, str] = {
    "mimic": "place_tf.data.convert.mimic:MimicConverter",
    "chexpert": "place_tf.data.convert.chexpert:ChexpertConverter",
    "chexpert_5x200": "place_tf.data.convert.chexpert:Chexpert5x200Converter",
    "rsna": "place_tf.data.convert.rsna:RsnaConverter",
    "covidx": "place_tf.data.convert.covidx:CovidxConverter",
    "siim": "place_tf.data.convert.siim:SiimConverter",
    "object_cxr": "place_tf.data.convert.object_cxr:ObjectCxrConverter",
    "generic": "place_tf.data.convert.generic:GenericConverter",
    "r2gen": "place_tf.data.convert.r2gen:R2GenConverter",
}


def converter_class(source: str):
    """The Converter subclass for a source name (ValueError listing the known ones)."""
    if source not in SOURCES:
        raise ValueError(f"unknown source {source!r}; expected one of {sorted(SOURCES)}")
    module, cls = SOURCES[source].split(":")
    return getattr(importlib.import_module(module), cls)


def convert(source: str, input_dir: str, output_dir: str, **kwargs) -> dict:
    """Library entry point: `convert("rsna", in, out, shards=4, beam_args=[...], **options)`.

    Keyword arguments that `run_conversion` takes (shards, eval_shards, beam_args,
    overwrite, checksum_shards) go there; the rest are the converter's own options.
    Returns the manifest as a dict.
    """
    from place_tf.data.convert import beam_skeleton

    run_keys = (
        "shards",
        "eval_shards",
        "beam_args",
        "overwrite",
        "checksum_shards",
        "target_shard_bytes",
        "examples_per_shard",
        "vocab_size",
        "splits_from",
    )
    run_kwargs = {k: kwargs.pop(k) for k in run_keys if k in kwargs}
    conv = converter_class(source)(input_dir, **kwargs)
    return beam_skeleton.run_conversion(conv, output_dir, **run_kwargs)
