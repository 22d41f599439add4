"""`python -m place_tf.train --flagfile=configs/quickstart.flags` — PLACE pre-training.

Flags are generated from the typed configs (place_tf.config): every dataclass field is a
flag of the same name; a name shared by several configs (image_size, max_length,
deterministic) sets all of them. Extra flags:
  --synthetic_images=N   if --corpus_dir has no corpus (or a stale SynthCXR one: another
                         generator version, size or seed), generate SynthCXR there first
  --export / --noexport  write the TF Serving SavedModel after training
  --probe / --noprobe    linear probe of the frozen image embeddings vs a random encoder
"""

from __future__ import annotations

import dataclasses
import os
import sys

from absl import app, flags

from place_tf import config as config_lib
from place_tf import objectives, presets

FLAGS = flags.FLAGS


# Flags whose value is more than a number: what they accept (README "Training").
FIELD_HELP = {
    "image_init": "pre-trained image encoder: a keras-hub preset name, kaggle://..., "
    "hf://owner/name (ViT/DeiT), or a local keras-hub or Hugging Face directory; "
    "its architecture replaces the vit_* flags ('' = random init)",
    "text_init": "pre-trained BERT: a keras-hub preset name, kaggle://..., hf://owner/name, "
    "or a local keras-hub or Hugging Face directory; brings its vocabulary and casing; "
    "the first --text_layers layers are kept ('' = random init)",
    "lowercase_reports": "lower-case report text before a cased checkpoint tokenizer (MGCA does)",
}


def define_config_flags() -> None:
    """One absl flag per config field (idempotent)."""
    seen: dict[str, object] = {}
    for section, cls in config_lib.SECTIONS.items():
        for f in dataclasses.fields(cls):
            if f.name in seen or f.name in FLAGS or f.name not in config_lib.field_names():
                continue
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
            seen[f.name] = default
            help_ = f"[{section}] {FIELD_HELP.get(f.name, f.name)}"
            if isinstance(default, bool):
                flags.DEFINE_bool(f.name, default, help_)
            elif isinstance(default, int):
                flags.DEFINE_integer(f.name, default, help_)
            elif isinstance(default, float):
                flags.DEFINE_float(f.name, default, help_)
            else:
                flags.DEFINE_string(f.name, default, help_)


define_config_flags()
flags.DEFINE_integer(
    "synthetic_images",
    0,
    "generate a SynthCXR corpus of this size in --corpus_dir if absent or stale",
)
flags.DEFINE_integer("synthetic_seed", 0, "seed of the generated SynthCXR corpus")
flags.DEFINE_bool("export", True, "export the TF Serving SavedModel after training")
flags.DEFINE_bool("probe", True, "linear-probe the frozen image embeddings at the end")
flags.DEFINE_enum(
    "model_preset",
    "",
    ["", *presets.MODEL_PRESETS],
    "named model size (place_tf/presets.py); explicit model flags override its fields",
)
flags.DEFINE_enum(
    "objective",
    "place",
    list(objectives.OBJECTIVE_TABLE),
    "objective preset; explicit --lambda_* and other objective flags override it",
)


def configs_from_flags(overrides: dict | None = None):
    """Configs from parsed flags: the flags' values, with --model_preset's fields and
    --objective's preset for the fields not given explicitly (on the command line or in
    a flag file)."""
    names = config_lib.field_names()
    obj_fields = {f.name for f in dataclasses.fields(config_lib.ObjectiveConfig)}
    values = {n: FLAGS[n].value for n in names if n not in obj_fields or FLAGS[n].present}
    if FLAGS.model_preset:
        preset = presets.model_fields(FLAGS.model_preset)
        values.update({k: v for k, v in preset.items() if not FLAGS[k].present})
    values.update(overrides or {})
    return config_lib.Configs(**config_lib.from_flat(values, FLAGS.objective))


MIMIC_HINT = """\
No converted corpus at --corpus_dir={corpus}.
Convert MIMIC-CXR-JPG 2.0.0 (and its reports) first:
  tools/run python -m place_tf.data.convert mimic --input /path/to/mimic-cxr-jpg/2.0.0 \\
      --reports_dir /path/to/mimic-cxr-reports --output {corpus}
Or try the built-in synthetic corpus on a CPU in minutes:
  tools/run python -m place_tf.train --flagfile=configs/quickstart.flags"""


def prepare_corpus(corpus_dir: str, synthetic_images: int, image_size: int, seed: int) -> None:
    """With --synthetic_images, make corpus_dir hold that SynthCXR corpus (generated,
    reused, or a stale SynthCXR cache rebuilt: synthetic.refresh_cache); a converted
    corpus is used as it is. Neither a corpus nor --synthetic_images: the MIMIC hint."""
    from place_tf.data import manifest, synthetic

    if synthetic_images > 0:
        synthetic.refresh_cache(corpus_dir, synthetic_images, image_size, seed)
    elif not os.path.exists(os.path.join(corpus_dir, manifest.MANIFEST_NAME)):
        raise SystemExit(MIMIC_HINT.format(corpus=corpus_dir or "<unset>"))


def run(
    cfg,
    synthetic_images: int = 0,
    synthetic_seed: int = 0,
    export: bool = True,
    probe: bool = True,
    on_step=None,
) -> dict:
    """Library entry point (also used by the TFX run_fn): train, save, export, probe.
    `on_step(trainer, step)` runs after every training step (fault injection in the
    reliability tests)."""
    from place_tf import pretrained

    # Before importing TensorFlow, generating data or building anything.
    pretrained.check_model_config(cfg.model)
    from place_tf.training import run_dir
    from place_tf.training.loop import Trainer

    prepare_corpus(cfg.data.corpus_dir, synthetic_images, cfg.data.image_size, synthetic_seed)
    trainer = Trainer(cfg, on_step=on_step)
    summary = trainer.run()
    model_dir = cfg.train.model_dir
    if export and "model" in summary:
        from place_tf import export as export_lib

        # A new integer version each time (a resumed or repeated run never overwrites).
        export_dir = export_lib.next_version_dir(os.path.join(model_dir, "export"))
        export_lib.export_saved_model(
            trainer.model, trainer.tokenizer, export_dir, image_size=cfg.data.image_size
        )
        summary["export"] = export_dir
    if probe and "model" in summary:
        from place_tf.evaluate import linear_probe

        summary["linear_probe"] = linear_probe.compare_with_random_init(
            trainer.model, trainer.tokenizer, cfg
        )
    if "model" in summary:  # the chief: other workers save nothing (their dirs are temporary)
        run_dir.write_summary(model_dir, summary)
    return summary


def _print_summary(summary: dict, model_dir: str) -> None:
    lines = [
        "",
        "PLACE-TF training finished",
        f"  steps:             {summary['steps']} (global batch {summary['global_batch']}, {summary['replicas']} replica(s))",
        f"  throughput:        {summary['images_per_second']} images/s",
        f"  final loss:        {summary['final_losses'].get('loss', float('nan')):.4f}",
        f"  skipped records:   {summary['skipped_records']}  non-finite steps skipped: {summary['bad_steps']}",
        f"  model (.keras):    {summary.get('model')}",
        f"  SavedModel:        {summary.get('export', '-')}",
        f"  TensorBoard logs:  tensorboard --logdir {os.path.join(model_dir, 'tensorboard')}",
    ]
    probe = summary.get("linear_probe")
    if probe:
        lines.append(
            f"  linear probe AUROC (held-out, frozen image embeddings): trained {probe['trained']['macro_auroc']:.3f}"
            f" vs random init {probe['random_init']['macro_auroc']:.3f}"
            + (
                f" (raw pixels {probe['raw_pixels']['macro_auroc']:.3f})"
                if "raw_pixels" in probe
                else ""
            )
        )
    lines.append(f"  summary JSON:      {os.path.join(model_dir, 'summary.json')}")
    print("\n".join(lines), flush=True)


def main(argv, on_step=None):
    """The CLI; `on_step` as in `run` (tests/reliability/fault_launcher.py)."""
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    from place_tf.pretrained import CheckpointError

    cfg = configs_from_flags()
    try:
        summary = run(
            cfg, FLAGS.synthetic_images, FLAGS.synthetic_seed, FLAGS.export, FLAGS.probe, on_step
        )
    except CheckpointError as e:  # a message that names the handle/file and the fix
        print(f"place_tf.train: error: {e}", file=sys.stderr)
        return 2
    _print_summary(summary, cfg.train.model_dir)
    return 0


if __name__ == "__main__":
    sys.exit(app.run(main))
