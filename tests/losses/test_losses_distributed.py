"""Cross-replica convention (contract (c)) under MirroredStrategy on 2 logical CPUs.

A global batch of 8 is split over two replicas (4+4, and unevenly 5+3; inside
tf.function, and 4+4 eagerly). Shared variables
(projections W, a log logit scale, CPA prototypes) map the raw inputs to embeddings inside
`strategy.run` under a GradientTape. Checked against the same computation on one device
with the full batch:
  (i)  contrastive terms (ITA, PCMA-inter, CPA): every replica's value = full-batch value;
       per-example terms (CCE, CTA, PCMA-slot): the sum of replica values = full value;
  (ii) the SUM over replicas of every gradient = the single-device full-batch gradient.

Logical devices must be configured before TensorFlow initialises its runtime. When this
module is imported first that is done here; when other tests have already initialised TF
with a single CPU the same checks run in a subprocess (`python <this file>`), which
configures the devices before any op and prints the results as JSON.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

TOL = 1e-5
# name -> (shard sizes, run inside tf.function); the trainer runs graphs, Keras may run eagerly.
SPLITS = {"even": ((4, 4), True), "uneven": ((5, 3), True), "even_eager": ((4, 4), False)}
LOSSES = ("ita", "pcma", "pcma_inter", "pcma_slot", "pcma_presence_inter", "cce", "cta", "cpa")
CONTRASTIVE = (
    "ita",
    "pcma_inter",
    "pcma_presence_inter",
    "cpa",
)  # every replica holds the global value
PER_EXAMPLE = ("cce", "cta", "pcma_slot")  # replica values sum to the global value
VAR_NAMES = ("w_img", "w_txt", "log_scale", "prototypes")


def _configure_two_cpus() -> bool:
    """Split the CPU into 2 logical devices if TF is still unconfigured; report success."""
    import tensorflow as tf

    try:
        cpu = tf.config.list_physical_devices("CPU")[0]
        tf.config.set_logical_device_configuration(
            cpu, [tf.config.LogicalDeviceConfiguration()] * 2
        )
    except RuntimeError:  # runtime already initialised by an earlier test module
        pass
    return len(tf.config.list_logical_devices("CPU")) >= 2


def _inputs() -> dict[str, np.ndarray]:
    """Raw per-example inputs for a global batch of 8 (B, K=3, N=4 patches, L=5 tokens)."""
    rng = np.random.default_rng(0)
    mask = np.ones((8, 5), bool)
    for i, n_real in enumerate([5, 3, 4, 2, 5, 1, 3, 4]):
        mask[i, n_real:] = False
    return {
        "img": rng.normal(size=(8, 6)).astype(np.float32),
        "txt": rng.normal(size=(8, 6)).astype(np.float32),
        "v_obs": rng.normal(size=(8, 3, 6)).astype(np.float32),
        "t_obs": rng.normal(size=(8, 3, 6)).astype(np.float32),
        "clean_patches": rng.normal(size=(8, 4, 6)).astype(np.float32),
        "masked_patches": rng.normal(size=(8, 4, 6)).astype(np.float32),
        "txt_tokens": rng.normal(size=(8, 5, 6)).astype(np.float32),
        "txt_mask": mask,
        "presence": rng.uniform(0.0, 1.0, size=(8, 3)).astype(np.float32),
    }


def _initial_variables() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(1)
    return {
        "w_img": rng.normal(size=(6, 4)).astype(np.float32),
        "w_txt": rng.normal(size=(6, 4)).astype(np.float32),
        "log_scale": np.float32(np.log(1 / 0.2)),
        "prototypes": rng.normal(size=(5, 4)).astype(np.float32),
    }


def _losses(batch, v):
    """All loss terms for one (local or full) batch; embeddings come from shared variables."""
    import tensorflow as tf

    from place_tf.losses import cce_loss, cpa_loss, cross_attend, cta_loss, ita_loss, pcma_loss

    def embed(x, w):
        return tf.math.l2_normalize(tf.einsum("...i,ij->...j", x, w), axis=-1)

    scale = tf.exp(v["log_scale"])
    img, txt = embed(batch["img"], v["w_img"]), embed(batch["txt"], v["w_txt"])
    v_obs, t_obs = embed(batch["v_obs"], v["w_img"]), embed(batch["t_obs"], v["w_txt"])
    pcma = pcma_loss(v_obs, t_obs, scale)
    weighted = pcma_loss(v_obs, t_obs, scale, presence=batch["presence"])
    # CCE: target from the clean view through the same projection (stop-gradient inside).
    cce = cce_loss(
        tf.einsum("bni,ij->bnj", batch["clean_patches"], v["w_img"]),
        tf.einsum("bni,ij->bnj", batch["masked_patches"], v["w_img"]),
    )
    patches = embed(batch["clean_patches"], v["w_img"])
    words = embed(batch["txt_tokens"], v["w_txt"])
    mask = batch["txt_mask"]
    cta = cta_loss(
        patches,
        words,
        mask,
        cross_attend(words, patches, None, 0.1),
        cross_attend(patches, words, mask, 0.1),
        0.1,
    )
    protos = tf.math.l2_normalize(v["prototypes"], axis=-1)
    cpa = cpa_loss(img, txt, protos, epsilon=0.05, iterations=3, temperature=0.1)
    return {
        "ita": ita_loss(img, txt, scale),
        "pcma": pcma["total"],
        "pcma_inter": pcma["inter"],
        "pcma_slot": pcma["slot"],
        "pcma_presence_inter": weighted["inter"],
        "cce": cce,
        "cta": cta,
        "cpa": cpa,
    }


def _loss_and_grads(batch, variables):
    import tensorflow as tf

    with tf.GradientTape(persistent=True) as tape:
        losses = _losses(batch, variables)
    grads = {}
    for name, loss in losses.items():
        g = tape.gradient(loss, [variables[k] for k in VAR_NAMES])
        grads[name] = [
            tf.zeros_like(variables[k]) if gi is None else tf.convert_to_tensor(gi)
            for k, gi in zip(VAR_NAMES, g, strict=True)
        ]
    del tape
    return losses, grads


def run_checks() -> dict:
    """Single-device vs MirroredStrategy results as plain floats/lists (JSON-serialisable)."""
    import tensorflow as tf

    data = _inputs()
    init = _initial_variables()

    single_vars = {k: tf.Variable(val, name=k) for k, val in init.items()}
    full = {k: tf.constant(val) for k, val in data.items()}
    ref_losses, ref_grads = tf.function(_loss_and_grads)(full, single_vars)
    local_only_ita = float(_losses({k: t[:4] for k, t in full.items()}, single_vars)["ita"])

    strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
    with strategy.scope():
        dist_vars = {k: tf.Variable(val, name=k) for k, val in init.items()}

    def dist_step(batch):
        return strategy.run(_loss_and_grads, args=(batch, dist_vars))

    graph_step = tf.function(dist_step)

    out = {
        "num_replicas": strategy.num_replicas_in_sync,
        "local_only_ita": local_only_ita,
        "ref": {
            n: {
                "loss": float(ref_losses[n]),
                "grad_norm": float(sum(np.abs(g.numpy()).sum() for g in ref_grads[n])),
            }
            for n in LOSSES
        },
    }
    for split_name, (sizes, in_graph) in SPLITS.items():
        bounds = np.cumsum((0,) + sizes)

        def shard(ctx, bounds=bounds):
            r = ctx.replica_id_in_sync_group
            return {k: tf.constant(val[bounds[r] : bounds[r + 1]]) for k, val in data.items()}

        batch = strategy.experimental_distribute_values_from_function(shard)
        losses, grads = (graph_step if in_graph else dist_step)(batch)
        res = {}
        for n in LOSSES:
            per_replica = [float(x) for x in strategy.experimental_local_results(losses[n])]
            summed = [
                sum(r.numpy() for r in strategy.experimental_local_results(grads[n][i]))
                for i in range(len(VAR_NAMES))
            ]
            res[n] = {
                "replica_losses": per_replica,
                "grad_max_abs_diff": {
                    k: float(np.max(np.abs(s - ref_grads[n][i].numpy())))
                    for i, (k, s) in enumerate(zip(VAR_NAMES, summed, strict=True))
                },
            }
        out[split_name] = res
    return out


_RESULTS_MARK = "LOSS-DIST-RESULTS:"
IN_PROCESS = _configure_two_cpus()


@pytest.fixture(scope="module")
def results():
    if IN_PROCESS:
        return run_checks()
    repo = Path(__file__).resolve().parents[2]
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(repo), env.get("PYTHONPATH")]))
    proc = subprocess.run(
        [sys.executable, str(Path(__file__).resolve())],
        capture_output=True,
        text=True,
        env=env,
        cwd=repo,
        timeout=600,
    )
    assert proc.returncode == 0, f"subprocess failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    line = [x for x in proc.stdout.splitlines() if x.startswith(_RESULTS_MARK)][-1]
    return json.loads(line[len(_RESULTS_MARK) :])


def test_two_replicas_and_a_discriminating_batch(results):
    assert results["num_replicas"] == 2
    # A replica computing on its own shard only would get a different ITA value.
    assert abs(results["local_only_ita"] - results["ref"]["ita"]["loss"]) > 1e-2
    for name in LOSSES:  # every term produces a real gradient to compare
        assert results["ref"][name]["grad_norm"] > 1e-3, name


@pytest.mark.parametrize("split", sorted(SPLITS))
@pytest.mark.parametrize("name", CONTRASTIVE)
def test_contrastive_value_on_every_replica_is_global(results, split, name):
    ref = results["ref"][name]["loss"]
    np.testing.assert_allclose(results[split][name]["replica_losses"], [ref, ref], atol=TOL)


@pytest.mark.parametrize("split", sorted(SPLITS))
@pytest.mark.parametrize("name", PER_EXAMPLE)
def test_per_example_values_sum_to_global(results, split, name):
    values = results[split][name]["replica_losses"]
    np.testing.assert_allclose(sum(values), results["ref"][name]["loss"], atol=TOL)
    assert all(v != 0 for v in values)


@pytest.mark.parametrize("split", sorted(SPLITS))
@pytest.mark.parametrize("name", LOSSES)
def test_summed_replica_gradients_equal_global_gradient(results, split, name):
    diffs = results[split][name]["grad_max_abs_diff"]
    assert set(diffs) == set(VAR_NAMES)
    for var, diff in diffs.items():
        assert diff < TOL, f"{name}/{split}: gradient of {var} differs by {diff}"


if __name__ == "__main__":
    if not IN_PROCESS:
        sys.exit("could not configure 2 logical CPU devices")
    print(_RESULTS_MARK + json.dumps(run_checks()))
