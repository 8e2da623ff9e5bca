"""Every paper setting through the whole pipeline, scaled down by the config's own "# smoke:" lines.

Each jobs/configs/{setting}.yaml documents the ``--set`` overrides that shrink it to a smoke run
(tiny UNet, a few 8 px images, one epoch, CPU). This module applies exactly those lines, points
``data.path`` at a small dataset written in the setting's real format (CIFAR-10 python pickles,
CelebA JPEGs + partition file, ArtBench's train/test style folders), and runs
:func:`dtrak_ray.pipeline.run_pipeline` end to end on one local Ray instance.
"""

from __future__ import annotations

import io
import math
from pathlib import Path

import numpy as np
import pytest
from rich.console import Console

from dtrak_ray.config import load_config
from dtrak_ray.datasets.artbench import STYLES
from dtrak_ray.datasets.celeba import write_celeba
from dtrak_ray.datasets.cifar import write_cifar_batches
from dtrak_ray.datasets.folder import write_folder
from dtrak_ray.pipeline import run_pipeline

pytestmark = pytest.mark.slow

CONFIGS = Path(__file__).resolve().parents[2] / "jobs" / "configs"


def smoke_overrides(config: Path, tag: str = "smoke") -> list[str]:
    """The ``# {tag}: key=value`` lines of a config, as --set overrides."""
    prefix = f"# {tag}:"
    return [line.split(prefix, 1)[1].strip() for line in config.read_text().splitlines() if line.startswith(prefix)]


def _blobs(rng: np.random.Generator, n: int, h: int, w: int, labels: np.ndarray) -> np.ndarray:
    """(n, h, w, 3) uint8 images whose mean colour depends on the class, plus noise: learnable, not constant."""
    base = (np.array([[40, 200, 90], [210, 60, 30], [20, 90, 220], [150, 150, 20], [90, 20, 160]])[labels % 5]).astype(np.float64)
    img = base[:, None, None, :] + rng.normal(0, 30, size=(n, h, w, 3))
    return np.clip(img, 0, 255).astype(np.uint8)


def write_cifar(root: Path, rng: np.random.Generator) -> None:
    per_train, per_test = 10, 2
    labels = np.concatenate([np.repeat(np.arange(10), per_train), np.repeat(np.arange(10), per_test)])
    imgs = _blobs(rng, len(labels), 32, 32, labels).transpose(0, 3, 1, 2)
    write_cifar_batches(root, np.ascontiguousarray(imgs), labels, n_test=10 * per_test)


def write_celeba_files(root: Path, rng: np.random.Generator) -> None:
    parts = np.array([0] * 20 + [1] * 2 + [2] * 6)
    write_celeba(root, _blobs(rng, len(parts), 218, 178, np.zeros(len(parts), dtype=np.int64)), parts)


def write_artbench(root: Path, rng: np.random.Generator, n_styles: int) -> None:
    styles = list(STYLES)
    labels = np.array([styles.index(s) for s in ("post_impressionism", "ukiyo_e", "romanticism", "renaissance", "baroque")[:n_styles]])
    per_train, per_test = 8, 2
    y = np.concatenate([np.repeat(labels, per_train), np.repeat(labels, per_test)])
    pool = np.array([0] * (len(labels) * per_train) + [1] * (len(labels) * per_test))
    write_folder(root, _blobs(rng, len(y), 256, 256, y), y, styles, pool)


SETTINGS = {
    "cifar2": write_cifar,
    "cifar10": write_cifar,
    "celeba": write_celeba_files,
    "artbench2": lambda root, rng: write_artbench(root, rng, 2),
    "artbench5": lambda root, rng: write_artbench(root, rng, 5),
}


@pytest.mark.parametrize("setting", list(SETTINGS))
def test_setting_runs_the_whole_pipeline(setting, ray_local, tmp_path):
    data = tmp_path / "data"
    SETTINGS[setting](data, np.random.default_rng(0))
    config = CONFIGS / f"{setting}.yaml"
    overrides = smoke_overrides(config)
    assert overrides, f"{config} documents no smoke overrides"
    cfg = load_config(config, [*overrides, f"name={setting}-smoke", f"data.path={data}"])
    run = run_pipeline(cfg, str(tmp_path / "store"), console=Console(file=io.StringIO()))
    n_train, n_val = cfg.data.n_train, cfg.data.n_val
    train = run.read_array(f"{run.INDICES}/train_images")
    assert train.shape == (n_train, 3, 8, 8) and run.read_array(f"{run.INDICES}/val_images").shape[0] == n_val
    summary = run.read_json(run.SUMMARY)
    methods = {(r["method"], r["test_set"]) for r in summary["lds"]}
    assert {("TRAK", "val"), ("D-TRAK", "val"), ("TRAK", "gen"), ("D-TRAK", "gen")} <= methods
    assert all(math.isfinite(r["lds_mean"]) for r in summary["lds"])


def test_artbench2_with_stable_diffusion_lora(ray_local, tmp_path):
    """ArtBench-2 on the SD + LoRA path: a tiny random SD stack, LoRA-only features, SD-pipeline Gen set."""
    from dtrak_ray.core.sd import write_tiny_sd

    data, tiny = tmp_path / "data", write_tiny_sd(tmp_path / "tiny-sd", image_size=16)
    write_artbench(data, np.random.default_rng(0), 2)
    config = CONFIGS / "artbench2.yaml"
    sd_lines = [line.replace("TINY_SD", str(tiny)) for line in smoke_overrides(config, "smoke-sd")]
    assert any("sd-lora" in line for line in sd_lines)
    cfg = load_config(config, [*smoke_overrides(config), *sd_lines, "name=artbench2-sd-smoke", f"data.path={data}"])
    assert cfg.model.kind == "sd-lora"
    run = run_pipeline(cfg, str(tmp_path / "store"), console=Console(file=io.StringIO()))
    assert run.exists("models/base/seed-0/lora.safetensors")
    gen = run.read_array(run.GEN)
    assert gen.shape == (cfg.generate.n_samples, 3, 16, 16) and np.isfinite(gen).all()
    feats = run.open_array(run.features("base", "train", "l_square", 2, "gaussian", 16))
    assert feats.shape == (cfg.data.n_train, 16) and np.abs(feats[...]).sum() > 0
    summary = run.read_json(run.SUMMARY)
    assert {("D-TRAK", "val"), ("TRAK", "gen")} <= {(r["method"], r["test_set"]) for r in summary["lds"]}
    # LoRA training checkpoints like a UNet's: a training that died after epoch 1 (its later
    # checkpoint and its final weights never written) resumes there and ends bit-identical.
    from dtrak_ray.stages import sd_lora

    cfg2 = cfg.model_copy(update={"train": cfg.train.model_copy(update={"epochs": 2, "checkpoint_every": 1})})
    key = "models/lora-resume"
    record = sd_lora.train_model(run, cfg2, key, None, 7, "r1", keep_all=True)
    assert record["status"] == "trained" and [e for e, _ in run.checkpoints(key, "r1")] == [1, 2]
    whole = run.read_bytes(f"{key}/lora.safetensors")
    run.delete(key)
    run.delete(run.checkpoints(key)[-1][1])
    record = sd_lora.train_model(run, cfg2, key, None, 7, "r1", keep_all=True)
    assert record["status"] == "resumed" and record["resumed_from_epoch"] == 1
    assert run.read_bytes(f"{key}/lora.safetensors") == whole
