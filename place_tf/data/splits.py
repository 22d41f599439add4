"""Seeded splits: 1 % / 10 % / 100 % label-fraction training subsets and patient hash splits.

Downstream fine-tuning (classification, detection, segmentation) is reported with 1 %, 10 %
and 100 % of the training labels. The subsets are written once as split files, plain text
with one image id per line under `<corpus>/splits/train_1pct.txt` (lines starting with "#"
are comments), so every run and every framework trains on the same images.

Selection (deterministic for a given corpus, fraction and seed):
- single-label corpora (`labels/class` >= 0 for every example: COVIDx, RSNA, SIIM,
  Object-CXR) are stratified by class: round(f * n_c) examples of each class c, at least
  one when the class is present;
- multi-label corpora (CheXpert vectors) take a seeded random order, with first the
  earliest example positive for each of the 14 labels that has any positive, so that
  every label keeps at least one positive (the subset grows past round(f * N) only when
  there are more such labels than that).
Subsets are nested (1 % within 10 % within 100 %), because each is a prefix of one order.

`hash_split` puts every image of a subject in the same split (sha256 of salt + subject id).
"""

from __future__ import annotations

import hashlib
import logging
import os
import random
from collections.abc import Iterable, Sequence

from place_tf import fileio
from place_tf.data import schema

log = logging.getLogger(__name__)

DEFAULT_FRACTIONS = (0.01, 0.1, 1.0)
SPLITS_DIR = "splits"


def hash_split(
    subject_id: str,
    fractions: Sequence[float] = (0.8, 0.1, 0.1),
    salt: str = "",
    names: Sequence[str] = schema.SPLITS,
) -> str:
    """Split name for a subject: stable across runs, machines and Python versions."""
    if len(fractions) != len(names):
        raise ValueError(f"hash_split: {len(fractions)} fractions for {len(names)} names {names}")
    if any(f < 0 for f in fractions) or abs(sum(fractions) - 1.0) > 1e-6:
        raise ValueError(f"hash_split: fractions {tuple(fractions)} must be >= 0 and sum to 1")
    digest = hashlib.sha256((salt + "\x00" + str(subject_id)).encode("utf-8")).digest()
    u = int.from_bytes(digest[:8], "big") / 2.0**64  # uniform in [0, 1)
    acc = 0.0
    for name, f in zip(names, fractions, strict=True):
        acc += f
        if u < acc:
            return name
    return next(n for n, f in zip(reversed(names), reversed(fractions), strict=True) if f > 0)


def split_file_name(fraction: float, split: str = "train") -> str:
    """0.01 -> 'train_1pct.txt', 0.1 -> 'train_10pct.txt', 0.005 -> 'train_0.5pct.txt'."""
    if not 0 < fraction <= 1:
        raise ValueError(f"fraction {fraction} must be in (0, 1]")
    pct = f"{fraction * 100:.6f}".rstrip("0").rstrip(".")
    return f"{split}_{pct}pct.txt"


def _target(fraction: float, n: int) -> int:
    return min(n, max(1, int(round(fraction * n)))) if n else 0


def label_fraction_subsets(
    examples: Iterable[tuple[str, int, Sequence[int]]],
    fractions: Sequence[float] = DEFAULT_FRACTIONS,
    seed: int = 0,
    mode: str = "auto",
) -> dict[float, list[str]]:
    """{fraction: sorted image ids} from (image_id, class_label, chexpert) triples.

    mode: "class" (stratify by class label), "chexpert" (label coverage), or "auto"
    (class when every example has a class label >= 0, else chexpert).
    """
    items: dict[str, tuple[int, tuple[int, ...]]] = {}
    dups = 0
    for image_id, cls, chex in examples:
        if image_id in items:
            dups += 1
            continue
        items[image_id] = (int(cls), tuple(int(v) for v in chex))
    if dups:
        log.warning("label_fraction_subsets: %d duplicate image ids ignored", dups)
    if mode == "auto":
        mode = "class" if items and all(c >= 0 for c, _ in items.values()) else "chexpert"
    if mode not in ("class", "chexpert"):
        raise ValueError(f"mode must be auto, class or chexpert, got {mode!r}")
    ids = sorted(items)  # order-independent of the input
    rng = random.Random(seed)
    if mode == "class":
        by_class: dict[int, list[str]] = {}
        for i in ids:
            by_class.setdefault(items[i][0], []).append(i)
        for members in by_class.values():
            rng.shuffle(members)
        return {
            f: sorted(i for m in by_class.values() for i in m[: _target(f, len(m))])
            for f in fractions
        }
    order = list(ids)
    rng.shuffle(order)
    first: list[str] = []
    for k in range(schema.NUM_CHEXPERT):
        pos = next((i for i in order if len(items[i][1]) > k and items[i][1][k] == 1), None)
        if pos is not None and pos not in first:
            first.append(pos)
    chosen = set(first)
    order = first + [i for i in order if i not in chosen]
    return {f: sorted(order[: max(_target(f, len(order)), len(first))]) for f in fractions}


def read_split_examples(corpus_dir: str, split: str = "train") -> list[tuple[str, int, list[int]]]:
    """(image_id, class_label, chexpert) of every example of a corpus split."""
    import tensorflow as tf

    from place_tf.data import manifest

    files = manifest.split_files(corpus_dir, split)
    spec = {k: schema.feature_spec()[k] for k in (schema.IMAGE_ID, schema.CLASS_LABEL)}
    spec[schema.CHEXPERT] = schema.feature_spec()[schema.CHEXPERT]
    out = []
    parse = tf.autograph.experimental.do_not_convert(lambda s: tf.io.parse_example(s, spec))
    ds = tf.data.TFRecordDataset(files).batch(256).map(parse)
    for batch in ds.as_numpy_iterator():
        for i, c, v in zip(
            batch[schema.IMAGE_ID], batch[schema.CLASS_LABEL], batch[schema.CHEXPERT], strict=True
        ):
            out.append((i.decode("utf-8"), int(c), [int(x) for x in v]))
    return out


def write_label_fraction_splits(
    corpus_dir: str,
    fractions: Sequence[float] = DEFAULT_FRACTIONS,
    seed: int = 0,
    split: str = "train",
    mode: str = "auto",
    examples: Sequence[tuple[str, int, Sequence[int]]] | None = None,
) -> dict[float, str]:
    """Write `<corpus>/splits/<split>_<pct>pct.txt` for each fraction; returns their paths.
    `examples` (image_id, class_label, chexpert): given by a converter, else read."""
    if examples is None:
        examples = read_split_examples(corpus_dir, split)
    if not examples:
        raise ValueError(f"{corpus_dir}: split {split!r} has no examples to subsample")
    subsets = label_fraction_subsets(examples, fractions, seed=seed, mode=mode)
    out_dir = os.path.join(corpus_dir, SPLITS_DIR)
    os.makedirs(out_dir, exist_ok=True)
    paths = {}
    for f, ids in subsets.items():
        path = os.path.join(out_dir, split_file_name(f, split))
        header = (
            f"# place_tf label-fraction split: {split} fraction={f} seed={seed} "
            f"mode={mode} n={len(ids)} of {len(set(e[0] for e in examples))}\n"
        )
        fileio.write_text(path, header + "".join(i + "\n" for i in ids))
        paths[f] = path
        log.info("split file %s: %d ids", os.path.basename(path), len(ids))
    return paths


def load_split_ids(path: str) -> list[str]:
    """Image ids of a split file (blank lines and "#" comments ignored), in file order."""
    if not os.path.exists(path):
        raise FileNotFoundError(
            f"split file {path} not found (write it with "
            "place_tf.data.splits.write_label_fraction_splits)"
        )
    with open(path, encoding="utf-8") as f:
        ids = [ln.strip() for ln in f]
    return [i for i in ids if i and not i.startswith("#")]
