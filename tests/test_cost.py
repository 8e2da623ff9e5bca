"""The cost estimator: its counting and arithmetic against hand computations, a real measurement, and the CLI gate."""

from __future__ import annotations

import math

import pytest
import yaml
from typer.testing import CliRunner

from dtrak_ray.cli import app
from dtrak_ray.config import parse_config
from dtrak_ray.core.models import build_unet, count_parameters
from dtrak_ray.cost import PAPER_CIFAR2_MODEL, Timing, estimate, measure, paper_cifar2, probe_batch, workload_of
from tests.conftest import TINY_MODEL, tiny_config_dict
from tests.ray.test_counterfactual import off_sections


def _raw() -> dict:
    raw = tiny_config_dict("cost") | off_sections()
    raw["counterfactual"] = {"n_images": 2, "top_k": 6, "methods": ["random", "l_simple", "l_square"]}
    return raw


def test_config_workload_and_hours_by_hand():
    cfg = parse_config(_raw())
    w = workload_of(cfg, n_train=40, n_val=8, n_params=1000)
    # 6 subsets x 1 seed of 20 images at batch 16 for 2 epochs: 2 * ceil(20/16) = 4 steps each.
    assert (w.models, w.steps_per_model) == (6, 4)
    # Counterfactual: 2 images x 3 methods, each on 40 - 6 = 34 images: 2 * ceil(34/16) = 6 steps.
    assert (w.counterfactual_models, w.counterfactual_steps_per_model) == (6, 6)
    assert w.train_steps == 6 * 4 + 6 * 6 == 60
    # Outputs: 6 models x 4 timesteps x 1 noise seed x (8 val + 8 gen).
    assert w.forward_passes == 6 * 4 * 1 * 16 == 384
    est = estimate(w, Timing("cpu", seconds_per_step=0.5, seconds_per_forward=0.01, probe_batch=16), workers=2)
    assert est.train_hours == pytest.approx(60 * 0.5 / 3600)
    assert est.output_hours == pytest.approx(384 * 0.01 / 3600)
    assert est.device_hours == pytest.approx(33.84 / 3600)
    assert est.wall_hours == pytest.approx(33.84 / 3600 / 2)
    with pytest.raises(ValueError, match="workers"):
        estimate(w, est.timing, workers=0)


def test_paper_cifar2_by_hand():
    w = paper_cifar2()
    assert (w.models, w.steps_per_model, w.batch_size) == (192, 4000, 128)
    assert w.train_steps == 768_000
    assert w.forward_passes == 192 * 1000 * 3 * 2000 == 1_152_000_000
    est = estimate(w, Timing("cuda", seconds_per_step=0.25, seconds_per_forward=1e-3, probe_batch=128), workers=8)
    # 768000 * 0.25 s = 192000 s of training; 1.152e9 * 1e-3 s = 1.152e6 s of outputs.
    assert est.device_hours == pytest.approx((192_000 + 1_152_000) / 3600) == pytest.approx(373.333, rel=1e-5)
    assert est.wall_hours == pytest.approx(373.333 / 8, rel=1e-5)
    assert count_parameters(build_unet(0, **PAPER_CIFAR2_MODEL)) == 38_306_691  # SPEC.md: 38.3M


def test_measurement_is_real_and_scaled():
    model = build_unet(0, **TINY_MODEL)
    t = measure(model, batch_size=8, device="cpu", steps=2, threads=1)
    assert t.probe_batch == 8 and t.device == "cpu"
    assert 0 < t.seconds_per_forward < t.seconds_per_step < 60 and math.isfinite(t.seconds_per_step)
    assert probe_batch(128, 38_306_691, "cpu") == 1 and probe_batch(128, 38_306_691, "cuda") == 128
    assert probe_batch(64, 177_441, "cpu") == 64


def test_cli_estimate_and_run_gate(tmp_path):
    config = tmp_path / "cost.yaml"
    config.write_text(yaml.safe_dump(_raw()))
    runner = CliRunner()
    res = runner.invoke(app, ["estimate", str(config), "--no-paper"])
    assert res.exit_code == 0, res.output
    assert "device-hours" in res.output and "models to train" in res.output
    # Not a terminal and no --yes: refused with a message naming --yes, before anything is started.
    store = tmp_path / "store"
    res = runner.invoke(app, ["run", str(config), "--store", str(store), "--no-paper"])
    assert res.exit_code == 2 and "--yes" in res.output
    assert not (store / "cost").exists()


def test_sd_lora_estimate_times_the_pretrained_unet_or_stands_in_for_it(tmp_path):
    """ArtBench's estimate: LoRA-only parameters; the pretrained UNet where it is, its architecture where not."""
    from pathlib import Path

    from dtrak_ray.config import load_config
    from dtrak_ray.core.sd import lora_parameter_count, write_tiny_sd
    from dtrak_ray.cost import estimate_config, timed_model
    from tests.ray.test_settings_smoke import smoke_overrides

    config = Path(__file__).resolve().parents[1] / "jobs" / "configs" / "artbench2.yaml"
    tiny = write_tiny_sd(tmp_path / "tiny-sd", image_size=16)
    sd_lines = [line.replace("TINY_SD", str(tiny)) for line in smoke_overrides(config, "smoke-sd")]
    cfg = load_config(config, [*smoke_overrides(config), *sd_lines, "data.n_train=16", "data.n_val=4"])
    (est,) = estimate_config(cfg, paper=False)
    model, note = timed_model(cfg)
    lora = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert note == f"UNet of {tiny}" and 0 < lora < sum(p.numel() for p in model.parameters())
    assert est.workload.n_params == lora  # features and steps are over the adapters only
    assert est.workload.models == 4 and est.timing.seconds_per_step > 0 and est.device_hours > 0
    # No pretrained folder: the architecture stands in with random weights (a tiny one here; the
    # default is miniSD's), named in the table's caption.
    absent = cfg.model_copy(update={"model": cfg.model.model_copy(update={"pretrained": str(tmp_path / "no-such-sd")})})
    arch = dict(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(8, 16),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=16, attention_head_dim=4, norm_num_groups=4,
    )
    model, note = timed_model(absent, stand_in=arch)
    assert "no-such-sd not here" in note and "random weights" in note
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == lora_parameter_count(arch, cfg.model.lora_rank)
    t = measure(model, batch_size=4, device="cpu", steps=1, threads=1)
    assert t.seconds_per_step > 0 and t.seconds_per_forward > 0
