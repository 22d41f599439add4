"""Where pre-trained weights and tokenizers come from (`--image_init`, `--text_init`).

A checkpoint handle is anything keras-hub's `from_preset` resolves:
  - a keras-hub preset name (`vit_base_patch16_224_imagenet`, `bert_base_en`): Kaggle;
  - `kaggle://owner/model/keras/variant[/version]`;
  - `hf://owner/name`: a Hugging Face checkpoint (config.json + model.safetensors), which
    keras-hub converts (`keras_hub/src/utils/transformers/convert_{bert,vit}.py`);
  - a local keras-hub preset directory (metadata.json + config.json + model.weights.h5);
  - a local Hugging Face directory (config.json + model.safetensors [+ vocab.txt,
    tokenizer_config.json, preprocessor_config.json]).
Downloads go to the libraries' own caches (KAGGLEHUB_CACHE, HF_HOME / HF_HUB_CACHE).

Loading and converting is keras-hub's; this module adds only what keras-hub does not:
  - failures before any training step, each naming the handle or file: no network and
    no cached copy (keras-hub would retry for ~25 s and then report a missing
    config.json), a repository with only `pytorch_model.bin`, a corrupt or truncated
    `model.safetensors`, a checkpoint of another model family, a missing vocabulary;
  - a cached `hf://` checkpoint is used offline (the cached snapshot directory);
  - the facts the model needs from a checkpoint: its architecture, its tokenizer
    (vocabulary and casing) and its image normalisation.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading

log = logging.getLogger(__name__)

HF_SCHEME = "hf://"
KAGGLE_SCHEME = "kaggle://"
PROBE_TIMEOUT_S = 5.0  # a host that does not answer in this time counts as offline

HF_CONFIG = "config.json"
HF_WEIGHTS = "model.safetensors"
HF_WEIGHTS_INDEX = "model.safetensors.index.json"
HF_VOCAB = "vocab.txt"
HF_TOKENIZER_CONFIG = "tokenizer_config.json"
HF_PREPROCESSOR = "preprocessor_config.json"
KERAS_HUB_METADATA = "metadata.json"
PYTORCH_ONLY = ("pytorch_model.bin", "tf_model.h5", "flax_model.msgpack")

# Model family → (keras-hub backbone class names, Hugging Face `model_type`s) accepted.
FAMILIES = {
    "vit": (("ViTBackbone",), ("vit",)),
    "resnet50": (("ResNetBackbone",), ()),
    "bert": (("BertBackbone",), ("bert",)),
}

OFFLINE_HINT = (
    "To use a local copy: on a machine with network run {download}, copy the directory "
    "it prints or writes to this machine and pass that directory as the flag value; or "
    'point {cache} at a cache that holds it (README "Training": initialisation).'
)
HF_DOWNLOAD = "`hf download {repo} --local-dir DIR`"
KAGGLE_DOWNLOAD = "`python -c \"import kagglehub; print(kagglehub.model_download('{repo}'))\"`"


class CheckpointError(ValueError):
    """A checkpoint cannot be used; the message names the handle or file and the fix."""


class CheckpointNotFoundError(CheckpointError, FileNotFoundError):
    """The handle names no directory, hub handle or keras-hub preset."""


# ------------------------------------------------------------------ handles


def _read_json(path: str) -> dict:
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{path}: not a readable JSON file ({e})") from e


def _reachable(host: str, port: int = 443, timeout: float = PROBE_TIMEOUT_S) -> bool:
    """Whether a TCP connection to host:port opens within `timeout` (DNS included: run in
    a thread, since getaddrinfo itself has no timeout). Through HTTPS_PROXY if set."""
    proxy = os.environ.get("HTTPS_PROXY") or os.environ.get("https_proxy")
    if proxy:
        from urllib.parse import urlparse

        p = urlparse(proxy if "://" in proxy else "http://" + proxy)
        host, port = p.hostname or host, p.port or 80
    ok = []

    def probe():
        try:
            socket.create_connection((host, port), timeout=timeout).close()
            ok.append(True)
        except OSError:
            pass

    t = threading.Thread(target=probe, daemon=True)
    t.start()
    t.join(timeout)
    return bool(ok)


def _builtin_presets() -> dict:
    import keras_hub

    return keras_hub.models.Backbone.presets


def _hf_host() -> str:
    from urllib.parse import urlparse

    from huggingface_hub import constants

    return urlparse(constants.ENDPOINT).hostname or "huggingface.co"


def _resolve_hf(handle: str, what: str) -> str:
    """The handle itself when the hub answers; the cached snapshot directory when offline
    and cached; otherwise CheckpointError within PROBE_TIMEOUT_S."""
    import huggingface_hub
    from huggingface_hub import constants

    repo = handle[len(HF_SCHEME) :]
    online = not constants.HF_HUB_OFFLINE and _reachable(_hf_host())
    if online:
        if not huggingface_hub.file_exists(repo, HF_WEIGHTS) and not huggingface_hub.file_exists(
            repo, HF_WEIGHTS_INDEX
        ):
            others = [f for f in PYTORCH_ONLY if huggingface_hub.file_exists(repo, f)]
            raise CheckpointError(_no_safetensors_message(handle, others, repo))
        return handle
    try:
        local = huggingface_hub.snapshot_download(repo, local_files_only=True)
    except Exception:  # LocalEntryNotFoundError and friends: not cached
        local = ""
    if local and os.path.isfile(os.path.join(local, HF_CONFIG)):
        log.info("%s: offline, using the cached copy of %s at %s", what, handle, local)
        return local
    raise CheckpointError(
        f"{what}: cannot download {handle}: "
        + ("HF_HUB_OFFLINE is set" if constants.HF_HUB_OFFLINE else f"{_hf_host()} is unreachable")
        + f" and the Hugging Face cache ({constants.HF_HUB_CACHE}) has no copy. "
        + OFFLINE_HINT.format(download=HF_DOWNLOAD.format(repo=repo), cache="HF_HOME")
    )


def _kaggle_cached(kaggle_handle: str) -> bool:
    """A versioned Kaggle handle already in kagglehub's cache (KAGGLEHUB_CACHE)."""
    try:
        from kagglehub.cache import get_cached_path
        from kagglehub.handle import parse_model_handle

        h = parse_model_handle(kaggle_handle)
        return h.is_versioned() and os.path.isdir(get_cached_path(h))
    except Exception:
        return False


def _resolve_kaggle(handle: str, what: str) -> str:
    kaggle_handle = handle.removeprefix(KAGGLE_SCHEME)
    if _kaggle_cached(kaggle_handle) or _reachable("www.kaggle.com"):
        return handle
    raise CheckpointError(
        f"{what}: cannot download {handle}: www.kaggle.com is unreachable and "
        "kagglehub's cache (KAGGLEHUB_CACHE, default ~/.cache/kagglehub) has no copy. "
        + OFFLINE_HINT.format(
            download=KAGGLE_DOWNLOAD.format(repo=kaggle_handle), cache="KAGGLEHUB_CACHE"
        )
    )


def _no_safetensors_message(where: str, others: list[str], repo: str = "") -> str:
    found = f" (it has only {', '.join(others)})" if others else ""
    fix = (
        "keras-hub reads only safetensors and PyTorch is not part of this runtime. Get a "
        "safetensors copy: many repositories have one on a `refs/pr/N` revision opened by "
        "the Hub's conversion bot (`hf download "
        + (repo or "<repo>")
        + " --revision refs/pr/N --local-dir DIR`), or convert it once elsewhere with "
        "`transformers` (`AutoModel.from_pretrained(...).save_pretrained(DIR, "
        "safe_serialization=True)`), then pass DIR."
    )
    return f"{where}: no {HF_WEIGHTS}{found}; {fix}"


def _check_safetensors(path: str) -> None:
    """Open the file: safetensors checks the header and that the file holds every byte the
    header declares, so a corrupt or truncated download fails here, naming the file."""
    try:
        from safetensors import safe_open
    except ImportError as e:  # pragma: no cover - the lock pins it
        raise CheckpointError(
            "reading Hugging Face checkpoints needs the `safetensors` package "
            "(a dependency in pyproject.toml; `make setup` installs it)"
        ) from e
    try:
        with safe_open(path, framework="np") as f:
            if not list(f.keys()):
                raise CheckpointError(f"{path}: holds no tensors")
    except CheckpointError:
        raise
    except Exception as e:
        raise CheckpointError(
            f"{path}: corrupt or truncated safetensors file ({type(e).__name__}: {e}); "
            "download it again"
        ) from e


def _check_local(path: str, what: str, family: str) -> None:
    """A local directory is a keras-hub preset or a Hugging Face checkpoint of `family`."""
    classes, model_types = FAMILIES[family]
    config_path = os.path.join(path, HF_CONFIG)
    if os.path.isfile(os.path.join(path, KERAS_HUB_METADATA)):
        config = _read_json(config_path) if os.path.isfile(config_path) else {}
        found = config.get("class_name", "?")
        if found not in classes:
            raise CheckpointError(
                f"{what}: {config_path} is a keras-hub {found}, not a {family} checkpoint "
                f"({' or '.join(classes)})"
            )
        return
    if not os.path.isfile(config_path):
        raise CheckpointError(
            f"{what}: {path} is neither a keras-hub preset ({KERAS_HUB_METADATA}) nor a "
            f"Hugging Face checkpoint ({HF_CONFIG} + {HF_WEIGHTS})"
        )
    model_type = _read_json(config_path).get("model_type", "?")
    if model_type not in model_types:
        hint = (
            " (a distilled DeiT, with its extra distillation token: use the plain DeiT "
            "weights, e.g. facebook/deit-base-patch16-224, whose model_type is 'vit')"
            if model_type == "deit"
            else ""
        )
        raise CheckpointError(
            f"{what}: {config_path} has model_type {model_type!r}; a {family} checkpoint "
            f"needs one of {list(model_types) or 'keras-hub presets only'}{hint}"
        )
    weights = os.path.join(path, HF_WEIGHTS)
    if os.path.isfile(weights):
        _check_safetensors(weights)
    elif not os.path.isfile(os.path.join(path, HF_WEIGHTS_INDEX)):
        others = [f for f in PYTORCH_ONLY if os.path.isfile(os.path.join(path, f))]
        raise CheckpointError(_no_safetensors_message(path, others))


def resolve(handle: str, what: str, family: str) -> str:
    """Check `handle` before anything is built; the handle keras-hub should load (a
    cached snapshot directory for an `hf://` handle when offline).

    A path that is neither a directory, a hub handle nor a keras-hub preset name raises
    FileNotFoundError naming it.
    """
    if handle.startswith(HF_SCHEME):
        handle = _resolve_hf(handle, what)
    elif handle.startswith(KAGGLE_SCHEME):
        return _resolve_kaggle(handle, what)
    elif "://" not in handle and not os.path.isdir(handle):
        presets = _builtin_presets()
        if handle in presets:
            return _resolve_kaggle(presets[handle]["kaggle_handle"], what)
        raise CheckpointNotFoundError(
            f"{what}: checkpoint not found: {handle!r} is not a directory, an hf:// or "
            "kaggle:// handle, nor a keras-hub preset name"
        )
    elif "://" in handle and not handle.startswith(HF_SCHEME):
        import tensorflow as tf  # gs:// and other TF filesystems

        if not tf.io.gfile.isdir(handle):
            raise CheckpointNotFoundError(f"{what}: checkpoint directory not found: {handle!r}")
        return handle
    if os.path.isdir(handle):
        _check_local(handle, what, family)
    return handle


def check_model_config(model_config) -> None:
    """Check the config's checkpoints (cheap: files and a connection probe, no weights),
    so that a bad or unreachable one fails before data preparation and training."""
    if model_config.image_init:
        family = "resnet50" if model_config.image_encoder == "resnet50" else "vit"
        resolve(model_config.image_init, "image encoder (--image_init)", family)
    if model_config.text_init:
        resolve(model_config.text_init, "text encoder (--text_init)", "bert")


# ------------------------------------------------------------------ loading


def load_backbone(handle: str, what: str, family: str, load_weights: bool = True):
    """The checkpoint's keras-hub backbone (weights converted by keras-hub)."""
    import keras_hub

    source = resolve(handle, what, family)
    try:
        backbone = keras_hub.models.Backbone.from_preset(source, load_weights=load_weights)
    except Exception as e:
        raise CheckpointError(
            f"{what}: cannot load checkpoint {handle!r} ({type(e).__name__}: {e})"
        ) from e
    classes = FAMILIES[family][0]
    if type(backbone).__name__ not in classes:
        raise CheckpointError(
            f"{what}: checkpoint {handle!r} holds a {type(backbone).__name__}, not a "
            f"{family} backbone ({' or '.join(classes)})"
        )
    return backbone


def _checkpoint_file(source: str, name: str) -> str | None:
    """Local path of an optional checkpoint file (downloaded if needed), or None."""
    if os.path.isdir(source):
        path = os.path.join(source, name)
        return path if os.path.isfile(path) else None
    from keras_hub.src.utils import preset_utils  # keras-hub's own fetch (hub caches)

    if not preset_utils.check_file_exists(source, name):
        return None
    return preset_utils.get_file(source, name)


def _is_keras_hub_preset(source: str) -> bool:
    return _checkpoint_file(source, KERAS_HUB_METADATA) is not None


def wordpiece(handle: str, what: str = "text tokenizer") -> tuple[list[str], bool]:
    """(vocabulary, lowercase) of a BERT checkpoint's WordPiece tokenizer.

    keras-hub preset: its BertTokenizer. Hugging Face: `vocab.txt`, and casing from
    `tokenizer_config.json`'s `do_lower_case`. Without tokenizer_config.json (older
    repositories, e.g. Bio_ClinicalBERT) the vocabulary decides: one with upper-case
    word pieces is cased (lower-casing would leave those pieces unused), one without is
    lower-cased. (Hugging Face's own BertTokenizer would lower-case either way.)
    """
    import keras_hub

    source = resolve(handle, what, "bert")
    if _is_keras_hub_preset(source):
        try:
            tok = keras_hub.models.BertTokenizer.from_preset(source)
        except Exception as e:
            raise CheckpointError(
                f"{what}: checkpoint {handle!r} has no BERT WordPiece tokenizer "
                f"({type(e).__name__}: {e})"
            ) from e
        return list(tok.get_vocabulary()), bool(tok.lowercase)
    vocab_path = _checkpoint_file(source, HF_VOCAB)
    if vocab_path is None:
        raise CheckpointError(
            f"{what}: checkpoint {handle!r} has no {HF_VOCAB} "
            f"({os.path.join(source, HF_VOCAB) if os.path.isdir(source) else 'on the hub'}); "
            "a BERT checkpoint's vocabulary must come with it"
        )
    with open(vocab_path, encoding="utf-8") as f:
        vocab = [line.rstrip("\r\n") for line in f]
    while vocab and vocab[-1] == "":
        vocab.pop()
    config_path = _checkpoint_file(source, HF_TOKENIZER_CONFIG)
    if config_path is not None and "do_lower_case" in _read_json(config_path):
        lowercase = bool(_read_json(config_path)["do_lower_case"])
    else:
        lowercase = not any(
            any(ch.isupper() for ch in t)
            for t in vocab
            if not (t.startswith("[") and t.endswith("]"))
        )
        log.info(
            "%s: %s has no do_lower_case; its vocabulary is %s",
            what,
            handle,
            "lower-case (uncased)" if lowercase else "cased",
        )
    return vocab, lowercase


def image_normalisation(
    handle: str, family: str = "vit", channels: int = 3
) -> tuple[list[float], list[float]]:
    """(scale, offset) per channel of the checkpoint's input: `pixel * scale + offset`
    with pixel in [0, 1].

    Hugging Face: `preprocessor_config.json` (image_mean / image_std; without it the ViT
    image processor's default, 0.5 / 0.5). keras-hub preset: its image converter (scale
    and offset on 0-255 pixels); a preset without one states no normalisation, and gets
    the same 0.5 / 0.5 (pixels in [-1, 1], as keras-hub's ImageNet ViT presets).
    """
    import keras_hub

    source = resolve(handle, "image encoder", family)
    if _is_keras_hub_preset(source):
        try:
            conv = keras_hub.layers.ImageConverter.from_preset(source)
        except Exception:
            conv = None
        scale = getattr(conv, "scale", None) if conv is not None else None
        offset = getattr(conv, "offset", None) if conv is not None else None
        if scale is None and offset is None:
            return [2.0] * channels, [-1.0] * channels
        scale = [1.0] * channels if scale is None else _per_channel(scale, channels)
        offset = [0.0] * channels if offset is None else _per_channel(offset, channels)
        return [255.0 * s for s in scale], offset
    path = _checkpoint_file(source, HF_PREPROCESSOR)
    cfg = _read_json(path) if path else {}
    mean = _per_channel(cfg.get("image_mean", 0.5), channels)
    std = _per_channel(cfg.get("image_std", 0.5), channels)
    return [1.0 / s for s in std], [-m / s for m, s in zip(mean, std, strict=True)]


def _per_channel(value, channels: int) -> list[float]:
    import numpy as np

    v = np.asarray(value, dtype="float64").reshape(-1)
    if v.size == 1:
        v = np.repeat(v, channels)
    return [float(x) for x in v]


# ------------------------------------------------------------------ model config


def resolve_model_config(model_config):
    """`model_config` with the architecture of its checkpoints (`image_init`,
    `text_init`): ViT patch size, depth, width, heads, MLP; BERT width, heads, MLP and
    vocabulary size. Kept from the config: image_size (position embeddings are
    interpolated), text_layers (the first N layers; more than the checkpoint has is an
    error) and max_length (the position table is truncated; longer is an error).
    """
    import dataclasses

    mc = model_config
    changes: dict = {}
    if mc.image_init and mc.image_encoder == "vit":
        b = load_backbone(mc.image_init, "image encoder", "vit", load_weights=False)
        patch = b.patch_size[0] if isinstance(b.patch_size, (tuple, list)) else b.patch_size
        changes.update(
            patch_size=int(patch),
            vit_layers=int(b.num_layers),
            vit_heads=int(b.num_heads),
            vit_width=int(b.hidden_dim),
            vit_mlp=int(b.mlp_dim),
        )
        if mc.image_size % int(patch):
            raise CheckpointError(
                f"image encoder: --image_size={mc.image_size} is not a multiple of the "
                f"patch size {patch} of checkpoint {mc.image_init!r}"
            )
    if mc.text_init:
        b = load_backbone(mc.text_init, "text encoder", "bert", load_weights=False)
        if mc.text_layers > b.num_layers:
            raise CheckpointError(
                f"text encoder: --text_layers={mc.text_layers} but checkpoint "
                f"{mc.text_init!r} has only {b.num_layers} layers"
            )
        if mc.max_length > b.max_sequence_length:
            raise CheckpointError(
                f"text encoder: --max_length={mc.max_length} but checkpoint "
                f"{mc.text_init!r} has only {b.max_sequence_length} position embeddings"
            )
        changes.update(
            text_heads=int(b.num_heads),
            text_width=int(b.hidden_dim),
            text_mlp=int(b.intermediate_dim),
            vocab_size=int(b.vocabulary_size),
        )
    changed = {k: v for k, v in changes.items() if getattr(mc, k) != v}
    if changed:
        log.info("model architecture from the checkpoints: %s", changed)
    return dataclasses.replace(mc, **changes)
