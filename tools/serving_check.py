"""Check a PLACE SavedModel the way TF Serving will call it, before deploying it.

    tools/run python tools/serving_check.py serving/1 [--batch_sizes 1,8,32] [--image x.png]
                                          [--write_requests DIR] [--repeats 10]

1. loads the export with tf.saved_model.load (after `import tensorflow_text`, whose ops
   the tokenizer uses) and lists every signature's inputs and outputs (names, dtypes,
   shapes), like `saved_model_cli show --all`;
2. for each signature builds a TF Serving REST predict body (JSON, images as {"b64": ...})
   and a gRPC PredictRequest, decodes both back into tensors exactly as the server does
   (b64 → bytes; TensorProto → tf.make_ndarray) and runs them through the signature;
3. checks the outputs: names and shapes, finite values, unit-norm embeddings, REST and
   gRPC agree, from_examples equals serving_default, zero_shot logits are a positive
   multiple of the cosine similarities and probabilities their softmax, and a bad image is
   rejected with InvalidArgumentError naming its batch index;
4. prints a latency table (median ms and images/s of serving_default per batch size).

--write_requests DIR saves `<signature>.json` (REST body, for curl) and
`<signature>.predict_request.pb` (serialized PredictRequest, for gRPC clients).
Exit status: 0 all checks passed, 1 a check failed, 2 bad usage or not a SavedModel.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import statistics
import sys
import time

# Run from a checkout without installing: make `place_tf` (the schema) importable.
_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _REPO not in sys.path:
    sys.path.insert(0, _REPO)

EXPECTED = {
    "serving_default": (("images",), ("image_embedding", "observations", "attention_maps")),
    "embed_text": (("reports",), ("text_embedding", "text_observations")),
    "zero_shot": (("images", "prompts"), ("logits", "probabilities")),
    "from_examples": (("examples",), ("image_embedding", "observations", "attention_maps")),
}
SAMPLE_REPORTS = (
    "No acute cardiopulmonary process. Heart size is normal.",
    "Small left pleural effusion with adjacent atelectasis.",
)
SAMPLE_PROMPTS = ("no finding", "pleural effusion", "cardiomegaly")
NORM_TOL = 1e-3


class CheckError(Exception):
    """A check on the export failed; the message says which and why."""


class NotASavedModel(Exception):
    """The directory holds no SavedModel (exit status 2)."""


def _not_saved_model_message(path: str) -> str:
    return (
        f"serving_check: error: {path!r} is not a SavedModel directory "
        "(no saved_model.pb); pass <base>/<version>"
    )


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("export_dir", help="SavedModel directory (<base>/<version>)")
    p.add_argument("--batch_sizes", default="1,8,32", help="latency batch sizes, comma-separated")
    p.add_argument("--image", default="", help="a PNG/JPEG to send (default: a synthetic PNG)")
    p.add_argument("--write_requests", default="", help="directory for request files")
    p.add_argument("--repeats", type=int, default=10, help="timed calls per batch size")
    p.add_argument("--request_batch", type=int, default=2, help="images per checked request")
    p.add_argument("--model_name", default="place", help="model_spec.name in PredictRequests")
    args = p.parse_args(argv)
    try:
        args.batch_sizes = [int(b) for b in args.batch_sizes.split(",") if b.strip()]
    except ValueError:
        p.error(f"--batch_sizes must be comma-separated integers, got {args.batch_sizes!r}")
    if not args.batch_sizes or min(args.batch_sizes) < 1:
        p.error("--batch_sizes needs positive integers")
    if args.repeats < 1 or args.request_batch < 1:
        p.error("--repeats and --request_batch must be positive")
    return args


def looks_like_saved_model(path: str) -> bool:
    """Cheap test before importing TensorFlow (remote paths are checked after)."""
    if "://" in path:
        return True
    return any(
        os.path.isfile(os.path.join(path, f)) for f in ("saved_model.pb", "saved_model.pbtxt")
    )


# ------------------------------------------------------------------ describe


def _shape_str(shape) -> str:
    dims = shape.as_list() if shape.rank is not None else None
    if dims is None:
        return "unknown rank"
    return "(" + ", ".join("-1" if d is None else str(d) for d in dims) + ")"


def describe(loaded) -> dict:
    """Print every signature like `saved_model_cli show --all`; return {name: (in, out)}."""
    info = {}
    for name in sorted(loaded.signatures):
        sig = loaded.signatures[name]
        inputs = sig.structured_input_signature[1]
        outputs = sig.structured_outputs
        print(f"signature_def['{name}']:")
        print("  inputs:")
        for k in sorted(inputs):
            print(f"    {k}: dtype={inputs[k].dtype.name} shape={_shape_str(inputs[k].shape)}")
        print("  outputs:")
        for k in sorted(outputs):
            print(f"    {k}: dtype={outputs[k].dtype.name} shape={_shape_str(outputs[k].shape)}")
        info[name] = (inputs, outputs)
    return info


def check_signatures(info: dict) -> None:
    import tensorflow as tf

    for name, (want_in, want_out) in EXPECTED.items():
        if name not in info:
            raise CheckError(f"signature {name!r} is missing (has {sorted(info)})")
        inputs, outputs = info[name]
        if sorted(inputs) != sorted(want_in):
            raise CheckError(f"{name}: inputs are {sorted(inputs)}, expected {sorted(want_in)}")
        for k, spec in inputs.items():
            if spec.dtype != tf.string or spec.shape.as_list() != [None]:
                raise CheckError(f"{name}: input {k} must be string [None], got {spec}")
        if sorted(outputs) != sorted(want_out):
            raise CheckError(f"{name}: outputs are {sorted(outputs)}, expected {sorted(want_out)}")
        for k, t in outputs.items():
            if t.dtype != tf.float32:
                raise CheckError(f"{name}: output {k} is {t.dtype.name}, expected float32")


# ------------------------------------------------------------------ requests


def sample_image() -> bytes:
    """A synthetic 8-bit grayscale PNG (64×48 gradient with a disc)."""
    import numpy as np
    import tensorflow as tf

    y, x = np.mgrid[0:48, 0:64]
    img = (x * 3 + y * 2) % 256
    img[(x - 32) ** 2 + (y - 24) ** 2 < 100] = 250
    return tf.io.encode_png(img.astype(np.uint8)[..., None]).numpy()


def sample_example(image: bytes) -> bytes:
    """A serialized tf.Example of place_tf.data.schema carrying `image`."""
    import tensorflow as tf

    from place_tf.data import schema

    shape = tf.io.decode_image(image, channels=1, expand_animations=False).shape
    fmt = "png" if image.startswith(b"\x89PNG") else "jpeg"
    rec = schema.ExampleRecord(
        image=image,
        image_format=fmt,
        height=int(shape[0]),
        width=int(shape[1]),
        image_id="serving-check",
        findings=SAMPLE_REPORTS[0],
    )
    return schema.to_example(rec).SerializeToString()


def _b64(data: bytes) -> dict:
    return {"b64": base64.b64encode(data).decode("ascii")}


def rest_bodies(images: list, reports: list, prompts: list, examples: list) -> dict:
    """TF Serving REST predict bodies. Row format ("instances") where all inputs share the
    batch; zero_shot's images [B] and prompts [P] differ, so it uses columnar "inputs"."""
    return {
        "serving_default": {
            "signature_name": "serving_default",
            "instances": [{"images": _b64(b)} for b in images],
        },
        "embed_text": {
            "signature_name": "embed_text",
            "instances": [{"reports": r} for r in reports],
        },
        "zero_shot": {
            "signature_name": "zero_shot",
            "inputs": {"images": [_b64(b) for b in images], "prompts": list(prompts)},
        },
        "from_examples": {
            "signature_name": "from_examples",
            "instances": [{"examples": _b64(e)} for e in examples],
        },
    }


def _rest_value(v) -> bytes:
    if isinstance(v, dict) and set(v) == {"b64"}:
        return base64.b64decode(v["b64"])
    if isinstance(v, str):
        return v.encode("utf-8")
    raise CheckError(f"REST value {v!r} is neither a string nor {{'b64': ...}}")


def decode_rest(body_json: str) -> tuple[str, dict]:
    """JSON body → (signature name, {input: tf.string tensor}), as the REST server parses."""
    import tensorflow as tf

    body = json.loads(body_json)
    name = body.get("signature_name", "serving_default")
    if "instances" in body:
        rows = body["instances"]
        keys = sorted(rows[0]) if rows else []
        columns = {k: [_rest_value(r[k]) for r in rows] for k in keys}
    elif "inputs" in body:
        columns = {k: [_rest_value(v) for v in vs] for k, vs in body["inputs"].items()}
    else:
        raise CheckError(f"REST body for {name} has neither 'instances' nor 'inputs'")
    return name, {k: tf.constant(v, tf.string, shape=[len(v)]) for k, v in columns.items()}


def grpc_request(name: str, columns: dict, model_name: str):
    """A tensorflow_serving PredictRequest for `name` with string inputs."""
    import tensorflow as tf
    from tensorflow_serving.apis import predict_pb2

    req = predict_pb2.PredictRequest()
    req.model_spec.name = model_name
    req.model_spec.signature_name = name
    for k, values in columns.items():
        req.inputs[k].CopyFrom(tf.make_tensor_proto(values, dtype=tf.string, shape=[len(values)]))
    return req


def decode_grpc(serialized: bytes) -> tuple[str, dict]:
    """Serialized PredictRequest → (signature name, {input: tensor}), as the server does."""
    import tensorflow as tf
    from tensorflow_serving.apis import predict_pb2

    req = predict_pb2.PredictRequest.FromString(serialized)
    tensors = {}
    for k, proto in req.inputs.items():
        arr = tf.make_ndarray(proto)
        tensors[k] = tf.constant(arr.tolist(), tf.string, shape=arr.shape)
    return req.model_spec.signature_name or "serving_default", tensors


# ------------------------------------------------------------------ output checks


def _finite(name: str, outputs: dict) -> None:
    import numpy as np

    for k, v in outputs.items():
        if not np.all(np.isfinite(v)):
            raise CheckError(f"{name}: output {k} has non-finite values")


def _unit_norm(name: str, key: str, v) -> None:
    import numpy as np

    norms = np.linalg.norm(v, axis=-1)
    if norms.size and np.max(np.abs(norms - 1.0)) > NORM_TOL:
        raise CheckError(
            f"{name}: {key} is not L2-normalised (norms {norms.min():.4f}..{norms.max():.4f})"
        )


def _shape(name: str, key: str, v, want) -> None:
    if len(v.shape) != len(want) or any(
        w is not None and s != w for s, w in zip(v.shape, want, strict=True)
    ):
        raise CheckError(f"{name}: {key} has shape {tuple(v.shape)}, expected {want}")


def check_image_outputs(name: str, out: dict, batch: int) -> tuple:
    e = out["image_embedding"].shape[-1]
    k = out["observations"].shape[1] if out["observations"].ndim == 3 else None
    _shape(name, "image_embedding", out["image_embedding"], (batch, None))
    _shape(name, "observations", out["observations"], (batch, None, e))
    _shape(name, "attention_maps", out["attention_maps"], (batch, k, None, None))
    _finite(name, out)
    _unit_norm(name, "image_embedding", out["image_embedding"])
    _unit_norm(name, "observations", out["observations"])
    return e, k


def check_text_outputs(name: str, out: dict, batch: int, e: int, k: int) -> None:
    _shape(name, "text_embedding", out["text_embedding"], (batch, e))
    _shape(name, "text_observations", out["text_observations"], (batch, k, e))
    _finite(name, out)
    _unit_norm(name, "text_embedding", out["text_embedding"])
    _unit_norm(name, "text_observations", out["text_observations"])


def check_zero_shot(out: dict, img_emb, txt_emb) -> float:
    """logits must be s · img @ txt^T for one s > 0; probabilities their softmax."""
    import numpy as np

    b, p = img_emb.shape[0], txt_emb.shape[0]
    _shape("zero_shot", "logits", out["logits"], (b, p))
    _shape("zero_shot", "probabilities", out["probabilities"], (b, p))
    _finite("zero_shot", out)
    cos = img_emb @ txt_emb.T
    scale = float(np.sum(out["logits"] * cos) / max(float(np.sum(cos * cos)), 1e-12))
    if not scale > 0 or not np.allclose(out["logits"], scale * cos, atol=1e-3 * max(1, scale)):
        raise CheckError("zero_shot: logits are not logit_scale × cosine similarity")
    z = out["logits"] - out["logits"].max(axis=-1, keepdims=True)
    soft = np.exp(z) / np.exp(z).sum(axis=-1, keepdims=True)
    if not np.allclose(out["probabilities"], soft, atol=1e-5):
        raise CheckError("zero_shot: probabilities are not the softmax of logits over prompts")
    return scale


def _same(what: str, a: dict, b: dict, atol: float) -> None:
    import numpy as np

    for k in a:
        if a[k].shape != b[k].shape or not np.allclose(a[k], b[k], atol=atol):
            diff = np.max(np.abs(a[k] - b[k])) if a[k].shape == b[k].shape else "shape"
            raise CheckError(f"{what}: output {k} differs (max abs diff {diff})")


def run_signature(loaded, name: str, tensors: dict) -> dict:
    out = loaded.signatures[name](**tensors)
    return {k: v.numpy() for k, v in out.items()}


def check_bad_image(loaded, good: bytes) -> str:
    import tensorflow as tf

    try:
        loaded.signatures["serving_default"](images=tf.constant([good, b"not an image"]))
    except tf.errors.InvalidArgumentError as e:
        if "images[1]" not in e.message:
            raise CheckError(f"bad image rejected without naming its index: {e.message!r}") from e
        return "rejected with InvalidArgumentError naming images[1]"
    raise CheckError("serving_default accepted bytes that are not an image")


# ------------------------------------------------------------------ latency


def latency_table(loaded, image: bytes, batch_sizes, repeats: int) -> list:
    import tensorflow as tf

    fn = loaded.signatures["serving_default"]
    rows = []
    for b in batch_sizes:
        images = tf.constant([image] * b)
        fn(images=images)  # warm-up (first call may build kernels / allocate)
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            out = fn(images=images)
            out["image_embedding"].numpy()
            times.append(time.perf_counter() - t0)
        ms = 1000.0 * statistics.median(times)
        rows.append((b, ms, b / (ms / 1000.0)))
    print("\nserving_default latency (this machine, in-process, no network):")
    print(f"{'batch':>6} {'median ms':>10} {'images/s':>10}")
    for b, ms, ips in rows:
        print(f"{b:>6} {ms:>10.2f} {ips:>10.1f}")
    return rows


# ------------------------------------------------------------------ main


def run_checks(args) -> None:
    import tensorflow as tf
    import tensorflow_text  # noqa: F401  (registers the tokenizer's ops before loading)

    if not tf.saved_model.contains_saved_model(args.export_dir):
        raise NotASavedModel(args.export_dir)
    loaded = tf.saved_model.load(args.export_dir)
    info = describe(loaded)
    check_signatures(info)

    if args.image:
        with open(args.image, "rb") as f:
            image = f.read()
    else:
        image = sample_image()
    n = args.request_batch
    images = [image] * n
    reports = [SAMPLE_REPORTS[i % len(SAMPLE_REPORTS)] for i in range(n)]
    prompts = list(SAMPLE_PROMPTS)
    examples = [sample_example(image)] * n
    bodies = rest_bodies(images, reports, prompts, examples)
    columns = {
        "serving_default": {"images": images},
        "embed_text": {"reports": [r.encode() for r in reports]},
        "zero_shot": {"images": images, "prompts": [p.encode() for p in prompts]},
        "from_examples": {"examples": examples},
    }
    if args.write_requests:
        os.makedirs(args.write_requests, exist_ok=True)

    results = {}
    for name in EXPECTED:
        body_json = json.dumps(bodies[name])
        rest_name, rest_tensors = decode_rest(body_json)
        request = grpc_request(name, columns[name], args.model_name)
        serialized = request.SerializeToString()
        grpc_name, grpc_tensors = decode_grpc(serialized)
        if rest_name != name or grpc_name != name:
            raise CheckError(f"{name}: request carries signature {rest_name!r}/{grpc_name!r}")
        rest_out = run_signature(loaded, name, rest_tensors)
        grpc_out = run_signature(loaded, name, grpc_tensors)
        _same(f"{name}: REST vs gRPC", rest_out, grpc_out, atol=1e-6)
        results[name] = rest_out
        if args.write_requests:
            with open(os.path.join(args.write_requests, f"{name}.json"), "w") as f:
                f.write(body_json)
            with open(os.path.join(args.write_requests, f"{name}.predict_request.pb"), "wb") as f:
                f.write(serialized)

    e, k = check_image_outputs("serving_default", results["serving_default"], n)
    check_image_outputs("from_examples", results["from_examples"], n)
    _same(
        "from_examples vs serving_default",
        results["from_examples"],
        results["serving_default"],
        1e-5,
    )
    check_text_outputs("embed_text", results["embed_text"], n, e, k)
    txt = run_signature(loaded, "embed_text", {"reports": tf.constant(prompts)})
    scale = check_zero_shot(
        results["zero_shot"], results["serving_default"]["image_embedding"], txt["text_embedding"]
    )
    bad = check_bad_image(loaded, image)
    empty = run_signature(loaded, "serving_default", {"images": tf.constant([], tf.string)})
    if empty["image_embedding"].shape != (0, e):
        raise CheckError(f"empty batch gave image_embedding {empty['image_embedding'].shape}")

    print("\nchecks:")
    print(f"  REST and gRPC requests decode and agree for {', '.join(EXPECTED)}")
    print(f"  embeddings: dim {e}, {k} observations, unit norm, finite")
    print(f"  zero_shot: logit_scale {scale:.3f} (temperature {1.0 / scale:.4f})")
    print(f"  bad image: {bad}; empty batch: OK")
    if args.write_requests:
        print(f"  requests written to {args.write_requests}")
    latency_table(loaded, image, args.batch_sizes, args.repeats)


def main(argv=None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    if args.image and not os.path.isfile(args.image):
        print(f"serving_check: error: --image {args.image!r} is not a file", file=sys.stderr)
        return 2
    if not looks_like_saved_model(args.export_dir):
        print(_not_saved_model_message(args.export_dir), file=sys.stderr)
        return 2
    try:
        run_checks(args)
    except NotASavedModel:
        print(_not_saved_model_message(args.export_dir), file=sys.stderr)
        return 2
    except CheckError as e:
        print(f"serving_check: FAILED: {e}", file=sys.stderr)
        return 1
    except Exception as e:  # a load or call error: still one clear line and status 1
        print(f"serving_check: FAILED: {type(e).__name__}: {e}", file=sys.stderr)
        return 1
    print("\nserving_check: OK")
    return 0


if __name__ == "__main__":
    sys.exit(main())
