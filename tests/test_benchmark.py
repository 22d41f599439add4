"""Benchmark suite: FLOP formulas (hand-computed), JSON outputs of tools/benchmark.py (the
CLI over place_tf/bench/), and no retracing of training's step after warm-up."""

import dataclasses
import importlib.util
import json
import os
import subprocess
import sys

import pytest

from place_tf import flops
from place_tf.bench import results, train_worker
from place_tf.bench import train as bench_train
from place_tf.config import tiny_model_config

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_spec = importlib.util.spec_from_file_location(
    "place_benchmark_tool", os.path.join(REPO, "tools", "benchmark.py")
)
bench = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(bench)

TINY = tiny_model_config()


# ------------------------------------------------------------------ FLOP formulas


def test_encoder_layer_and_block_formulas():
    # n=17, d=32, f=64: 2·(4·17·32² + 2·17·32·64 + 2·17²·32) = 2·(69632 + 69632 + 18496)
    assert flops.encoder_layer_fwd_flops(17, 32, 64) == 315520
    # t=4 queries, s=16 tokens, q=c=32, MLP 128: self 16384+1024, cross 8192+32768+4096,
    # MLP 32768 → 2·95232
    assert flops.cross_block_fwd_flops(4, 16, 32, 32) == 190464
    assert flops.projection_head_fwd_flops(4, 32, 16) == 2 * 4 * 32 * 64 + 2 * 4 * 64 * 16


def test_convirt_flops_tiny_hand_computed():
    fwd = flops.forward_flops(TINY, "convirt", batch=2)
    # ViT: patch embedding 2·16·64·32 = 65536, one layer over 17 tokens 315520; × B=2
    # BERT: one layer over 16 tokens 2·(65536 + 65536 + 16384) = 294912; × 2
    # heads: (2·32·64 + 2·64·16) × 2 towers × 2 examples; ITA logits 2·2²·16
    assert fwd == {
        "image_encoder": 762112,
        "text_encoder": 589824,
        "heads": 24576,
        "ita": 128,
    }
    assert flops.train_flops_per_step(TINY, "convirt", 2) == 3 * 1376640


def test_place_flops_tiny_hand_computed():
    fwd = flops.forward_flops(TINY, "place", batch=2)
    assert fwd["image_observer"] == 2 * (190464 + 24576)  # block over 16 patches + head
    assert fwd["text_observer"] == 2 * (190464 + 24576)  # L = 16 = N here
    assert fwd["pcma_loss"] == 2 * (4 * 2 * 2 * 16 + 2 * 4 * 4 * 16)
    # M = 16 - round(8) = 8 visible: patch embedding 65536 + layer over 9 tokens
    # 2·(36864 + 36864 + 5184) = 157824
    assert fwd["cce_encoder"] == 2 * (65536 + 157824)
    # embed 2·8·32·32 + scatter 2·8·16·32 + block(16 q over 16 tokens) 589824 + head 32768
    assert fwd["cce_decoder"] == 2 * (16384 + 8192 + 589824 + 32768)
    assert fwd["cce_loss"] == fwd["cce_target"] == 2 * 2 * 16 * 16 * 32
    # The target similarities are under stop_gradient: counted once, not three times.
    assert flops.train_flops_per_step(TINY, "place", 2) == 3 * (4044928 - 32768) + 32768
    assert sum(fwd.values()) == 4044928


def test_ema_teacher_and_mgca_terms_are_counted():
    from place_tf.objectives import objective_config

    ema = objective_config("place", cce_teacher="ema")
    fwd = flops.forward_flops(TINY, ema, 2)
    assert fwd["ema_teacher"] == fwd["image_encoder"]
    plain = flops.train_flops_per_step(TINY, "place", 2)
    assert flops.train_flops_per_step(TINY, ema, 2) == plain + fwd["image_encoder"]
    mgca = flops.forward_flops(TINY, "mgca", 2)
    assert set(mgca) == {"image_encoder", "text_encoder", "heads", "ita", "cta", "cpa"}
    assert mgca["cpa"] == 2 * 2 * 2 * 8 * 16


def test_full_config_matches_the_shared_reference_model():
    # ../shared/bench/common.py: ViT-B/16 + BERT-6, batch 16 → 2154.2 train GFLOP/step.
    # Ours differs only by a 1-channel patch embedding and narrower heads (< 1 %).
    ours = flops.train_flops_per_step(flops.BENCH_FULL, "convirt", 16) / 1e9
    assert abs(ours - 2154.2) / 2154.2 < 0.01
    ratio = flops.train_flops_per_step(flops.BENCH_FULL, "place", 16) / (ours * 1e9)
    assert 1.3 < ratio < 1.6  # the masked student pass is the main extra


def test_flops_reject_bad_inputs():
    with pytest.raises(ValueError, match="ViT"):
        flops.forward_flops(dataclasses.replace(TINY, image_encoder="resnet50"), "place", 2)
    with pytest.raises(ValueError, match="batch"):
        flops.forward_flops(TINY, "place", 0)
    with pytest.raises(ValueError, match="unknown objective"):
        flops.forward_flops(TINY, "nope", 2)


def test_quickstart_config_is_the_quickstart_preset():
    mc = train_worker.model_config("quickstart")
    assert (mc.image_size, mc.patch_size, mc.vit_layers, mc.vit_width) == (64, 8, 2, 128)
    assert (mc.text_layers, mc.max_length, mc.embed_dim, mc.num_queries) == (2, 48, 64, 8)


# ------------------------------------------------------------------ retracing


def test_train_step_does_not_retrace_after_warmup():
    """The trainer's own step: after the first (tracing) call, N further steps with new
    batch values trigger no new trace of the step or of compute_losses."""
    spec = dict(
        config="tiny", objective="convirt", xla=False, precision="fp32", replicas=1,
        global_batch=4, seed=0,
    )  # fmt: skip
    step, model, strategy, _, cfgs = train_worker.build_train_step(spec)
    loss_traces = train_worker.count_loss_traces(model)
    assert step.experimental_get_tracing_count() == 0
    batches = [
        train_worker.distribute_batch(strategy, train_worker.random_batch(cfgs.model, 4, seed))
        for seed in range(4)
    ]
    first = float(step(batches[0])["loss"])
    assert step.experimental_get_tracing_count() == 1  # the counters see a trace
    assert loss_traces["calls"] == 1
    losses = [float(step(b)["loss"]) for b in batches[1:]]
    assert step.experimental_get_tracing_count() == 1
    assert loss_traces["calls"] == 1
    assert all(v == v for v in [first, *losses])  # finite, and the steps really ran
    assert len(set([first, *losses])) > 1


# ------------------------------------------------------------------ JSON outputs


def _run_tool(*args, timeout=600):
    proc = subprocess.run(
        [sys.executable, os.path.join(REPO, "tools", "benchmark.py"), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=REPO,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def _check_common(doc, benchmark):
    for k in results.COMMON_KEYS:
        assert k in doc, k
    assert doc["benchmark"] == benchmark
    m = doc["machine"]
    assert m["cpu_cores"] == os.cpu_count() and m["memory_gb"] > 0 and len(m["loadavg"]) == 3
    assert doc["versions"]["tensorflow"].startswith("2.")


def test_train_subcommand_writes_documented_json(tmp_path):
    _run_tool(
        "train", "--quick", "--objectives", "convirt", "--xla", "off", "--batch", "8",
        "--steps", "2", "--peak_gflops", "50", "--out_dir", str(tmp_path),
    )  # fmt: skip
    doc = json.loads((tmp_path / "train.json").read_text())
    _check_common(doc, "train")
    (r,) = doc["results"]
    for k in results.TRAIN_KEYS:
        assert k in r, k
    assert (r["config"], r["objective"], r["xla"], r["replicas"]) == ("tiny", "convirt", False, 1)
    assert r["global_batch"] == 8 and len(r["step_s"]) == r["steps"] == 2
    assert r["min_step_s"] <= r["median_step_s"] <= r["max_step_s"]
    assert r["images_per_s"] == pytest.approx(8 / r["median_step_s"], rel=1e-2, abs=2e-3)
    expected = flops.train_flops_per_step(TINY, "convirt", 8) / 1e9
    assert r["train_gflop_per_step"] == pytest.approx(expected, abs=0.01)
    assert r["mfu"] == pytest.approx(r["achieved_gflops"] / 50, rel=1e-2, abs=2e-4)  # both rounded
    assert r["traces_after_warmup"] == 0 and r["loss_traces_after_warmup"] == 0
    assert r["peak_rss_mb"] > 100
    assert doc["summary"]["retraces"]["max_traces_after_warmup"] == 0


def test_input_subcommand_writes_json_with_train_ratio(tmp_path):
    # A previous train result at the same image size gives the consumption rate.
    (tmp_path / "train.json").write_text(
        json.dumps(
            {
                "results": [
                    {
                        "config": "quickstart", "objective": "place", "xla": True,
                        "precision": "fp32", "replicas": 1, "global_batch": 16,
                        "image_size": 64, "images_per_s": 2.0,
                    }
                ]
            }
        )
    )  # fmt: skip
    args = ["input", "--quick", "--out_dir", str(tmp_path), "--corpus_dir", str(tmp_path / "c")]
    assert bench.main(args) == 0
    doc = json.loads((tmp_path / "input.json").read_text())
    _check_common(doc, "input")
    for k in results.INPUT_KEYS:
        assert k in doc, k
    assert doc["image_size"] == 64 and doc["augment"] is True
    assert len(doc["batch_s"]) == doc["batches"] == 3
    assert doc["images_per_s"] > 0
    (ratio,) = doc["train_ratios"]
    assert ratio["input_over_train"] == pytest.approx(doc["images_per_s"] / 2.0, rel=1e-2)


def test_train_dry_run_lists_the_matrix(capsys):
    args = [
        "train", "--dry_run", "--configs", "quickstart,full", "--xla", "on,off",
        "--precision", "fp32,bf16", "--replicas", "1,2", "--batch", "16",
    ]  # fmt: skip
    assert bench.main(args) == 0
    lines = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("would run:")]
    specs = [json.loads(ln.split(":", 1)[1]) for ln in lines]
    assert len(specs) == 2 * 2 * 2 * 2 * 2  # configs × objectives × xla × precision × replicas
    full = [s for s in specs if s["config"] == "full"]
    assert all((s["warmup"], s["steps"]) == (1, 3) for s in full)


def test_summary_ratios_and_reference():
    base = dict(
        config="full", xla=True, precision="fp32", replicas=1, global_batch=16,
        traces_after_warmup=0, loss_traces_after_warmup=0,
    )  # fmt: skip
    results = [
        dict(base, objective="convirt", median_step_s=10.0, images_per_s=1.6,
             train_gflop_per_step=2146.0),
        dict(base, objective="place", median_step_s=14.0, images_per_s=16 / 14,
             train_gflop_per_step=3063.0),
        dict(base, objective="place", replicas=2, error="worker exited with code 1"),
    ]  # fmt: skip
    s = bench_train.summarize_train(results)
    (ratio,) = s["place_over_convirt_step_time"]
    assert ratio["ratio"] == 1.4 and ratio["flop_ratio"] == pytest.approx(1.427, abs=1e-3)
    (ref,) = s["vs_reference"]
    assert ref["speed_vs_pytorch"] == pytest.approx(1.87) and ref["pytorch_images_per_s"] == 0.856
    assert s["failed"][0]["replicas"] == 2


@pytest.mark.slow
def test_two_replica_place_xla_step_does_not_retrace(tmp_path):
    _run_tool(
        "train", "--quick", "--objectives", "place", "--replicas", "2", "--batch", "4",
        "--steps", "3", "--peak_gflops", "50", "--out_dir", str(tmp_path),
    )  # fmt: skip
    (r,) = json.loads((tmp_path / "train.json").read_text())["results"]
    assert r["replicas"] == 2 and r["per_replica_batch"] == 2 and len(r["devices"]) == 2
    assert r["traces_after_warmup"] == 0 and r["loss_traces_after_warmup"] == 0


@pytest.mark.slow
def test_serve_subcommand_writes_latency_by_batch(tmp_path):
    _run_tool("serve", "--quick", "--out_dir", str(tmp_path))
    doc = json.loads((tmp_path / "serve.json").read_text())
    _check_common(doc, "serve")
    for k in results.SERVE_KEYS:
        assert k in doc, k
    assert [b["batch"] for b in doc["by_batch"]] == [1, 4]
    for b in doc["by_batch"]:
        assert b["latency_ms_min"] <= b["latency_ms_median"] <= b["latency_ms_max"]
        assert b["images_per_s"] == pytest.approx(b["batch"] * 1e3 / b["latency_ms_median"], 0.02)
