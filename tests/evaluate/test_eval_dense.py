"""Dense downstream tasks: annotation geometry (task_data), segmentation, detection and
report generation (place_tf/evaluate/{task_data,segmentation,detection,report_generation}.py).

Unit tests check hand-computed geometry, targets and metrics; the slow tests run each task
end to end on a tiny SynthCXR corpus with the contract's tiny PLACEModel."""

import io
import math
import os

import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

from place_tf.data import schema
from place_tf.evaluate import detection, report_generation, segmentation
from place_tf.evaluate import task_data as td

NUM_IMAGES = 60
IMAGE_SIZE = 32


def _png(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array.astype(np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def _example(image, boxes=(), box_labels=(), masks=(), mask_labels=(), image_id="img-0"):
    """A parsed example dict as task_data._parse yields it."""
    return {
        schema.IMAGE: tf.constant(_png(image)),
        schema.IMAGE_ID: tf.constant(image_id),
        schema.BOXES: tf.constant(np.asarray(boxes, np.float32).reshape(-1)),
        schema.BOX_LABELS: tf.constant(np.asarray(box_labels, np.int64).reshape(-1)),
        schema.MASKS: tf.constant([_png(m) for m in masks], dtype=tf.string),
        schema.MASK_LABELS: tf.constant(np.asarray(mask_labels, np.int64).reshape(-1)),
    }


def _rect_image(h, w, box_px):
    """h×w black image with a white rectangle at pixel box (x0, y0, x1, y1), end-exclusive."""
    img = np.zeros((h, w), np.uint8)
    x0, y0, x1, y1 = box_px
    img[y0:y1, x0:x1] = 255
    return img


# ------------------------------------------------------------------ geometry
@pytest.mark.parametrize(
    "h,w,box_px,expected",
    [
        # 40×80 -> scale 0.4: 16×32 resized, 8 rows of padding on top.
        # x: 20/80=0.25 -> 0.25, 60/80 -> 0.75; y: (8 + 0.5*16)/32 = 0.5, (8 + 16)/32 = 0.75.
        (40, 80, (20, 20, 60, 40), (0.25, 0.5, 0.75, 0.75)),
        # 80×40 -> 32×16 resized, 8 columns of padding on the left.
        # x: (8 + 0.5*16)/32 = 0.5, (8 + 16)/32 = 0.75; y: 0.25, 0.75.
        (80, 40, (20, 20, 40, 60), (0.5, 0.25, 0.75, 0.75)),
    ],
)
def test_box_on_non_square_image_maps_to_padded_coords_and_lands_on_its_pixels(
    h, w, box_px, expected
):
    x0, y0, x1, y1 = box_px
    box = [x0 / w, y0 / h, x1 / w, y1 / h]
    ex = _example(_rect_image(h, w, box_px), boxes=[box], box_labels=[9])
    image, boxes, classes = td.decode_boxes(ex, IMAGE_SIZE, labels=[9])
    np.testing.assert_allclose(boxes.numpy(), [expected], atol=1e-6)
    np.testing.assert_array_equal(classes.numpy(), [0])
    # The image's bright pixels are exactly the mapped box (pixel centres inside it).
    img = image.numpy()[..., 0]
    assert img.min() == pytest.approx(-1.0) and img.max() == pytest.approx(1.0)
    bx0, by0, bx1, by1 = (round(v * IMAGE_SIZE) for v in expected)
    assert np.all(img[by0 + 1 : by1 - 1, bx0 + 1 : bx1 - 1] > 0.9)
    outside = np.ones_like(img, bool)
    outside[by0 - 1 : by1 + 1, bx0 - 1 : bx1 + 1] = False
    assert np.all(img[outside] < -0.9)


def test_mask_is_aligned_with_image_under_resize_with_pad():
    h, w, box_px = 40, 80, (20, 20, 60, 40)
    rect = _rect_image(h, w, box_px)
    ex = _example(rect, masks=[rect], mask_labels=[9])
    image, mask = td.decode_masks(ex, IMAGE_SIZE, labels=[9])
    assert mask.shape == (IMAGE_SIZE, IMAGE_SIZE, 1)
    m = mask.numpy()[..., 0]
    assert set(np.unique(m)) <= {0.0, 1.0}
    # Mask foreground == bright image pixels; its extent is the box mapped by boxes_to_padded.
    np.testing.assert_array_equal(m > 0.5, image.numpy()[..., 0] > 0.0)
    ys, xs = np.nonzero(m)
    mapped = td.boxes_to_padded([[20 / 80, 20 / 40, 60 / 80, 1.0]], h, w, IMAGE_SIZE).numpy()[0]
    np.testing.assert_allclose(
        [xs.min(), ys.min(), xs.max() + 1, ys.max() + 1], mapped * IMAGE_SIZE, atol=0.5
    )


def test_preprocess_matches_the_pretraining_pipeline():
    from place_tf.data import pipeline

    rng = np.random.default_rng(0)
    arr = rng.integers(0, 256, size=(45, 70), dtype=np.uint8)
    data = _png(arr)
    ours, height, width = td.preprocess_image(tf.constant(data), IMAGE_SIZE)
    theirs, code = pipeline.decode_and_resize(
        tf.constant(data), tf.constant(45, tf.int64), tf.constant(70, tf.int64), IMAGE_SIZE
    )
    assert int(code) == 0 and (int(height), int(width)) == (45, 70)
    np.testing.assert_allclose(ours.numpy(), pipeline.normalize(theirs).numpy(), atol=1e-5)


def test_decode_masks_union_per_label_and_empty():
    a = np.zeros((16, 16), np.uint8)
    a[2:6, 2:6] = 255
    b = np.zeros((16, 16), np.uint8)
    b[10:14, 8:12] = 255
    ex = _example(np.full((16, 16), 100, np.uint8), masks=[a, b], mask_labels=[9, 10])
    _, union = td.decode_masks(ex, 16)
    np.testing.assert_array_equal(union.numpy()[..., 0], (a | b) > 0)
    _, only9 = td.decode_masks(ex, 16, labels=[9])
    np.testing.assert_array_equal(only9.numpy()[..., 0], a > 0)
    _, per = td.decode_masks(ex, 16, labels=[10, 9], union=False)
    assert per.shape == (16, 16, 2)
    np.testing.assert_array_equal(per.numpy()[..., 0], b > 0)
    np.testing.assert_array_equal(per.numpy()[..., 1], a > 0)
    _, none = td.decode_masks(ex, 16, labels=[2])
    assert none.shape == (16, 16, 1) and float(tf.reduce_sum(none)) == 0.0
    with pytest.raises(ValueError, match="need `labels`"):
        td.decode_masks(ex, 16, union=False)


def test_mask_count_mismatch_names_the_fields_and_image():
    ex = _example(
        np.zeros((16, 16), np.uint8),
        masks=[np.zeros((16, 16), np.uint8)],
        mask_labels=[9, 10],
        image_id="bad-image-7",
    )
    with pytest.raises(tf.errors.InvalidArgumentError, match=r"mask/encoded[\s\S]*bad-image-7"):
        td.decode_masks(ex, 16)


def test_resolve_labels_rejects_unknown_and_duplicate_names():
    assert td.resolve_labels("Pneumothorax, Pleural Effusion", "", "mask") == [9, 10]
    assert td.resolve_labels([7, "Lung Opacity"], "", "box") == [7, 3]
    with pytest.raises(ValueError, match="unknown CheXpert label 'Pneumothoraxx'"):
        td.resolve_labels("Pneumothoraxx", "", "mask")
    with pytest.raises(ValueError, match="twice"):
        td.resolve_labels(["Pneumonia", 7], "", "box")


# ------------------------------------------------------------------ decoders
@pytest.mark.parametrize("grid,size", [(4, 32), (7, 32)])
def test_setr_decoder_maps_token_grid_to_image_logits(grid, size):
    dec = segmentation.SETRDecoder(size, num_classes=2, width=8)
    dec.build((None, grid, grid, 16))
    out = dec(tf.random.normal([3, grid, grid, 16]), training=False)
    assert out.shape == (3, size, size, 2)
    # Gradients reach every trainable variable.
    with tf.GradientTape() as tape:
        loss = tf.reduce_mean(dec(tf.random.normal([2, grid, grid, 16]), training=True) ** 2)
    grads = tape.gradient(loss, dec.trainable_variables)
    assert all(g is not None for g in grads)


def test_unet_decoder_uses_skips_and_checks_their_resolution():
    dec = segmentation.UNetDecoder(32, num_classes=1, width=16)
    skips = [tf.random.normal([2, 4, 4, 12]), tf.random.normal([2, 8, 8, 6])]
    dec.build((None, 2, 2, 8), [s.shape for s in skips])
    grid = tf.random.normal([2, 2, 2, 8])
    out = dec(grid, skips, training=False)
    assert out.shape == (2, 32, 32, 1)
    changed = dec(grid, [skips[0], skips[1] + 5.0], training=False)
    assert float(tf.reduce_max(tf.abs(changed - out))) > 0  # the skip feeds the output
    with pytest.raises(ValueError, match="resolution"):
        dec(grid, [skips[1], skips[0]], training=False)


def test_dice_bce_loss_hand_values():
    y = tf.constant([[[[1.0], [0.0]]]])  # [1, 1, 2, 1]
    logits = tf.constant([[[[0.0], [0.0]]]])
    # BCE = ln 2; soft Dice = (2*0.5 + 1) / (1 + 1 + 1) = 2/3 -> loss = ln 2 + 1/3.
    assert float(segmentation.dice_bce_loss(y, logits)) == pytest.approx(math.log(2) + 1 / 3, 1e-6)


def test_dice_summary_positive_images_and_all():
    gt = np.zeros((3, 4, 4), bool)
    gt[0, :2, :2] = True  # 4 px
    gt[1, 0, 0] = True  # 1 px
    pred = np.zeros_like(gt)
    pred[0, :2, :1] = True  # 2 px inside -> Dice 2*2/(2+4) = 2/3, IoU 1/2
    # image 1: empty prediction -> Dice 0; image 2: both empty -> Dice 1
    r = segmentation._dice_summary(pred, gt)
    assert r["dice"] == pytest.approx((2 / 3 + 0) / 2)
    assert r["iou"] == pytest.approx(0.25)
    assert r["dice_all"] == pytest.approx((2 / 3 + 0 + 1) / 3)
    assert (r["test_examples"], r["test_positive"]) == (3, 2)


def test_anchor_free_head_shapes_and_config_round_trip():
    head = detection.AnchorFreeHead(3, width=8, upsample=1, num_convs=1)
    head.build((None, 4, 4, 16))
    out = head(tf.random.normal([2, 4, 4, 16]), training=False)
    assert out["cls"].shape == (2, 8, 8, 3)
    assert out["box"].shape == (2, 8, 8, 4) and out["ctr"].shape == (2, 8, 8, 1)
    # The focal prior: every class starts near probability 0.01.
    assert float(tf.reduce_mean(tf.sigmoid(out["cls"]))) == pytest.approx(0.01, abs=0.01)
    clone = detection.AnchorFreeHead.from_config(head.get_config())
    assert clone.output_grid(4) == 8


def test_assign_targets_hand_checked():
    t = detection.assign_targets([[0.3, 0.3, 0.8, 0.8], [0.05, 0.05, 0.1, 0.1]], [1, 0], 4, 2)
    pos = t["pos"].numpy()
    expected = np.zeros((4, 4))
    expected[1:3, 1:3] = 1  # centres 0.375 / 0.625 lie inside the big box
    expected[0, 0] = 1  # the tiny box is smaller than a cell: its centre cell
    np.testing.assert_array_equal(pos, expected)
    np.testing.assert_array_equal(t["cls"].numpy()[1:3, 1:3].argmax(-1), np.ones((2, 2)))
    assert t["cls"].numpy()[0, 0].tolist() == [1.0, 0.0]
    np.testing.assert_allclose(t["box"].numpy()[2, 2], [0.3, 0.3, 0.8, 0.8])
    # Centre cell of the big box is (2, 2) (centre 0.55): centerness 1; cell (1, 1):
    # l = 0.375-0.3, r = 0.8-0.375 -> sqrt((0.075/0.425)^2).
    assert t["ctr"].numpy()[2, 2, 0] == pytest.approx(1.0)
    assert t["ctr"].numpy()[1, 1, 0] == pytest.approx(0.075 / 0.425, 1e-5)
    assert t["ctr"].numpy()[0, 0, 0] == pytest.approx(1.0)
    empty = detection.assign_targets(np.zeros((0, 4)), np.zeros((0,)), 4, 2)
    assert float(tf.reduce_sum(empty["pos"])) == 0.0


def test_box_encoding_round_trip_and_giou():
    boxes = tf.constant([[0.1, 0.2, 0.4, 0.9]] * 16)
    back = detection.decode_boxes(detection.encode_boxes(boxes, 4)[None], 4)[0]
    np.testing.assert_allclose(back.numpy(), boxes.numpy(), atol=1e-6)
    a = tf.constant([[0.0, 0.0, 1.0, 1.0], [0.0, 0.0, 1.0, 1.0]])
    b = tf.constant([[0.0, 0.0, 1.0, 1.0], [2.0, 0.0, 3.0, 1.0]])
    # Identical: 1. Disjoint unit squares 1 apart: IoU 0, hull 3, union 2 -> -1/3.
    np.testing.assert_allclose(detection.giou(a, b).numpy(), [1.0, -1 / 3], atol=1e-6)


def test_detection_loss_is_minimal_at_the_target():
    t = detection.assign_targets([[0.3, 0.3, 0.8, 0.8]], [0], 4, 1)
    targets = {k: v[None] for k, v in t.items()}
    params = detection.encode_boxes(tf.reshape(t["box"], [-1, 4]), 4)
    ctr = np.clip(t["ctr"].numpy(), 1e-6, 1 - 1e-6)
    good = {
        "cls": tf.where(t["cls"][None] > 0, 12.0, -12.0),
        "box": tf.reshape(params, [1, 4, 4, 4]),
        "ctr": tf.constant(np.log(ctr / (1 - ctr))[None], tf.float32),
    }
    bad = {"cls": -good["cls"], "box": good["box"] + 1.0, "ctr": -good["ctr"]}
    good_total, parts = detection.detection_loss(targets, good)
    bad_total, _ = detection.detection_loss(targets, bad)
    assert float(parts["focal"]) < 1e-4
    assert float(parts["giou"]) == pytest.approx(0.0, abs=1e-5)
    assert float(parts["l1"]) == pytest.approx(0.0, abs=1e-5)
    # Centerness BCE at p = target is the targets' mean binary entropy over positives.
    c = ctr[..., 0][t["pos"].numpy() > 0]
    entropy = -(c * np.log(c) + (1 - c) * np.log(1 - c)).mean()
    assert float(parts["ctr"]) == pytest.approx(entropy, abs=1e-4)
    assert float(bad_total) > float(good_total) + 5.0


def test_postprocess_applies_threshold_and_per_class_nms():
    grid = 2
    cls = np.full((1, grid, grid, 2), -10.0, np.float32)
    cls[0, 0, 0, 0] = 5.0  # two overlapping class-0 boxes, one class-1 box
    cls[0, 0, 1, 0] = 4.0
    cls[0, 1, 1, 1] = 3.0
    box = np.zeros((1, grid, grid, 4), np.float32)
    box[0, 0, 0] = [0.5, 0.0, math.log(2), math.log(2)]  # both class-0 cells predict ~ the
    box[0, 0, 1] = [-0.5, 0.0, math.log(2), math.log(2)]  # same box [0, 0, 1, 0.5] (clipped)
    ctr = np.full((1, grid, grid, 1), 10.0, np.float32)
    boxes, scores, classes, valid = detection.postprocess(
        {"cls": cls, "box": box, "ctr": ctr}, score_threshold=0.5, iou_threshold=0.5
    )
    assert int(valid[0]) == 2  # one class-0 box suppressed; the rest below threshold
    assert sorted(classes.numpy()[0, :2].tolist()) == [0, 1]
    assert float(scores[0, 0]) == pytest.approx(math.sqrt(1 / (1 + math.exp(-5))), 1e-3)


def test_detection_map_hand_values():
    gts = [{"boxes": np.array([[0.0, 0.0, 1.0, 1.0]]), "classes": np.array([0])}]
    perfect = [{"boxes": gts[0]["boxes"], "scores": np.array([0.9]), "classes": np.array([0])}]
    assert detection.detection_map(perfect, gts, 2)["map"] == pytest.approx(1.0)
    # IoU exactly 0.5: a hit at thresholds 0.40, 0.45, 0.50 only -> 3/8.
    half = [
        {
            "boxes": np.array([[0.0, 0.0, 1.0, 0.5]]),
            "scores": np.array([0.9]),
            "classes": np.array([0]),
        }
    ]
    r = detection.detection_map(half, gts, 2)
    assert r["map"] == pytest.approx(3 / 8)
    assert math.isnan(r["per_class"][1])  # no test boxes of class 1: left out
    wrong_class = [{"boxes": gts[0]["boxes"], "scores": np.array([0.9]), "classes": np.array([1])}]
    assert detection.detection_map(wrong_class, gts, 2)["map"] == 0.0


# ------------------------------------------------------------------ report generation
def test_bleu_and_rouge_l_hand_computed():
    ref, cand = "the cat is on the mat", "the cat sat on the mat"
    m = report_generation.text_metrics([ref], [cand])
    # Clipped n-gram precisions 5/6, 3/5, 1/4, 0/3; equal lengths -> brevity penalty 1.
    assert m["bleu_1"] == pytest.approx(5 / 6, 1e-6)
    assert m["bleu_2"] == pytest.approx(math.sqrt(5 / 6 * 3 / 5), 1e-6)
    assert m["bleu_3"] == pytest.approx((5 / 6 * 3 / 5 * 1 / 4) ** (1 / 3), 1e-6)
    assert m["bleu_4"] == 0.0
    # LCS "the cat on the mat" = 5 of 6 on both sides -> F = 5/6.
    assert m["rouge_l"] == pytest.approx(5 / 6, 1e-6)
    short = report_generation.text_metrics([ref], ["the cat"])
    # Precisions 1, 1; brevity penalty exp(1 - 6/2) = e^-2. ROUGE-L: P 1, R 1/3 -> F 1/2.
    assert short["bleu_1"] == pytest.approx(math.exp(-2), 1e-6)
    assert short["bleu_2"] == pytest.approx(math.exp(-2), 1e-6)
    assert short["rouge_l"] == pytest.approx(0.5, 1e-6)
    empty = report_generation.text_metrics([ref], [""])
    assert empty == {"bleu_1": 0.0, "bleu_2": 0.0, "bleu_3": 0.0, "bleu_4": 0.0, "rouge_l": 0.0}
    with pytest.raises(ValueError, match="2 references but 1 candidates"):
        report_generation.text_metrics([ref, ref], [cand])


def test_ids_to_text_joins_wordpieces_and_stops_at_sep():
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "no", "pneumo", "##thorax", "."]
    ids = [[2, 5, 6, 7, 8, 3, 5, 0], [2, 6, 0, 0, 0, 0, 0, 0]]
    text = report_generation.ids_to_text(ids, vocab, stop_ids=(3,), skip_ids=(0, 2, 3, 4))
    assert text == ["no pneumothorax .", "pneumo"]


def _tiny_decoder(vocab=20, length=11, tokens=16, dim=12):
    dec = report_generation.ReportDecoder(
        vocab,
        length,
        tokens,
        dim,
        width=16,
        num_layers=2,
        num_heads=2,
        intermediate_dim=32,
        dropout=0.0,
    )
    dec.build()
    return dec


def test_report_decoder_shapes_and_causality():
    tf.random.set_seed(1)
    dec = _tiny_decoder()
    memory = dec.encode_memory(tf.random.normal([2, 16, 12]))
    assert memory.shape == (2, 16, 16)
    ids = tf.constant(np.random.default_rng(0).integers(5, 20, size=(2, 11)), tf.int32)
    logits = dec(ids, memory)
    assert logits.shape == (2, 11, 20)
    later = tf.concat([ids[:, :6], tf.fill([2, 5], 7)], axis=1)
    # Changing tokens at positions >= 6 leaves the logits of positions < 6 unchanged.
    np.testing.assert_allclose(dec(later, memory)[:, :6].numpy(), logits[:, :6].numpy(), atol=1e-5)
    assert not np.allclose(dec(later, memory)[:, 6:].numpy(), logits[:, 6:].numpy())
    # Teacher forcing: loss ignores padding targets.
    mask = tf.constant([[True] * 11, [True] * 4 + [False] * 7])
    loss = report_generation.teacher_forcing_loss(dec, ids, mask, memory)
    assert np.isfinite(float(loss)) and float(loss) > 0


def test_beam_search_with_one_beam_equals_greedy_and_ends_in_padding():
    import keras_hub

    tf.random.set_seed(3)
    dec = _tiny_decoder()
    memory = dec.encode_memory(tf.random.normal([4, 16, 12]))
    kw = dict(max_length=8, pad_id=0, cls_id=2, sep_id=3, banned=(4,))
    greedy = report_generation.generate(dec, memory, num_beams=1, **kw).numpy()
    batch = 4
    prompt = tf.concat([tf.fill([batch, 1], 2), tf.zeros([batch, 7], tf.int32)], axis=1)
    mask = tf.concat([tf.ones([batch, 1], tf.bool), tf.zeros([batch, 7], tf.bool)], axis=1)
    beam1 = keras_hub.samplers.BeamSampler(num_beams=1)(
        report_generation.make_next_fn(dec, 0, 2, 3, banned=(4,)),
        prompt,
        cache=memory,
        index=1,
        mask=mask,
        stop_token_ids=[3],
    ).numpy()
    np.testing.assert_array_equal(beam1, greedy)
    beam3 = report_generation.generate(dec, memory, num_beams=3, **kw).numpy()
    for out in (greedy, beam3):
        assert out.shape == (4, 8) and np.all(out[:, 0] == 2)
        assert not np.isin(out[:, 1:], [2, 4]).any()  # [CLS] / banned never generated
        for row in out:
            seps = np.flatnonzero(row == 3)
            if seps.size:
                assert np.all(row[seps[0] + 1 :] == 0)  # [PAD] after the first [SEP]
            else:
                assert not np.any(row[1:] == 0)  # no [PAD] without a [SEP]


# ------------------------------------------------------------------ end to end (slow)
def _tiny_model_config(vocab_size, **kw):
    from place_tf.config import tiny_model_config

    return tiny_model_config(vocab_size, image_size=IMAGE_SIZE, **kw)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    from place_tf.data import synthetic

    d = str(tmp_path_factory.mktemp("dense_synth"))
    synthetic.generate_corpus(d, NUM_IMAGES, IMAGE_SIZE, seed=0, num_shards=1, workers=1)
    return d


@pytest.fixture(scope="module")
def tiny_model(corpus):
    import keras

    from place_tf import objectives
    from place_tf.data import tokenizer as tok
    from place_tf.models.place_model import PLACEModel

    keras.utils.set_random_seed(0)
    vocab = tok.load_vocabulary(os.path.join(corpus, "vocab.txt"))
    return PLACEModel(_tiny_model_config(len(vocab)), objectives.objective_config("convirt"))


def _split_count(corpus, split):
    from place_tf.data import manifest

    return manifest.read_manifest(corpus)["splits"][split]["examples"]


def _weights(model):
    return [np.array(w.numpy()) for w in model.weights]


def _history_decreases(history, key="loss"):
    return history[-1][key] < history[0][key]


@pytest.mark.slow
def test_segmentation_end_to_end_on_a_label_fraction(corpus, tiny_model):
    before = _weights(tiny_model)
    ids = td.fraction_ids(corpus, 0.5, seed=0)
    assert ids == td.fraction_ids(corpus, 0.5, seed=0)  # seeded: same subset
    r = segmentation.evaluate(
        tiny_model,
        corpus,
        image_size=IMAGE_SIZE,
        seed=0,
        fraction=0.5,
        target="Pleural Effusion",
        epochs=3,
        batch_size=16,
        decoder_width=16,
    )
    assert r["task"] == "segmentation" and r["decoder"] == "setr"
    assert r["target"] == "Pleural Effusion"
    assert r["train_examples"] == len(ids) < _split_count(corpus, "train")
    assert r["test_examples"] == _split_count(corpus, "test")
    for k in ("dice", "iou", "dice_all"):
        assert 0.0 <= r[k] <= 1.0 or (k != "dice_all" and math.isnan(r[k]))
    assert len(r["history"]) == 3 and _history_decreases(r["history"])
    assert "Dice (pos)" in segmentation.format_table(r)
    for a, b in zip(before, _weights(tiny_model), strict=True):
        np.testing.assert_array_equal(a, b)  # frozen encoder untouched


@pytest.mark.slow
def test_detection_end_to_end_fine_tuned_and_restored(corpus, tiny_model):
    before = _weights(tiny_model)
    r = detection.evaluate(
        tiny_model,
        corpus,
        image_size=IMAGE_SIZE,
        seed=0,
        labels="Pleural Effusion,Cardiomegaly",
        finetune=True,
        epochs=3,
        batch_size=16,
        head_width=16,
    )
    assert r["labels"] == ["Pleural Effusion", "Cardiomegaly"]
    assert r["grid"] == 8 and r["finetune"] is True
    assert r["test_examples"] == _split_count(corpus, "test")
    assert 0.0 <= r["map"] <= 1.0
    assert list(r["ap_per_threshold"]) == [f"{0.4 + 0.05 * i:.2f}" for i in range(8)]
    assert set(r["per_class"]) == {"Pleural Effusion", "Cardiomegaly"}
    assert _history_decreases(r["history"])
    assert "mAP@[0.40:0.75]" in detection.format_table(r)
    for a, b in zip(before, _weights(tiny_model), strict=True):
        np.testing.assert_array_equal(a, b)  # fine-tuned encoder restored afterwards


@pytest.mark.slow
def test_report_generation_end_to_end(corpus, tiny_model):
    r = report_generation.evaluate(
        tiny_model,
        corpus,
        image_size=IMAGE_SIZE,
        seed=0,
        epochs=2,
        batch_size=16,
        width=32,
        num_beams=2,
        max_decode_length=12,
    )
    assert r["decoding"] == "beam_2" and set(r["by_decoding"]) == {"greedy", "beam_2"}
    for m in r["by_decoding"].values():
        for k in ("bleu_1", "bleu_2", "bleu_3", "bleu_4", "rouge_l"):
            assert 0.0 <= m[k] <= 1.0
        assert 0 <= m["mean_generated_tokens"] <= 11  # 12 positions minus [CLS]
        assert m["bleu_4"] <= m["bleu_1"] or m["bleu_1"] == 0.0
    assert r["bleu_1"] == r["by_decoding"]["beam_2"]["bleu_1"]
    assert r["test_examples"] == _split_count(corpus, "test")
    assert _history_decreases(r["history"])
    table = report_generation.format_table(r)
    assert "BLEU-4" in table and "beam_2" in table


@pytest.mark.slow
def test_resnet_features_give_unet_skips_consistent_with_patch_tokens():
    import keras

    from place_tf import objectives
    from place_tf.models.place_model import PLACEModel

    keras.utils.set_random_seed(0)
    model = PLACEModel(
        _tiny_model_config(64, image_encoder="resnet50"), objectives.objective_config("convirt")
    )
    feats = td.TaskFeatures(model, with_skips=True)
    images = tf.random.uniform([2, IMAGE_SIZE, IMAGE_SIZE, 1], -1, 1)
    grid, skips = feats(images)
    assert grid.shape == (2, 2, 2, 32)  # stride 16, token_dim = vit_width
    assert [tuple(s.shape) for s in skips] == [(2, 4, 4, 512), (2, 8, 8, 256)]
    tokens = model.encode_image(images)["patch_tokens"]
    np.testing.assert_allclose(grid.numpy().reshape(2, 4, 32), tokens.numpy(), atol=1e-4)
    shapes = feats.shapes()
    assert shapes == ((1, 2, 2, 32), [(1, 4, 4, 512), (1, 8, 8, 256)])
    dec = segmentation.UNetDecoder(IMAGE_SIZE, 1, width=16)
    dec.build(grid.shape, [s.shape for s in skips])
    assert dec(grid, skips).shape == (2, IMAGE_SIZE, IMAGE_SIZE, 1)
