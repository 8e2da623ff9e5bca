"""Shared fixtures: a tiny real config, a tiny real diffusers UNet, a local Ray instance per module."""

from __future__ import annotations

import os

import pytest
import torch

from dtrak_ray.config import parse_config

TINY_MODEL = dict(
    sample_size=8, channels=1, block_out_channels=(8, 16), layers_per_block=1, attention_levels=(1,),
    norm_num_groups=4, dropout=0.1, resnet_time_scale_shift="scale_shift",
)


def tiny_config_dict(name: str = "tiny") -> dict:
    """A config that runs the whole pipeline in well under a minute on two cores."""
    return {
        "name": name,
        "seed": 7,
        "data": {"dataset": "digits-2", "classes": [3, 8], "n_val": 8, "n_train": 40},
        "model": {k: list(v) if isinstance(v, tuple) else v for k, v in TINY_MODEL.items()},
        "train": {"epochs": 2, "batch_size": 16, "lr": 1e-3},
        "generate": {"n_samples": 8, "ddim_steps": 5},
        "lds": {"num_subsets": 6, "alpha": 0.5, "seeds": 1, "output_timesteps": 4, "noise_seeds": 1, "bootstrap_resamples": 8},
        "features": {"output_functions": ["l_simple", "l_square"], "K": [2, 4], "k": 64, "micro_batch": 8, "shard_size": 16},
        "report": {"n_examples": 2, "top": 3},
        "resources": {"num_workers": 2},
    }


@pytest.fixture
def tiny_cfg():
    return parse_config(tiny_config_dict())


@pytest.fixture
def tiny_unet():
    from dtrak_ray.core.models import build_unet

    return build_unet(0, **TINY_MODEL)


@pytest.fixture(scope="module")
def ray_local():
    """One real local Ray instance for a whole test module."""
    import ray

    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()


@pytest.fixture(autouse=True)
def _one_thread():
    torch.set_num_threads(1)
