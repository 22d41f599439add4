"""Analytic FLOPs of one training step of PLACEModel (dual encoder + the PLACE extras).

Used by tools/benchmark.py to report model FLOPs per step and MFU. The counting rules are
those of the shared reference benchmark (../shared/bench/common.py), so the numbers are
comparable with its PyTorch / naive-Keras figures:

- 1 multiply-accumulate (MAC) = 2 FLOPs; only matrix products are counted (softmax,
  LayerNorm, GELU, bias adds, the optimizer update are O(n·d) and ignored);
- transformer encoder layer over n tokens of width d, MLP width f, forward:
      2 · (4·n·d²  +  2·n·d·f  +  2·n²·d)          (QKV+output proj, MLP, QKᵀ and A·V)
- training = 3 × forward (backward ≈ 2 × forward) for every differentiated part; a part
  computed under stop_gradient (the CCE target similarities, an EMA teacher forward)
  counts 1 × forward.

Components of PLACEModel.compute_losses (B = global batch, N = (S/P)² patches,
M = visible patches of the CCE student, L = report tokens, K = pathology queries,
W/Wt = ViT/BERT width, E = embed_dim, q = query width, w = decoder width), forward MACs:

  image_encoder   N·P²·1·W (grayscale patch embedding) + vit_layers · layer(N+1, W, mlp)
  text_encoder    text_layers · layer(L, Wt, mlp_t)      (BERT's unused pooler: not counted)
  heads           2-layer projection heads W→4E→E and Wt→4E→E
  ita             B²·E per step (the B×B logits)
  image_observer  query_layers · block(T=K, S=N, c=W) + K·(q·4E + 4E·E)   (VPOE + head)
  text_observer   query_layers · block(T=K, S=L, c=Wt) + K·(q·4E + 4E·E)  (T-POR + head)
  pcma_loss       K·B²·E (inter-pair logits per slot) + B·K²·E (slot logits)
  cce_encoder     N·P²·W + vit_layers · layer(M+1, W, mlp)  (student sees only M patches)
  cce_decoder     M·W·w (embed) + M·N·w (one-hot scatter) + cce_layers · block(T=N, S=L,
                  c=Wt, width w) + N·w·W (head)
  cce_loss        N²·W for the student similarities; N²·W for the target ones (no grad)
  cta / cpa       MGCA local projections, two single-head token cross-attentions,
                  B×L×L and B×N×N token similarities / 2·B·P·E prototype scores
  ema_teacher     vit forward (no grad), only with cce_teacher="ema"

where block(T, S, c) is one CrossAttentionBlock (pre-LN, query self-attention, masked
cross-attention, MLP 4·q) with T queries of width q over S context tokens of width c:
      4·T·q² + 2·T²·q   +   2·T·q² + 2·S·c·q + 2·T·S·q   +   8·T·q².
"""

from __future__ import annotations

from place_tf.config import ModelConfig, ObjectiveConfig, preset_model_config

# Components computed under stop_gradient: they cost one forward, no backward.
NO_GRAD = ("cce_target", "ema_teacher")


def encoder_layer_fwd_flops(n: int, d: int, f: int) -> int:
    """Forward FLOPs of one transformer encoder layer (the shared bench's formula)."""
    return 2 * (4 * n * d * d + 2 * n * d * f + 2 * n * n * d)


def cross_block_fwd_flops(t: int, s: int, q: int, c: int, mlp: int = 0) -> int:
    """Forward FLOPs of one CrossAttentionBlock: t queries (width q) over s tokens (width c)."""
    mlp = mlp or 4 * q
    self_attn = 4 * t * q * q + 2 * t * t * q
    cross_attn = 2 * t * q * q + 2 * s * c * q + 2 * t * s * q
    return 2 * (self_attn + cross_attn + 2 * t * q * mlp)


def dense_fwd_flops(rows: int, d_in: int, d_out: int) -> int:
    return 2 * rows * d_in * d_out


def projection_head_fwd_flops(rows: int, d_in: int, embed_dim: int) -> int:
    """ProjectionHead(E, hidden=4E): d_in → 4E → E on `rows` vectors."""
    hidden = 4 * embed_dim
    return dense_fwd_flops(rows, d_in, hidden) + dense_fwd_flops(rows, hidden, embed_dim)


def num_visible(num_patches: int, mask_ratio: float) -> int:
    """Same rule as place_model.num_visible_patches (duplicated: no TF import here)."""
    return max(1, num_patches - int(round(num_patches * mask_ratio)))


def _terms(objective) -> tuple[tuple[str, ...], str]:
    """(active loss terms, cce_teacher) from an objective name or ObjectiveConfig."""
    from place_tf import objectives

    if isinstance(objective, str):
        objective = objectives.objective_config(objective)
    if not isinstance(objective, ObjectiveConfig):
        raise TypeError(f"objective must be a name or ObjectiveConfig, got {type(objective)}")
    return objectives.active_terms(objective), objective.cce_teacher


def forward_flops(mc: ModelConfig, objective, batch: int) -> dict[str, int]:
    """Forward FLOPs per training step, by component (see the module docstring).

    Only the components the objective runs in compute_losses appear (ConVIRT: encoders,
    heads, ita). Image encoders other than ViT are not modelled (ValueError).
    """
    if mc.image_encoder != "vit":
        raise ValueError(f"FLOPs are modelled for the ViT image encoder, not {mc.image_encoder!r}")
    if batch < 1:
        raise ValueError(f"batch must be >= 1, got {batch}")
    terms, teacher = _terms(objective)
    b, e = batch, mc.embed_dim
    g = mc.image_size // mc.patch_size
    n, w, wt, length = g * g, mc.vit_width, mc.text_width, mc.max_length
    patch_embed = dense_fwd_flops(n, mc.patch_size**2 * 1, w)

    def vit(tokens):
        return patch_embed + mc.vit_layers * encoder_layer_fwd_flops(tokens, w, mc.vit_mlp)

    out = {
        "image_encoder": b * vit(n + 1),
        "text_encoder": b * mc.text_layers * encoder_layer_fwd_flops(length, wt, mc.text_mlp),
        "heads": b * (projection_head_fwd_flops(1, w, e) + projection_head_fwd_flops(1, wt, e)),
    }
    if "ita" in terms:
        out["ita"] = 2 * b * b * e
    k, q = mc.num_queries, mc.query_width
    if "pcma" in terms:
        obs_head = projection_head_fwd_flops(k, q, e)
        out["image_observer"] = b * (mc.query_layers * cross_block_fwd_flops(k, n, q, w) + obs_head)
        out["text_observer"] = b * (
            mc.query_layers * cross_block_fwd_flops(k, length, q, wt) + obs_head
        )
        out["pcma_loss"] = 2 * (k * b * b * e + b * k * k * e)
    if "cce" in terms:
        m, dw = num_visible(n, mc.cce_mask_ratio), mc.cce_decoder_width
        out["cce_encoder"] = b * vit(m + 1)
        out["cce_decoder"] = b * (
            dense_fwd_flops(m, w, dw)
            + 2 * m * n * dw
            + mc.cce_decoder_layers * cross_block_fwd_flops(n, length, dw, wt)
            + dense_fwd_flops(n, dw, w)
        )
        out["cce_loss"] = b * 2 * n * n * w
        out["cce_target"] = b * 2 * n * n * w
        if teacher == "ema":
            out["ema_teacher"] = b * vit(n + 1)
    if "cta" in terms:
        # Two single-head attentions (words → patches, patches → words), each: Q and
        # output projections on its queries, K and V on its keys, scores and A·V.
        attn = 2 * 2 * (2 * (length + n) * e * e + 2 * length * n * e)
        out["cta"] = b * (
            projection_head_fwd_flops(n, w, e)
            + projection_head_fwd_flops(length, wt, e)
            + attn
            + 2 * (length * length + n * n) * e
        )
    if "cpa" in terms:
        out["cpa"] = 2 * 2 * b * mc.num_prototypes * e
    return out


def train_flops_per_step(mc: ModelConfig, objective, batch: int) -> int:
    """3 × the differentiated forward FLOPs + 1 × the stop-gradient ones."""
    fwd = forward_flops(mc, objective, batch)
    return sum(v if k in NO_GRAD else 3 * v for k, v in fwd.items())


def flops_report(mc: ModelConfig, objective, batch: int) -> dict:
    """JSON-ready summary: forward GFLOPs by component, train GFLOPs per step and per image."""
    fwd = forward_flops(mc, objective, batch)
    train = train_flops_per_step(mc, objective, batch)
    return {
        "batch": batch,
        "forward_gflop_by_component": {k: round(v / 1e9, 4) for k, v in fwd.items()},
        "forward_gflop": round(sum(fwd.values()) / 1e9, 4),
        "train_gflop_per_step": round(train / 1e9, 4),
        "train_gflop_per_image": round(train / batch / 1e9, 4),
        "rule": "train = 3 x forward (stop-gradient parts 1 x); matmuls only, 1 MAC = 2 FLOPs",
    }


# The shared reference benchmark's "full" and "small" configs are the base and small
# presets. Differences from ../shared/bench: grayscale input (1 channel), projection heads
# W→4E→E instead of W→2048→128, no BERT pooler.
BENCH_VOCAB_SIZE = 28996
BENCH_FULL = preset_model_config("base", vocab_size=BENCH_VOCAB_SIZE)
BENCH_SMALL = preset_model_config("small", vocab_size=BENCH_VOCAB_SIZE)
