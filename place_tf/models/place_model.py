"""PLACEModel: image/report encoders, pathology observations, CCE decoder, MGCA heads.

One Keras 3 model serves every objective of the ablation table (objectives.py). The
objective's active terms (its terms with λ > 0) decide which optional branches exist:
  - always: image + text encoders, global projection heads, the shared pathology queries
    with the image (VPOE) and text (T-POR) observation extractors — `encode_image` /
    `encode_text` always return observations and attention maps, so every checkpoint
    exports the same signature (for ConVIRT / MGCA those weights are simply untrained and
    `compute_losses` never runs them);
  - "cce": the correlation decoder (+ an EMA teacher image encoder when
    cce_teacher="ema");
  - "cta": local projection heads + token-wise cross-attention; "cpa": prototypes.
Every layer is built in __init__ from the configs (no forward pass), so the model is
ready for `model.fit`, a distribution strategy, or `keras.saving.load_model`.

ObjectiveConfig.projection_head="mgca" (MGCA's Linear-BN-ReLU-Linear-BN heads, the "mgca"
preset) puts synchronized BatchNorms in the global and local heads. Their all-reduce
cannot run inside an XLA cluster under a multi-replica strategy, so with these heads
`forward_features` returns the encoder outputs and `losses_from_features` applies the
heads (and the token alignment that needs the local ones). With
ObjectiveConfig.cta_word_weights="cls_attention" the CTA word weights are the last BERT
layer's [CLS] attention clipped to its 10-90 % quantiles, as MGCA's; MGCA also weights
patches by the ViT's last [CLS] attention, which keras-hub's ViT blocks do not return, so
patch weights stay uniform (and MGCA sums word pieces into words; here the units are the
WordPiece tokens).

Method diagnostics (ObjectiveConfig.diagnostics, issue #21) come as extra float32 keys
"diag/..." of the compute_losses dict, computed on the replica's local batch, with no
gradient and not part of the total: V-POR / T-POR per-slot cross-example cosine
(diag/vpor_cross_cos_k, diag/tpor_cross_cos_k and their means), within-example slot
cosine, per-query normalised attention entropy (diag/*_attn_entropy_k), the same
cross-example cosine of the global embeddings for reference (diag/image_cross_cos,
diag/text_cross_cos), and the CCE target's diagonal mass (diag/cce_target_diagonal).
`diagnostics(batch)` returns them alone.

Losses follow contract (c) (place_tf/losses): a replica returns its share; with no
strategy it is the plain full-batch loss. [design] choices made here: PCMA shares the
learnable logit scale with ITA; CCE masks a static N - round(N·ratio) visible patches per
example; the decoder uses `query_heads` heads; projection heads are 2-layer MLPs with
hidden width 4·embed_dim; MGCA word tokens exclude [CLS].
"""

from __future__ import annotations

import math

import keras
import tensorflow as tf
from keras import ops

from place_tf import objectives
from place_tf.config import ModelConfig, ObjectiveConfig, from_dict, to_dict
from place_tf.losses.cce import cce_loss, cce_target
from place_tf.losses.diagnostics import cross_sample_cosine, diagonal_mass, observation_diagnostics
from place_tf.losses.gather import per_example_to_replica, replica_info
from place_tf.losses.ita import ita_loss
from place_tf.losses.mgca import (
    cpa_loss,
    cta_loss,
    cta_parameter_free_per_example,
    quantile_clipped_weights,
)
from place_tf.losses.pcma import pcma_loss, text_presence
from place_tf.models.image_encoders import build_image_encoder
from place_tf.models.layers.correlation_decoder import CorrelationDecoder
from place_tf.models.layers.mgca_heads import PrototypeLayer, TokenCrossAttention
from place_tf.models.layers.observation_extractor import LearnedQueries, ObservationExtractor
from place_tf.models.layers.projection_head import ProjectionHead
from place_tf.models.text_encoder import build_text_encoder

MAX_LOGIT_SCALE = 100.0
PROJECTION_HIDDEN_MULT = 4
DEFAULT_CTA_TEMPERATURE = 0.1  # MGCA's local_temperature
DEFAULT_CPA_TEMPERATURE = 0.2  # MGCA's proto_temperature


def num_visible_patches(num_patches: int, mask_ratio: float) -> int:
    """Static number of patches the CCE student sees: N - round(N * ratio), at least 1."""
    if not 0.0 <= mask_ratio < 1.0:
        raise ValueError(f"ModelConfig.cce_mask_ratio must be in [0, 1), got {mask_ratio}")
    return max(1, num_patches - int(round(num_patches * mask_ratio)))


@keras.saving.register_keras_serializable(package="place_tf")
class PLACEModel(keras.Model):
    """PLACE and its baselines. See module docstring; API per the project contract (d).

    Args:
        model_config: ModelConfig or its dict.
        objective_config: ObjectiveConfig or its dict (see objectives.objective_config).
        seed: seed of the CCE mask generator (None: drawn from Keras' global RNG, which
            keras.utils.set_random_seed makes deterministic).
    """

    def __init__(self, model_config, objective_config, seed=None, **kwargs):
        if isinstance(model_config, dict):
            model_config = from_dict(ModelConfig, model_config)
        if isinstance(objective_config, dict):
            objective_config = from_dict(ObjectiveConfig, objective_config)
        objectives.validate(objective_config)
        super().__init__(**kwargs)
        self.model_config = model_config
        self.objective_config = objective_config
        self.seed = seed
        self.terms = objectives.active_terms(objective_config)
        mc, oc = model_config, objective_config
        e = mc.embed_dim
        hidden = PROJECTION_HIDDEN_MULT * e
        drop = mc.dropout
        # Global and local heads (observation heads stay MLPs).
        head = dict(
            hidden_dim=oc.projection_hidden or hidden, dropout=drop, style=oc.projection_head
        )
        # Synchronized BatchNorm: outside the XLA part of a multi-replica step.
        self.late_heads = oc.projection_head == "mgca"

        self.image_encoder = build_image_encoder(mc, name="image_encoder")
        self.text_encoder = build_text_encoder(mc, name="text_encoder")
        self.image_projection = ProjectionHead(e, name="image_projection", **head)
        self.text_projection = ProjectionHead(e, name="text_projection", **head)
        self.pathology_queries = LearnedQueries(
            mc.num_queries, mc.query_width, name="pathology_queries"
        )
        self.image_observer = ObservationExtractor(
            mc.query_layers, mc.query_heads, mc.query_width, dropout=drop, name="image_observer"
        )
        self.text_observer = ObservationExtractor(
            mc.query_layers, mc.query_heads, mc.query_width, dropout=drop, name="text_observer"
        )
        self.image_observation_projection = ProjectionHead(
            e, hidden, dropout=drop, name="image_observation_projection"
        )
        self.text_observation_projection = ProjectionHead(
            e, hidden, dropout=drop, name="text_observation_projection"
        )
        self.num_visible = num_visible_patches(self.image_encoder.num_patches, mc.cce_mask_ratio)
        if "cce" in self.terms:
            self.correlation_decoder = CorrelationDecoder(
                num_patches=self.image_encoder.num_patches,
                num_layers=mc.cce_decoder_layers,
                num_heads=mc.query_heads,
                width=mc.cce_decoder_width,
                output_dim=self.image_encoder.token_dim,
                dropout=drop,
                name="correlation_decoder",
            )
            self.cce_seed_generator = keras.random.SeedGenerator(seed, name="cce_mask_seed")
            if oc.cce_teacher == "ema":
                self.teacher_encoder = build_image_encoder(
                    mc, init=False, name="teacher_image_encoder"
                )
                self.teacher_encoder.trainable = False
        if "cta" in self.terms:
            self.image_local_projection = ProjectionHead(e, name="image_local_projection", **head)
            self.text_local_projection = ProjectionHead(e, name="text_local_projection", **head)
            if oc.cta_attention == "learned":
                self.token_cross_attention = TokenCrossAttention(
                    num_heads=1, dropout=drop, name="token_cross_attention"
                )
        if "cpa" in self.terms:
            self.prototype_layer = PrototypeLayer(mc.num_prototypes, e, name="prototypes")
            if oc.freeze_prototypes_epochs > 0:
                # 1: prototypes get their gradient; 0: frozen (set_training_step sets it).
                self.prototype_gradient_gate = self.add_weight(
                    shape=(),
                    initializer="ones",
                    trainable=False,
                    name="prototype_gradient_gate",
                )
        self.log_logit_scale = self.add_weight(
            shape=(),
            initializer=keras.initializers.Constant(math.log(1.0 / oc.temperature_init)),
            trainable=bool(oc.learn_temperature),
            name="log_logit_scale",
        )
        self.loss_trackers = [
            keras.metrics.Mean(name=k) for k in ("loss",) + objectives.loss_keys(oc)
        ]
        self._build_all()

    # ---------------------------------------------------------------- construction

    def _build_all(self):
        """Build every sublayer from the configs (shapes only, no forward pass)."""
        mc = self.model_config
        s, k, q, length = mc.image_size, mc.num_queries, mc.query_width, mc.max_length
        enc, txt = self.image_encoder, self.text_encoder
        n, w, wt = enc.num_patches, enc.token_dim, txt.token_dim
        enc.build((None, s, s, 1))
        txt.build((None, length))
        self.image_projection.build((None, enc.global_dim))
        self.text_projection.build((None, txt.global_dim))
        self.pathology_queries.build()
        self.image_observer.build((None, n, w), (None, k, q))
        self.text_observer.build((None, length, wt), (None, k, q))
        self.image_observation_projection.build((None, k, q))
        self.text_observation_projection.build((None, k, q))
        if "cce" in self.terms:
            m = self.num_visible
            self.correlation_decoder.build((None, m, w), (None, m), (None, length, wt))
            if self.objective_config.cce_teacher == "ema":
                self.teacher_encoder.build((None, s, s, 1))
                self._ema_teacher(0.0)  # start as an exact copy
        if "cta" in self.terms:
            e = mc.embed_dim
            self.image_local_projection.build((None, n, w))
            self.text_local_projection.build((None, length, wt))
            if self.objective_config.cta_attention == "learned":
                self.token_cross_attention.build((None, n, e), (None, length, e))
        if "cpa" in self.terms:
            self.prototype_layer.build()
        self.built = True

    def get_config(self):
        # The preset paths are dropped: the saved weights already contain them, and a
        # loaded model must not need (or re-read) the preset directories.
        mc = to_dict(self.model_config)
        mc["image_init"] = ""
        mc["text_init"] = ""
        return {
            "name": self.name,
            "trainable": self.trainable,
            "model_config": mc,
            "objective_config": to_dict(self.objective_config),
            "seed": self.seed,
        }

    @classmethod
    def from_config(cls, config):
        return cls(**config)

    def build_from_config(self, config):
        pass  # built in __init__

    # ---------------------------------------------------------------- encoders

    @property
    def logit_scale(self):
        """exp(log_logit_scale), clipped at 100 (float32 scalar)."""
        v = ops.convert_to_tensor(self.log_logit_scale)
        return ops.exp(ops.minimum(ops.cast(v, "float32"), math.log(MAX_LOGIT_SCALE)))

    def _observe(self, extractor, projection, tokens, mask, training):
        queries = self.pathology_queries(tokens)
        obs, attn = extractor(tokens, queries, token_mask=mask, training=training)
        return projection(obs, training=training), attn

    def encode_image(self, images, training=False):
        """dict(image_embedding [B,E], observations [B,K,E] (both L2-normalised),
        attention_maps [B,K,h,w], patch_tokens [B,N,W], image_features [B,G])."""
        g = self.image_encoder.grid_size
        features, tokens = self.image_encoder(images, training=training)
        obs, attn = self._observe(
            self.image_observer, self.image_observation_projection, tokens, None, training
        )
        return {
            "image_embedding": self.image_projection(features, training=training),
            "observations": obs,
            "attention_maps": ops.reshape(attn, (-1, self.model_config.num_queries, g, g)),
            "patch_tokens": tokens,
            "image_features": features,
        }

    def encode_text(self, token_ids, padding_mask, training=False):
        """dict(text_embedding [B,E], text_observations [B,K,E] (L2-normalised),
        token_states [B,L,W], text_features [B,W] (the pooled state, ModelConfig.text_pooling))."""
        cls, states, mask = self.text_encoder(token_ids, padding_mask, training=training)
        obs, _ = self._observe(
            self.text_observer, self.text_observation_projection, states, mask, training
        )
        return {
            "text_embedding": self.text_projection(cls, training=training),
            "text_observations": obs,
            "token_states": states,
            "text_features": cls,
        }

    def call(self, inputs, training=False):
        out = dict(self.encode_image(inputs["image"], training=training))
        out.update(self.encode_text(inputs["token_ids"], inputs["padding_mask"], training=training))
        return out

    # ---------------------------------------------------------------- CCE

    def sample_keep_indices(self, batch_size):
        """[B, M] int32 distinct random patch indices per example (M = self.num_visible).

        Seeded by the model's SeedGenerator, decorrelated across replicas by the replica id.
        """
        if "cce" not in self.terms:
            raise ValueError(f"objective {self.objective_config.name!r} has no CCE term")
        seed = ops.cast(self.cce_seed_generator.next(), "int64")
        replica_id, _ = replica_info()
        seed = seed + ops.stack([ops.cast(replica_id, "int64") * 1_000_003, ops.cast(0, "int64")])
        # Philox explicitly (not "auto_select", which depends on the device). XLA and the TF
        # kernels may still draw different bits: pass `cce_keep_indices` to pin a mask.
        noise = tf.random.stateless_uniform(
            (batch_size, self.image_encoder.num_patches), seed, alg="philox"
        )
        _, idx = tf.math.top_k(noise, k=self.num_visible, sorted=False)
        return ops.cast(idx, "int32")

    def _cce(self, images, tokens, states, mask, training, keep=None, global_batch_size=None):
        oc = self.objective_config
        if oc.cce_teacher == "ema":
            _, target = self.teacher_encoder(images, training=False)
        else:
            target = tokens
        target = ops.stop_gradient(target)
        if keep is None:
            keep = self.sample_keep_indices(ops.shape(images)[0])
        _, visible = self.image_encoder.encode_patches(images, keep, training=training)
        predicted = self.correlation_decoder(
            visible, keep, states, context_mask=mask, training=training
        )
        loss = cce_loss(
            target,
            predicted,
            oc.cce_target_temperature,
            oc.cce_student_temperature,
            exclude_diagonal=oc.cce_exclude_diagonal,
            center=oc.cce_center,
            global_batch_size=global_batch_size,
        )
        if not oc.diagnostics:
            return loss, {}
        p_target = cce_target(
            target, oc.cce_target_temperature, oc.cce_exclude_diagonal, oc.cce_center
        )
        return loss, {"diag/cce_target_diagonal": diagonal_mass(p_target)}

    def _ema_teacher(self, momentum):
        """teacher ← momentum·teacher + (1-momentum)·student (momentum 0: exact copy)."""
        teacher, student = self.teacher_encoder.weights, self.image_encoder.weights
        if len(teacher) != len(student):
            raise RuntimeError("teacher and student image encoders differ in structure")
        for t, s in zip(teacher, student, strict=True):
            if tuple(t.shape) != tuple(s.shape):
                raise RuntimeError(f"teacher weight {t.path} {t.shape} != student {s.shape}")
            if momentum == 0.0:
                t.assign(s)
            else:
                t.assign(momentum * t + (1.0 - momentum) * ops.cast(s, t.dtype))

    def update_teacher(self, momentum=None):
        """EMA step teacher ← m·teacher + (1-m)·student (no-op unless cce_teacher="ema").

        Call after each optimizer step (train_step does); under tf.distribute call it in
        cross-replica context (outside strategy.run) so every mirrored copy is updated.
        """
        if "cce" not in self.terms or self.objective_config.cce_teacher != "ema":
            return
        m = self.objective_config.ema_momentum if momentum is None else momentum
        self._ema_teacher(float(m))

    # ---------------------------------------------------------------- losses

    def compute_losses(self, batch, training=False):
        """(total float32 scalar, dict of float32 scalars) for `batch` (contract (a)).

        Keys: the active terms (ita, pcma + pcma_inter + pcma_slot, cce, cta, cpa),
        temperature (1 / logit_scale) and, with ObjectiveConfig.diagnostics, the "diag/..."
        diagnostics (not losses). total = Σ λ_t · term_t over the active terms.
        An optional batch["cce_keep_indices"] [B, M] int32 (M = self.num_visible, distinct
        per row) replaces the random CCE mask (evaluation, tests).
        """
        return self.losses_from_features(
            self.forward_features(batch, training=training), training=training
        )

    def forward_features(self, batch, training=False):
        """The per-replica part of compute_losses: encoders, heads and the per-example
        terms (CCE, CTA). No cross-replica collective, so it compiles under XLA inside
        strategy.run; losses_from_features adds the gathered contrastive terms (and, with
        MGCA's BatchNorm heads, the heads and CTA: see the module docstring)."""
        oc = self.objective_config
        images = batch["image"]
        features, tokens = self.image_encoder(images, training=training)
        cls, states, mask = self.text_encoder(
            batch["token_ids"], batch["padding_mask"], training=training
        )
        _, replicas = replica_info()
        # Even shards (drop_remainder per replica): no collective needed for the size.
        global_batch = ops.shape(images)[0] * replicas
        encoded = {
            "image_features": features,
            "text_features": cls,
            "patch_tokens": tokens,
            "token_states": states,
            "text_mask": mask,
        }
        if "cta" in self.terms and oc.cta_word_weights == "cls_attention":
            # A second, gradient-free BERT pass (~+10-20 % forward compute of the MGCA row)
            # rather than a second copy of the text encoder's forward and pooling.
            encoded["cls_attention"] = self.cls_attention(batch["token_ids"], batch["padding_mask"])
        out = {"global_batch": global_batch}
        if self.late_heads:
            out.update(encoded)
        else:
            out.update(self._heads(encoded, global_batch, training))
        if "pcma" in self.terms:
            out["v_obs"], v_attn = self._observe(
                self.image_observer, self.image_observation_projection, tokens, None, training
            )
            out["t_obs"], t_attn = self._observe(
                self.text_observer, self.text_observation_projection, states, mask, training
            )
            if oc.pcma_presence == "text_attention":
                out["presence"] = text_presence(t_attn, mask)
            if oc.diagnostics:
                out.update(observation_diagnostics("diag/vpor", out["v_obs"], v_attn))
                out.update(observation_diagnostics("diag/tpor", out["t_obs"], t_attn, mask))
        if "cce" in self.terms:
            out["cce"], diag = self._cce(
                images,
                tokens,
                states,
                mask,
                training,
                batch.get("cce_keep_indices"),
                global_batch_size=global_batch,
            )
            out.update(diag)
        return out

    def _heads(self, encoded, global_batch, training):
        """Global embeddings and the per-example CTA term (it needs the local heads)."""
        out = {
            "img_emb": self.image_projection(encoded["image_features"], training=training),
            "txt_emb": self.text_projection(encoded["text_features"], training=training),
        }
        if "cta" in self.terms:
            out["cta"] = self._cta(
                encoded["patch_tokens"],
                encoded["token_states"],
                encoded["text_mask"],
                global_batch,
                training,
                encoded.get("cls_attention"),
            )
        return out

    def cls_attention(self, token_ids, padding_mask):
        """float32 [B, L]: the last BERT layer's attention of [CLS] to every token, averaged
        over heads (no gradient, inference mode). keras-hub's BertBackbone forward re-run
        through its layer attributes, the last TransformerEncoder with
        return_attention_scores=True (MGCA reads `outputs.attentions[-1][:, :, 0, 1:]`)."""
        bb = self.text_encoder.backbone
        ids = ops.cast(token_ids, "int32")
        mask = ops.cast(padding_mask, "int32")
        tokens = bb.token_embedding(ids)
        segments = bb.segment_embedding(ops.zeros_like(ids))
        x = bb.embeddings_add((tokens, bb.position_embedding(tokens), segments))
        x = bb.embeddings_layer_norm(x)
        for layer in bb.transformer_layers[:-1]:
            x = layer(x, padding_mask=mask)
        _, scores = bb.transformer_layers[-1](x, padding_mask=mask, return_attention_scores=True)
        return ops.stop_gradient(ops.mean(ops.cast(scores[:, :, 0, :], "float32"), axis=1))

    def _cta(self, tokens, states, mask, global_batch, training, cls_attention=None):
        oc = self.objective_config
        temperature = getattr(oc, "cta_temperature", DEFAULT_CTA_TEMPERATURE)
        img_local = self.image_local_projection(tokens, training=training)
        if oc.cta_attention == "parameter_free":
            # MGCA's words are the positions after [CLS], padding as zero features (its
            # aggregate_tokens pads with zeros) that the local head's BatchNorm also sees.
            words = mask[:, 1:]
            word_states = states[:, 1:] * ops.cast(words, states.dtype)[..., None]
            txt_local = self.text_local_projection(word_states, training=training)
            word_weights = None
            if cls_attention is not None:
                word_weights = quantile_clipped_weights(cls_attention[:, 1:], words)
            per_example = cta_parameter_free_per_example(
                img_local,
                txt_local,
                words,
                temperature,
                word_weights=word_weights,
                # MGCA re-normalises the patches' attended words for a CNN, not for a ViT.
                normalize_patch_attended=self.model_config.image_encoder != "vit",
            )
            return per_example_to_replica(per_example, global_batch)
        txt_local = self.text_local_projection(states, training=training)
        length = ops.shape(mask)[1]
        words = ops.logical_and(mask, (ops.arange(length) > 0)[None, :])  # no [CLS]
        img_for_txt, txt_for_img = self.token_cross_attention(
            img_local, txt_local, text_mask=words, training=training
        )
        return cta_loss(
            img_local,
            txt_local,
            words,
            img_for_txt,
            txt_for_img,
            temperature,
            word_weights=None
            if cls_attention is None
            else quantile_clipped_weights(cls_attention, words),
            global_batch_size=global_batch,
        )

    def _prototypes(self, reference):
        """The CPA prototypes; no gradient while prototype_gradient_gate is 0."""
        protos = self.prototype_layer(reference)
        gate = getattr(self, "prototype_gradient_gate", None)
        if gate is None:
            return protos
        gate = ops.cast(ops.convert_to_tensor(gate), protos.dtype)
        return gate * protos + (1.0 - gate) * ops.stop_gradient(protos)

    def set_training_step(self, step, steps_per_epoch):
        """Step-dependent state: the CPA prototypes get no gradient while
        step < freeze_prototypes_epochs * steps_per_epoch (MGCA's on_after_backward drops
        their gradient while current_epoch < freeze_prototypes_epochs). `step` counts the
        steps done before this one (0 for the first). Call before every training step,
        under tf.distribute in cross-replica context (outside strategy.run); a no-op
        without the option. A model never told keeps its prototypes trainable."""
        gate = getattr(self, "prototype_gradient_gate", None)
        if gate is None:
            return
        frozen_steps = self.objective_config.freeze_prototypes_epochs * int(steps_per_epoch)
        gate.assign(ops.cast(ops.greater_equal(step, frozen_steps), gate.dtype))

    def losses_from_features(self, feats, training=True):
        """The contrastive terms over the gathered global batch, and the weighted total.

        `training` only matters with MGCA's BatchNorm heads, which run here (batch
        statistics when True); the trainer calls this in its training step only.
        """
        oc = self.objective_config
        if self.late_heads:
            feats = {**feats, **self._heads(feats, feats["global_batch"], training)}
        img_emb, txt_emb = feats["img_emb"], feats["txt_emb"]
        scale = self.logit_scale
        losses = {k: feats[k] for k in ("cce", "cta") if k in feats}
        if "ita" in self.terms:
            losses["ita"] = ita_loss(img_emb, txt_emb, scale, oc.ita_sum_directions)
        if "pcma" in self.terms:
            p = pcma_loss(
                feats["v_obs"],
                feats["t_obs"],
                scale,
                feats["global_batch"],
                presence=feats.get("presence"),
            )
            losses["pcma"], losses["pcma_inter"], losses["pcma_slot"] = (
                p["total"],
                p["inter"],
                p["slot"],
            )
        if "cpa" in self.terms:
            losses["cpa"] = cpa_loss(
                img_emb,
                txt_emb,
                self._prototypes(img_emb),
                oc.sinkhorn_epsilon,
                oc.sinkhorn_iterations,
                getattr(oc, "cpa_temperature", DEFAULT_CPA_TEMPERATURE),
            )
        losses = {k: ops.cast(v, "float32") for k, v in losses.items()}
        total = ops.convert_to_tensor(0.0, "float32")
        for t in self.terms:
            total = total + float(getattr(oc, f"lambda_{t}")) * losses[t]
        losses["temperature"] = 1.0 / scale
        if oc.diagnostics:
            losses.update({k: v for k, v in feats.items() if k.startswith("diag/")})
            losses["diag/image_cross_cos"] = ops.mean(cross_sample_cosine(img_emb[:, None]))
            losses["diag/text_cross_cos"] = ops.mean(cross_sample_cosine(txt_emb[:, None]))
        return total, losses

    def diagnostics(self, batch, training=False):
        """dict of the "diag/..." float32 scalars for `batch` (module docstring); {} when
        ObjectiveConfig.diagnostics is off."""
        _, losses = self.compute_losses(batch, training=training)
        return {k: v for k, v in losses.items() if k.startswith("diag/")}

    # ---------------------------------------------------------------- fit

    @property
    def metrics(self):
        return list(self.loss_trackers)

    def _record(self, total, losses):
        values = {"loss": total, **losses}
        for m in self.loss_trackers:
            m.update_state(values[m.name])
        return {m.name: m.result() for m in self.loss_trackers}

    @property
    def trainable_loss_variables(self):
        """The trainable variables compute_losses uses for this objective (all get a gradient).

        The observation branch exists for every objective (encode outputs) but is only
        trained by PCMA; custom loops should differentiate w.r.t. this list, not
        `trainable_variables`, so that no None gradient reaches an all-reduce.
        """
        if "pcma" in self.terms:
            return list(self.trainable_variables)
        unused = {
            id(v)
            for layer in (
                self.pathology_queries,
                self.image_observer,
                self.text_observer,
                self.image_observation_projection,
                self.text_observation_projection,
            )
            for v in layer.trainable_variables
        }
        return [v for v in self.trainable_variables if id(v) not in unused]

    def train_step(self, data):
        batch, _, _ = keras.utils.unpack_x_y_sample_weight(data)
        with tf.GradientTape() as tape:
            total, losses = self.compute_losses(batch, training=True)
            scaled = self.optimizer.scale_loss(total)
        variables = self.trainable_loss_variables
        grads = tape.gradient(scaled, variables)
        self.optimizer.apply(grads, variables)
        self.update_teacher()
        return self._record(total, losses)

    def test_step(self, data):
        batch, _, _ = keras.utils.unpack_x_y_sample_weight(data)
        total, losses = self.compute_losses(batch, training=False)
        return self._record(total, losses)
