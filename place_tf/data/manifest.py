"""Manifest of a converted corpus: counts per split, skipped rows by reason, checksums.

Every corpus directory (SynthCXR or converted) holds `manifest.json` beside its shards:

    {
      "schema_version": 1,
      "source": "mimic-cxr",
      "splits": {"train": {"examples": 123, "shards": ["train-00000-of-00004.tfrecord", ...]}},
      "skipped": {"missing_image": 2, "empty_report": 5},
      "source_checksums": {"mimic-cxr-2.0.0-split.csv.gz": "sha256:..."},
      "shard_checksums": {"train-00000-of-00004.tfrecord": "sha256:..."},
      "created": "...", "generator": {...}
    }
A converter's `generator` also records its options, the shard plan ("sharding": rows per
split, estimated bytes per example, the target), a peer split file ("splits_from"), the
vocabulary it learned from the train reports ("vocabulary": file, size, reports, sha256;
also "vocab_file" / "vocab_size" as SynthCXR writes them) and its label-fraction files.
Skip reasons are counts only: no row content (reports, ids) is written here.
"""

from __future__ import annotations

import dataclasses
import datetime
import hashlib
import json
import os
from collections import Counter

from place_tf import fileio
from place_tf.data import schema

MANIFEST_NAME = "manifest.json"


def sha256_file(path: str, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while True:
            b = f.read(chunk)
            if not b:
                break
            h.update(b)
    return "sha256:" + h.hexdigest()


def shard_name(split: str, index: int, num_shards: int) -> str:
    return f"{split}-{index:05d}-of-{num_shards:05d}.tfrecord"


@dataclasses.dataclass
class Manifest:
    source: str
    splits: dict = dataclasses.field(default_factory=dict)
    skipped: Counter = dataclasses.field(default_factory=Counter)
    source_checksums: dict = dataclasses.field(default_factory=dict)
    shard_checksums: dict = dataclasses.field(default_factory=dict)
    generator: dict = dataclasses.field(default_factory=dict)
    schema_version: int = schema.SCHEMA_VERSION

    def skip(self, reason: str, n: int = 1) -> None:
        self.skipped[reason] += n

    def to_json(self) -> dict:
        return {
            "schema_version": self.schema_version,
            "source": self.source,
            "splits": self.splits,
            "skipped": dict(sorted(self.skipped.items())),
            "source_checksums": self.source_checksums,
            "shard_checksums": self.shard_checksums,
            "generator": self.generator,
            "created": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        }

    def write(self, out_dir: str, checksum_shards: bool = True) -> str:
        if checksum_shards:
            for info in self.splits.values():
                for name in info.get("shards", []):
                    self.shard_checksums[name] = sha256_file(os.path.join(out_dir, name))
        return fileio.write_json(os.path.join(out_dir, MANIFEST_NAME), self.to_json())


def read_manifest(corpus_dir: str) -> dict:
    path = os.path.join(corpus_dir, MANIFEST_NAME)
    if not os.path.exists(path):
        raise FileNotFoundError(
            f"no {MANIFEST_NAME} in {corpus_dir}: not a PLACE-TF corpus (create one with "
            "tools/make_synthetic.py or `python -m place_tf.data.convert`)"
        )
    with open(path) as f:
        m = json.load(f)
    if m.get("schema_version") != schema.SCHEMA_VERSION:
        raise ValueError(
            f"{path}: schema_version {m.get('schema_version')} is not {schema.SCHEMA_VERSION}; reconvert the corpus"
        )
    return m


def split_files(corpus_dir: str, split: str) -> list[str]:
    """Absolute shard paths of one split, checked to exist (clear error naming the file)."""
    m = read_manifest(corpus_dir)
    if split not in m["splits"]:
        raise ValueError(
            f"{corpus_dir}: split {split!r} not in manifest (has {sorted(m['splits'])})"
        )
    files = [os.path.join(corpus_dir, n) for n in m["splits"][split]["shards"]]
    for p in files:
        if not os.path.exists(p):
            raise FileNotFoundError(f"shard listed in the manifest is missing: {p}")
    return files


class ShardedWriter:
    """Writes serialized examples round-robin into N shards per split (uncompressed TFRecord).

    Files are written under a temporary name and renamed on close, so an interrupted
    conversion never leaves a shard that looks complete.
    """

    def __init__(self, out_dir: str, manifest: Manifest, shards_per_split: dict[str, int]):
        import tensorflow as tf

        self._tf = tf
        self.out_dir = out_dir
        self.manifest = manifest
        os.makedirs(out_dir, exist_ok=True)
        self._writers: dict[str, list] = {}
        self._names: dict[str, list[str]] = {}
        self._counts: Counter = Counter()
        for split, n in shards_per_split.items():
            names = [shard_name(split, i, n) for i in range(n)]
            self._names[split] = names
            self._writers[split] = [
                tf.io.TFRecordWriter(os.path.join(out_dir, nm + ".tmp")) for nm in names
            ]

    def write(self, split: str, serialized: bytes) -> None:
        if split not in self._writers:
            raise ValueError(f"split {split!r} has no shards (configured: {sorted(self._writers)})")
        ws = self._writers[split]
        ws[self._counts[split] % len(ws)].write(serialized)
        self._counts[split] += 1

    def close(self) -> None:
        for split, ws in self._writers.items():
            for w, nm in zip(ws, self._names[split], strict=True):
                w.close()
                os.replace(os.path.join(self.out_dir, nm + ".tmp"), os.path.join(self.out_dir, nm))
            self.manifest.splits[split] = {
                "examples": int(self._counts[split]),
                "shards": self._names[split],
            }
        self._writers = {}
