"""Model-output functions f(x, t, eps; theta) whose gradients make the features (SPEC.md section 2).

Each takes one sample's predicted noise ``eps_pred`` (C, H, W), the true noise ``eps`` and the ELBO
weight ``w`` at its timestep, and returns a scalar. They are written per sample so that
``torch.func.vmap(grad(...))`` gives per-sample gradients.

| name      | value                                      | paper name |
|-----------|--------------------------------------------|------------|
| l_simple  | mean_d (eps_pred - eps)^2                  | TRAK       |
| l_elbo    | w_t * l_simple                             |            |
| l_square  | mean_d eps_pred^2                          | D-TRAK     |
| l_avg     | mean_d eps_pred                            |            |
| l_1, l_2, l_inf | p-norm of flattened eps_pred (not / d) |            |
"""

from __future__ import annotations

from collections.abc import Callable

import torch

OutputFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def l_simple(eps_pred: torch.Tensor, eps: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    return ((eps_pred - eps) ** 2).mean()


def l_elbo(eps_pred: torch.Tensor, eps: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    return w * ((eps_pred - eps) ** 2).mean()


def l_square(eps_pred: torch.Tensor, eps: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    return (eps_pred**2).mean()


def l_avg(eps_pred: torch.Tensor, eps: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    return eps_pred.mean()


def l_1(eps_pred: torch.Tensor, eps: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    return eps_pred.abs().sum()


def l_2(eps_pred: torch.Tensor, eps: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    return torch.sqrt((eps_pred**2).sum())


def l_inf(eps_pred: torch.Tensor, eps: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    return eps_pred.abs().max()


OUTPUT_FUNCTIONS: dict[str, OutputFn] = {
    "l_simple": l_simple,
    "l_elbo": l_elbo,
    "l_square": l_square,
    "l_avg": l_avg,
    "l_1": l_1,
    "l_2": l_2,
    "l_inf": l_inf,
}

# How the report names a method built from each output function.
METHOD_NAMES: dict[str, str] = {
    "l_simple": "TRAK",
    "l_square": "D-TRAK",
    "l_elbo": "TRAK (L_ELBO)",
    "l_avg": "D-TRAK (L_Avg)",
    "l_1": "D-TRAK (L_1)",
    "l_2": "D-TRAK (L_2)",
    "l_inf": "D-TRAK (L_inf)",
}


def get_output_function(name: str) -> OutputFn:
    """Look up an output function by its config name."""
    try:
        return OUTPUT_FUNCTIONS[name]
    except KeyError:
        raise ValueError(f"unknown output function {name!r}: choose one of {sorted(OUTPUT_FUNCTIONS)}") from None
