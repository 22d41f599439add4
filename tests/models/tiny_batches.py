"""Random inputs for the tiny model (tests/models): images, token ids, padding masks."""

import numpy as np


def make_batch(b=4, size=32, length=16, seed=0):
    """A batch of `b` random [-1, 1] images and reports of 4..length real tokens."""
    rng = np.random.default_rng(seed)
    lengths = rng.integers(4, length + 1, b)
    return {
        "image": rng.uniform(-1, 1, (b, size, size, 1)).astype("float32"),
        "token_ids": rng.integers(5, 64, (b, length)).astype("int32"),
        "padding_mask": np.arange(length)[None, :] < lengths[:, None],
        "labels": np.zeros((b, 14), "float32"),
    }
