"""Resource bounds: a decompression bomb (a valid 10000x10000 PNG of ~100 KB) is rejected
from its header, without decoding, at serving (the SavedModel's max_image_pixels,
default 50 M pixels) and at conversion (the converter's decode_check), and peak memory
(VmHWM of a fresh process; not ru_maxrss, which a child starts with its parent's
high-water mark, ~2.8 GB after the rest of the suite) stays bounded: decoding it would take >= 100 MB
(8-bit) to 600 MB (the serving decoder's uint16 + float32 copies).
"""

import os
import textwrap

import pytest
import reliability_util as U

MB = 1024 * 1024
PEAK_LIMIT_MB = 1536  # whole process, TensorFlow and the model included
GROWTH_LIMIT_MB = 64  # what rejecting the bomb may add to the peak


@pytest.fixture(scope="module")
def bombs(tmp_path_factory):
    d = tmp_path_factory.mktemp("bombs")
    out = {}
    for w, h in ((10000, 10000), (20000, 20000)):
        path = str(d / f"bomb-{w}x{h}.png")
        with open(path, "wb") as f:
            f.write(U.png_bomb(w, h))
        out[(w, h)] = path
    assert os.path.getsize(out[(10000, 10000)]) < 1 * MB
    return out


@pytest.mark.slow
def test_serving_rejects_a_decompression_bomb_without_decoding(canary_run, bombs):
    code = textwrap.dedent(
        f"""
        import io, json
        import numpy as np
        import tensorflow as tf
        import tensorflow_text  # noqa
        from PIL import Image

        def peak_mb():  # VmHWM: this process' own peak (ru_maxrss inherits the parent's)
            for line in open("/proc/self/status"):
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024

        fn = tf.saved_model.load({canary_run["export_dir"]!r}).signatures["serving_default"]
        buf = io.BytesIO()
        Image.fromarray(np.zeros((32, 32), np.uint8)).save(buf, format="PNG")
        fn(images=tf.constant([buf.getvalue()]))  # warm-up: graph, thread pools
        fn(images=tf.constant([buf.getvalue()]))
        before = peak_mb()
        bomb = open({bombs[(10000, 10000)]!r}, "rb").read()
        try:
            fn(images=tf.constant([bomb]))
            message = None
        except tf.errors.InvalidArgumentError as e:
            message = e.message
        print(json.dumps({{"before": before, "after": peak_mb(), "message": message}}))
        """
    )
    r = U.run_python(code)
    assert r["message"] is not None, "the 10000x10000 image was accepted"
    assert "image too large" in r["message"] and "10000x10000 = 100000000 pixels" in r["message"]
    assert "max_image_pixels=50000000" in r["message"] and "not decoded" in r["message"]
    assert r["after"] - r["before"] < GROWTH_LIMIT_MB, r
    assert r["after"] < PEAK_LIMIT_MB, r


CONVERT_CODE = """
import json
from place_tf.data.convert import beam_skeleton as bs

def peak_mb():  # VmHWM: this process' own peak (ru_maxrss inherits the parent's)
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024

data = open({path!r}, "rb").read()
before = peak_mb()
try:
    result, reason, message = list(bs.decode_check(data)), None, None
except bs.SkipError as e:
    result, reason, message = None, e.reason, str(e)
print(json.dumps({{"before": before, "after": peak_mb(), "result": result,
                  "reason": reason, "message": message}}))
"""


def test_converter_rejects_a_huge_bomb_without_decoding(bombs):
    """400 M pixels: beyond any bound; rejected (counted under the returned skip reason)
    from the header, memory flat."""
    r = U.run_python(CONVERT_CODE.format(path=bombs[(20000, 20000)]))
    assert r["result"] is None, r
    assert r["reason"] in ("too_large_image", "undecodable_image")
    # The bound is stated: Pillow's own or the converter's MAX_IMAGE_PIXELS.
    assert "400000000 pixels" in r["message"], r
    assert "exceeds limit of" in r["message"] or "MAX_IMAGE_PIXELS" in r["message"], r
    assert r["after"] - r["before"] < GROWTH_LIMIT_MB, r
    assert r["after"] < PEAK_LIMIT_MB, r


def test_converter_rejects_a_bomb_the_training_pipeline_would_reject(bombs):
    """100 M pixels: over the training pipeline's bound (pipeline.MAX_PIXELS = 64 M, such a
    record would be skipped as wrong_shape at every epoch), so the converter must not store
    it (Pillow alone would only warn: its own bound is 89 M, an error only at 179 M)."""
    from place_tf.data import pipeline
    from place_tf.data.convert import beam_skeleton as bs

    assert bs.MAX_IMAGE_PIXELS == pipeline.MAX_PIXELS
    r = U.run_python(CONVERT_CODE.format(path=bombs[(10000, 10000)]))
    assert r["result"] is None and r["reason"] == "too_large_image", r
    assert "10000x10000" in r["message"] and str(bs.MAX_IMAGE_PIXELS) in r["message"]
    assert r["after"] - r["before"] < GROWTH_LIMIT_MB, r
