"""Building the noise-prediction UNet from a config, the paper's UNet layouts, and parameter counts.

``build_unet(seed, **model_config)`` builds a diffusers ``UNet2DModel`` in the google/ddpm-cifar10-32
style. :data:`PAPER_UNETS` holds the paper's two layouts (SPEC.md section 4):

| name | channels per level | attention | time embedding | parameters |
|---|---|---|---|---|
| cifar | 128, 256, 256, 256 (2 resnets per level) | level 1 | scale_shift | 38.3M |
| celeba | 128, 128, 256, 256, 512, 512 | level 4 (the 5th) | scale_shift | 118.8M |

:func:`count_on_meta` counts a model's parameters on the ``meta`` device: shapes only, no memory
for weights, so a 118.8M model is counted in well under a second.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from diffusers import UNet2DModel
from diffusers.models.attention_processor import Attention, AttnProcessor

# Model-config fields that do not describe a UNet2DModel (they select Stable Diffusion + LoRA instead).
_NON_UNET_FIELDS = ("kind", "lora_rank", "pretrained")

PAPER_UNETS: dict[str, dict[str, Any]] = {
    "cifar": dict(
        sample_size=32, channels=3, block_out_channels=(128, 256, 256, 256), layers_per_block=2, attention_levels=(1,),
        norm_num_groups=32, dropout=0.1, resnet_time_scale_shift="scale_shift",
    ),
    "celeba": dict(
        sample_size=64, channels=3, block_out_channels=(128, 128, 256, 256, 512, 512), layers_per_block=2, attention_levels=(4,),
        norm_num_groups=32, dropout=0.1, resnet_time_scale_shift="scale_shift",
    ),
}
# Parameter counts the paper reports (SPEC.md section 4), in millions.
PAPER_PARAMETERS_M = {"cifar": 38.3, "celeba": 118.8}


def unet_kwargs(
    sample_size: int,
    channels: int,
    block_out_channels: tuple[int, ...],
    layers_per_block: int,
    attention_levels: tuple[int, ...],
    norm_num_groups: int,
    dropout: float,
    resnet_time_scale_shift: str,
    **other: Any,
) -> dict[str, Any]:
    """Constructor arguments of a diffusers UNet2DModel in the google/ddpm-cifar10-32 style.

    ``other`` may hold the model config's Stable Diffusion fields (kind, lora_rank, pretrained);
    they must describe a plain UNet (kind "unet"), anything else is refused.
    """
    unknown = sorted(set(other) - set(_NON_UNET_FIELDS))
    if unknown:
        raise TypeError(f"unet_kwargs got unknown arguments {unknown}")
    if other.get("kind", "unet") != "unet":
        raise ValueError(f"model.kind={other['kind']!r} is not a UNet2DModel: build it with dtrak_ray.core.sd")
    down = tuple("AttnDownBlock2D" if i in attention_levels else "DownBlock2D" for i in range(len(block_out_channels)))
    up = tuple(
        "AttnUpBlock2D" if i in attention_levels else "UpBlock2D" for i in reversed(range(len(block_out_channels)))
    )
    return dict(
        sample_size=sample_size,
        in_channels=channels,
        out_channels=channels,
        block_out_channels=tuple(block_out_channels),
        layers_per_block=layers_per_block,
        down_block_types=down,
        up_block_types=up,
        norm_num_groups=norm_num_groups,
        dropout=dropout,
        resnet_time_scale_shift=resnet_time_scale_shift,
    )


def build_unet(seed: int, **kwargs: Any) -> UNet2DModel:
    """A freshly initialised UNet2DModel; initialisation is seeded explicitly."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = UNet2DModel(**unet_kwargs(**kwargs))
    return use_plain_attention(model)


def use_plain_attention(model: torch.nn.Module) -> torch.nn.Module:
    """Swap fused attention for the plain processor: vmap over fused attention takes a slow path."""
    for module in model.modules():
        if isinstance(module, Attention):
            module.set_processor(AttnProcessor())
    return model


def count_parameters(model: torch.nn.Module, trainable_only: bool = True) -> int:
    """Number of (trainable) parameters."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)


def count_on_meta(build: Callable[[], torch.nn.Module], trainable_only: bool = True) -> int:
    """Parameters of the model ``build()`` makes, built on the meta device (no weight memory)."""
    with torch.device("meta"):
        model = build()
    return count_parameters(model, trainable_only)


def paper_unet_parameters(name: str) -> int:
    """Parameter count of the paper's UNet layout ``name`` (``cifar`` or ``celeba``), without weights."""
    if name not in PAPER_UNETS:
        raise ValueError(f"unknown paper UNet {name!r}: choose one of {sorted(PAPER_UNETS)}")
    return count_on_meta(lambda: UNet2DModel(**unet_kwargs(**PAPER_UNETS[name])))
