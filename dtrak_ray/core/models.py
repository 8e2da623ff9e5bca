"""Building the noise-prediction UNet from a config, and preparing it for per-sample gradients."""

from __future__ import annotations

from typing import Any

import torch
from diffusers import UNet2DModel
from diffusers.models.attention_processor import Attention, AttnProcessor


def unet_kwargs(
    sample_size: int,
    channels: int,
    block_out_channels: tuple[int, ...],
    layers_per_block: int,
    attention_levels: tuple[int, ...],
    norm_num_groups: int,
    dropout: float,
    resnet_time_scale_shift: str,
) -> dict[str, Any]:
    """Constructor arguments of a diffusers UNet2DModel in the google/ddpm-cifar10-32 style."""
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
