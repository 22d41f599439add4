"""CorpusGate: stops the pipeline before training when the corpus is bad.

ExampleValidator compares statistics with the curated schema (missing features, values
outside a domain, wrong types) but cannot see inside an image or notice an empty report
string. The gate reads ExampleValidator's anomalies and also checks every example itself
(image bytes decode as PNG/JPEG, report non-empty, CheXpert labels in range). If the
schema has anomalies, or the fraction of bad examples exceeds `max_bad_fraction`, it raises
(the run fails, nothing downstream runs, nothing is pushed). Only counts are reported,
never report text or ids.
"""

import json
import os
from collections import Counter

from absl import logging
from tfx import v1 as tfx
from tfx.dsl.component.experimental.annotations import InputArtifact, OutputArtifact, Parameter
from tfx.dsl.component.experimental.decorators import component
from tfx.types import artifact_utils, standard_artifacts

from pipelines.components.artifacts import CorpusReport


class CorpusRejectedError(RuntimeError):
    """The corpus failed validation; the message lists the counts per reason."""


def split_files(examples_uri: str, split: str) -> list[str]:
    import tensorflow as tf

    return sorted(tf.io.gfile.glob(os.path.join(examples_uri, f"Split-{split}", "*")))


def check_records(files: list[str]) -> Counter:
    """Count examples by problem: ok, unparseable, bad_image, empty_report, bad_labels."""
    import tensorflow as tf

    from place_tf.data import schema

    counts: Counter = Counter()
    ds = tf.data.TFRecordDataset(files, compression_type="GZIP")
    for serialized in ds.as_numpy_iterator():
        try:
            rec = schema.from_example(serialized)
        except Exception:  # noqa: BLE001 - any parse failure is a bad record
            counts["unparseable"] += 1
            continue
        if not rec.findings.strip() and not rec.impression.strip():
            counts["empty_report"] += 1
            continue
        if any(v not in (1, 0, -1, schema.LABEL_MISSING) for v in rec.chexpert):
            counts["bad_labels"] += 1
            continue
        try:
            if not (tf.io.is_jpeg(rec.image) or rec.image[:8] == b"\x89PNG\r\n\x1a\n"):
                raise ValueError("not PNG/JPEG")
            tf.io.decode_image(rec.image, channels=1, expand_animations=False)
        except (tf.errors.OpError, ValueError):
            counts["bad_image"] += 1
            continue
        counts["ok"] += 1
    return counts


def anomalies_found(anomalies_uri: str, split: str) -> list[str]:
    """Feature names with anomalies in ExampleValidator's output for one split."""
    from tensorflow_metadata.proto.v0 import anomalies_pb2

    path = os.path.join(anomalies_uri, f"Split-{split}", "SchemaDiff.pb")
    if not os.path.exists(path):
        return []
    with open(path, "rb") as f:
        anomalies = anomalies_pb2.Anomalies.FromString(f.read())
    return sorted(anomalies.anomaly_info.keys())


@component
def CorpusGate(  # noqa: N802 - TFX component naming
    examples: InputArtifact[standard_artifacts.Examples],
    anomalies: InputArtifact[standard_artifacts.ExampleAnomalies],
    report: OutputArtifact[CorpusReport],
    max_bad_fraction: Parameter[float] = 0.0,
):
    splits = artifact_utils.decode_split_names(examples.split_names)
    result = {"splits": {}, "schema_anomalies": {}}
    problems = []
    for split in splits:
        counts = check_records(split_files(examples.uri, split))
        total = sum(counts.values())
        bad = total - counts["ok"]
        result["splits"][split] = dict(counts)
        logging.info(
            "corpus gate: split %s: %d examples, %d bad %s", split, total, bad, dict(counts)
        )
        if total == 0:
            problems.append(f"split {split!r} is empty")
        elif bad / total > max_bad_fraction:
            problems.append(
                f"split {split!r}: {bad} of {total} examples are bad "
                f"({ {k: v for k, v in counts.items() if k != 'ok'} }), above max_bad_fraction={max_bad_fraction}"
            )
        feats = anomalies_found(anomalies.uri, split)
        if feats:
            result["schema_anomalies"][split] = feats
            problems.append(f"split {split!r}: ExampleValidator anomalies in features {feats}")
    with open(os.path.join(report.uri, "corpus_report.json"), "w") as f:
        json.dump(result, f, indent=2, sort_keys=True)
    report.set_int_custom_property("passed", 0 if problems else 1)
    if problems:
        raise CorpusRejectedError("corpus rejected before training: " + "; ".join(problems))


__all__ = ["CorpusGate", "CorpusRejectedError", "check_records", "tfx"]
