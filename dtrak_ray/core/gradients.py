"""Per-sample gradients of an output function, averaged over a timestep grid (SPEC.md section 2).

Interface:
- ``GradientComputer(model, scheduler, param_names=None)``: holds the model (eval mode) and the
  parameters to differentiate (all trainable ones by default; a subset for LoRA).
- ``averaged(x, indices, f, grids, noise_seed, scheme)`` -> ``{K: (B, p)}``: for every grid,
  g(x) = (1/K) sum_k grad_theta f(x, t_k, eps_k), computed with ``torch.func.vmap(grad(.))``. Nested
  grids (K = 10 inside K = 100) share their timesteps: each (sample, t) gradient is computed once.
- ``reference_averaged``: the same with a plain autograd loop, one sample and one timestep at a
  time; the tests compare the two.
The caller bounds memory by passing micro-batches: at most B full gradients (B x p) live at once
per grid.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Mapping, Sequence

import torch
from diffusers import DDPMScheduler
from torch.func import functional_call, grad, vmap

from dtrak_ray.core.diffusion import NoiseScheme, add_noise, elbo_weight, keyed_noise
from dtrak_ray.core.outputs import get_output_function


def select_parameters(model: torch.nn.Module, patterns: Sequence[str] | None) -> list[str] | None:
    """Names of the trainable parameters matching any of the fnmatch ``patterns`` (None: all).

    For LoRA, ``["*lora_*"]`` keeps the adapter weights only. A pattern that matches nothing is an
    error: a silent empty match would give features of dimension zero.
    """
    if patterns is None:
        return None
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    unmatched = [pat for pat in patterns if not any(fnmatch.fnmatchcase(n, pat) for n in names)]
    if unmatched:
        raise ValueError(
            f"features.parameters patterns {unmatched} match no trainable parameter of the model "
            f"(names look like {names[:2]}): fix the patterns or leave the field out to use all parameters"
        )
    return [n for n in names if any(fnmatch.fnmatchcase(n, pat) for pat in patterns)]


class GradientComputer:
    """Per-sample gradients of ``f`` with respect to the chosen parameters, flattened to (B, p)."""

    def __init__(self, model: torch.nn.Module, scheduler: DDPMScheduler, param_names: Sequence[str] | None = None):
        self.model = model.eval()  # dropout off while gradients are taken (SPEC.md)
        self.scheduler = scheduler
        named = dict(model.named_parameters())
        names = list(param_names) if param_names is not None else [n for n, p in named.items() if p.requires_grad]
        missing = [n for n in names if n not in named]
        if missing:
            raise ValueError(f"param_names not in the model: {missing[:3]}")
        self.names = names
        self.params = {n: named[n].detach() for n in names}
        self.buffers = {n: b.detach() for n, b in model.named_buffers()}
        self.frozen = {n: p.detach() for n, p in named.items() if n not in self.params}
        self.dim = sum(p.numel() for p in self.params.values())
        self.device = next(model.parameters()).device

    def _per_sample(self, f_name: str):  # noqa: ANN202 - a functorch transform
        """vmap over samples of grad of sum_g f(x_{t_g}) over a group of timesteps of one sample.

        The model is in eval mode and has no batch-coupled layers (GroupNorm, not BatchNorm), so
        the gradient of a sum over one sample's timesteps is the sum of its per-timestep gradients:
        one backward of a batch of G timesteps replaces G backwards of batch one.
        """
        f = vmap(get_output_function(f_name))
        model, frozen, buffers = self.model, self.frozen, self.buffers

        def loss(
            params: Mapping[str, torch.Tensor], xt: torch.Tensor, eps: torch.Tensor, t: torch.Tensor, w: torch.Tensor
        ) -> torch.Tensor:
            out = functional_call(model, ({**params, **frozen}, buffers), (xt, t)).sample
            return f(out, eps, w).sum()

        return vmap(grad(loss), in_dims=(None, 0, 0, None, None))

    def _flatten(self, g: Mapping[str, torch.Tensor], batch: int) -> torch.Tensor:
        return torch.cat([g[n].reshape(batch, -1) for n in self.names], dim=1)

    def averaged(
        self,
        x: torch.Tensor,
        indices: Sequence[int],
        f: str,
        grids: Mapping[int, Sequence[int]],
        noise_seed: int,
        scheme: NoiseScheme = "per-sample",
        max_rows: int = 512,
    ) -> dict[int, torch.Tensor]:
        """``{K: (B, p)}`` gradients of f averaged over each grid's timesteps.

        Timesteps are grouped by the set of grids they belong to (nested grids share work); each
        group is processed in chunks of at most ``max_rows // B`` timesteps, bounding activations.
        """
        batch = x.shape[0]
        per_sample = self._per_sample(f)
        # Running sums start as the first chunk's own tensor and are updated in place: a fresh
        # (B, p) buffer per step costs page faults comparable to the arithmetic on a CPU.
        sums: dict[int, torch.Tensor] = {}
        sets = {K: set(grid) for K, grid in grids.items()}
        groups: dict[tuple[int, ...], list[int]] = {}
        for t in sorted(set().union(*sets.values())):
            groups.setdefault(tuple(K for K in grids if t in sets[K]), []).append(t)
        chunk = max(1, max_rows // max(batch, 1))
        for Ks, ts in groups.items():
            for start in range(0, len(ts), chunk):
                part = ts[start : start + chunk]
                eps = torch.stack([keyed_noise(x.shape[1:], noise_seed, t, indices, scheme) for t in part], dim=1)
                tt = torch.tensor(part, dtype=torch.long)
                xt = add_noise(self.scheduler, x[:, None].expand_as(eps).reshape(-1, *x.shape[1:]), eps.reshape(-1, *x.shape[1:]), tt.repeat(batch))
                # Noise and x_t are drawn on the CPU (keyed, the same on every device), then moved to the model's device.
                dev = self.device
                w = elbo_weight(self.scheduler, tt)
                flat = self._flatten(per_sample(self.params, xt.view_as(eps).to(dev), eps.to(dev), tt.to(dev), w.to(dev)), batch)
                for K in Ks:
                    if K in sums:
                        sums[K] += flat
                    else:
                        sums[K] = flat if K == Ks[-1] else flat.clone()  # the last owner may keep flat itself
        return {K: sums[K].div_(len(grids[K])) for K in grids}

    def reference_averaged(
        self, x: torch.Tensor, indices: Sequence[int], f: str, grid: Sequence[int], noise_seed: int, scheme: NoiseScheme = "per-sample"
    ) -> torch.Tensor:
        """The same average with plain autograd, one (sample, timestep) at a time. Slow; for tests."""
        fn = get_output_function(f)
        params = [dict(self.model.named_parameters())[n] for n in self.names]
        rows = []
        for i, idx in enumerate(indices):
            acc = torch.zeros(self.dim, dtype=torch.float64)
            for t in grid:
                eps = keyed_noise(x.shape[1:], noise_seed, t, [idx], scheme)
                tt = torch.tensor([t])
                xt = add_noise(self.scheduler, x[i : i + 1], eps, tt)
                out = self.model(xt, tt).sample[0]
                value = fn(out, eps[0], elbo_weight(self.scheduler, tt)[0])
                gs = torch.autograd.grad(value, params)
                acc += torch.cat([g.reshape(-1) for g in gs]).double()
            rows.append(acc / len(grid))
        return torch.stack(rows)
