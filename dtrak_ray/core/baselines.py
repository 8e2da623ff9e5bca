"""The paper's baselines (SPEC.md section 5) as pure functions: no Ray, no storage.

Every score follows the D-TRAK convention: tau[i, n] is large when train sample n helps test sample
i (lowers its loss), and the LDS prediction for a subset S is -sum_{n in S} tau[i, n].

| baseline | score tau(x)_n | here |
|---|---|---|
| raw pixels dot / cosine | <x, x^n>, cos(x, x^n) on flattened pixels | :func:`dot_scores` on :func:`pixel_features` |
| gradient dot / cosine | <g(x), g(x^n)>, cos | :func:`dot_scores` on TRAK's projected L_Simple gradients |
| TracIn | sum_c eta_c <g_c(x), g_c(x^n)> over checkpoints c | :func:`tracin_scores` |
| GAS | sum_c eta_c cos(g_c(x), g_c(x^n)) (TracIn renormalized) | :func:`tracin_scores` with ``cosine=True`` |
| relative IF | phi^T H^-1 phi_n / sqrt(phi_n^T H^-1 phi_n), H = Phi^T Phi + lam I | D-TRAK scores x :func:`relative_scale` |
| renormalized IF | phi^T H^-1 phi_n / ||phi_n|| | D-TRAK scores x :func:`renormalized_scale` |
| Journey-TRAK | TRAK scores with test features averaged along the DDIM trajectory | :func:`ddim_trajectory`, :func:`journey_gradients` |
| empirical influence | -(E[y | n in S] - E[y | n not in S]) over subsets | :func:`empirical_influence` |
| datamodels | -w, w from ridge regression y ~ 1_S (RidgeCV) | :func:`fit_datamodels` |

Empirical influence and datamodels are fitted on the LDS subset models themselves, so their LDS is
cross-fitted: :func:`crossfit_predictions` splits the subsets into folds and predicts each fold
with a model fitted on the other folds (fitting and evaluating on the same subsets would be unfair).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
from diffusers import DDPMScheduler
from torch.func import functional_call, grad, vmap

from dtrak_ray.core.diffusion import keyed_noise, make_ddim

_TINY = 1e-12  # guards divisions by a zero norm (an all-zero row scores 0, not nan)


# ---- lambda-free similarity baselines ---------------------------------------------------------
def pixel_features(images: np.ndarray) -> np.ndarray:
    """(n, d) float64 flattened pixels of (n, C, H, W) images."""
    images = np.asarray(images)
    return images.reshape(images.shape[0], -1).astype(np.float64)


def normalize_rows(x: np.ndarray) -> np.ndarray:
    """Rows scaled to unit Euclidean norm (zero rows stay zero)."""
    x = np.asarray(x, dtype=np.float64)
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), _TINY)


def dot_scores(test: np.ndarray, train: np.ndarray, cosine: bool = False) -> np.ndarray:
    """(m, N) <test_i, train_n>, or their cosine similarity."""
    test = np.asarray(test, dtype=np.float64)
    train = np.asarray(train, dtype=np.float64)
    if test.ndim != 2 or train.ndim != 2 or test.shape[1] != train.shape[1]:
        raise ValueError(f"test {test.shape} and train {train.shape}: expected (m, d) and (N, d)")
    if cosine:
        test, train = normalize_rows(test), normalize_rows(train)
    return test @ train.T


def tracin_scores(tests: Sequence[np.ndarray], trains: Sequence[np.ndarray], weights: Sequence[float], cosine: bool = False) -> np.ndarray:
    """(m, N) TracIn: sum_c weights[c] <tests[c]_i, trains[c]_n>; GAS with ``cosine=True``.

    ``tests[c]`` (m, d) and ``trains[c]`` (N, d) are the loss gradients at checkpoint c; ``weights[c]``
    is the learning rate there (TracIn-CP, Pruthi et al. 2020; GAS, Hammoudeh & Lowd 2022).
    """
    if not (len(tests) == len(trains) == len(weights)) or not tests:
        raise ValueError(f"tests, trains, weights: expected the same number (>= 1) of checkpoints, got {len(tests)}, {len(trains)}, {len(weights)}")
    return sum(float(w) * dot_scores(te, tr, cosine) for te, tr, w in zip(tests, trains, weights, strict=True))


def cosine_lr(step: int, total: int, warmup: int, base_lr: float) -> float:
    """Learning rate after ``step`` optimizer steps of diffusers' cosine schedule with linear warmup."""
    if step < warmup:
        return base_lr * step / max(1, warmup)
    progress = (step - warmup) / max(1, total - warmup)
    return base_lr * max(0.0, 0.5 * (1.0 + math.cos(math.pi * progress)))


def interval_lrs(steps: Sequence[int], total: int, warmup: int, base_lr: float) -> list[float]:
    """TracIn's checkpoint weights: the mean learning rate over the steps since the previous checkpoint.

    TracIn approximates sum_t lr_t <g_t(x), g_t(x^n)> over training steps by checkpoints; checkpoint c
    stands for the steps (steps[c-1], steps[c]], so its weight is their mean learning rate (the rate
    at the checkpoint itself is 0 at the end of a cosine schedule).
    """
    out, prev = [], 0
    for step in steps:
        span = range(prev, max(step, prev + 1))
        out.append(float(np.mean([cosine_lr(s, total, warmup, base_lr) for s in span])))
        prev = step
    return out


# ---- influence-function renormalizations (applied to D-TRAK-form scores) -----------------------
def relative_scale(self_influence: np.ndarray) -> np.ndarray:
    """(L, n) column factors of relative IF (Barshan et al. 2020): 1 / sqrt(phi_n^T H^-1 phi_n)."""
    return 1.0 / np.sqrt(np.maximum(np.asarray(self_influence, dtype=np.float64), _TINY))


def renormalized_scale(train: np.ndarray) -> np.ndarray:
    """(n,) column factors of renormalized IF (Hammoudeh & Lowd 2022): 1 / ||phi_n||."""
    return 1.0 / np.maximum(np.linalg.norm(np.asarray(train, dtype=np.float64), axis=1), _TINY)


# ---- baselines fitted on the LDS subset models ---------------------------------------------------
def empirical_influence(masks: np.ndarray, outputs: np.ndarray) -> np.ndarray:
    """(m, N) -(mean output over subsets with n - mean over subsets without n), per test sample.

    Args:
        masks: (M, N) subset membership.
        outputs: (M, m) loss of each subset's model on each test sample.
    A train sample that is in every subset or in none has no contrast: its score is 0.
    """
    masks = np.asarray(masks, dtype=np.float64)
    outputs = np.asarray(outputs, dtype=np.float64)
    n_in = masks.sum(0)
    n_out = masks.shape[0] - n_in
    mean_in = (masks.T @ outputs) / np.maximum(n_in, 1)[:, None]  # (N, m)
    mean_out = ((1 - masks).T @ outputs) / np.maximum(n_out, 1)[:, None]
    tau = -(mean_in - mean_out).T
    tau[:, (n_in == 0) | (n_out == 0)] = 0.0
    return tau


def fit_datamodels(masks: np.ndarray, outputs: np.ndarray, alphas: Sequence[float]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Linear datamodels (Ilyas et al. 2022): ridge regression of each test sample's output on 1_S.

    scikit-learn's RidgeCV picks alpha per test sample by efficient leave-one-subset-out
    cross-validation over ``alphas``; an intercept is fitted (not penalized).

    Returns:
        tau (m, N) = -weights (a positive weight raises the loss, so the sample hurts), intercepts (m,),
        and the chosen alpha of each test sample (m,).
    """
    from sklearn.linear_model import RidgeCV

    x = np.asarray(masks, dtype=np.float64)
    y = np.asarray(outputs, dtype=np.float64)
    model = RidgeCV(alphas=np.asarray(alphas, dtype=np.float64), fit_intercept=True, alpha_per_target=True).fit(x, y)
    coef = np.atleast_2d(model.coef_)
    return -coef, np.atleast_1d(model.intercept_), np.broadcast_to(np.asarray(model.alpha_, dtype=np.float64), (y.shape[1],)).copy()


def subset_folds(n_subsets: int, n_folds: int, seed: int) -> np.ndarray:
    """(M,) fold of each subset: a seeded permutation cut into ``n_folds`` near-equal parts."""
    if not 2 <= n_folds <= n_subsets:
        raise ValueError(f"folds: expected 2 <= folds <= M = {n_subsets}, got {n_folds}")
    fold = np.empty(n_subsets, dtype=np.int64)
    fold[np.random.default_rng(seed).permutation(n_subsets)] = np.arange(n_subsets) % n_folds
    return fold


def crossfit_predictions(
    masks: np.ndarray, outputs: np.ndarray, method: str, folds: np.ndarray, alphas: Sequence[float] = (1.0,)
) -> np.ndarray:
    """(M, m) LDS predictions of subsets, each from a model fitted on the subsets of the other folds.

    ``method`` is "empirical-influence" or "datamodels". The prediction for subset j is
    -sum_{n in S_j} tau[i, n] (the LDS convention), with tau fitted without subset j's fold.
    """
    masks = np.asarray(masks, dtype=np.float64)
    outputs = np.asarray(outputs, dtype=np.float64)
    pred = np.empty_like(outputs)
    for fold in np.unique(folds):
        fit, held = folds != fold, folds == fold
        if method == "empirical-influence":
            tau = empirical_influence(masks[fit], outputs[fit])
        elif method == "datamodels":
            tau = fit_datamodels(masks[fit], outputs[fit], alphas)[0]
        else:
            raise ValueError(f"method: expected empirical-influence or datamodels, got {method!r}")
        pred[held] = -(masks[held] @ tau.T)
    return pred


# ---- Journey-TRAK: gradients along the sampling trajectory ---------------------------------------
@torch.no_grad()
def ddim_trajectory(
    model: torch.nn.Module, ddpm: DDPMScheduler, shape: tuple[int, int, int], indices: list[int], seed: int, steps: int = 50, eta: float = 0.0
) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
    """DDIM sampling exactly as :func:`dtrak_ray.core.sampling.ddim_sample` (same keyed start noise),
    recording the trajectory.

    Returns:
        the final images (n, C, H, W), clamped to [-1, 1] like the Gen set; the noisy inputs of every
        step (steps, n, C, H, W); and the timestep of every step.
    """
    model.eval()
    sched = make_ddim(ddpm)
    sched.set_timesteps(steps)
    x = keyed_noise(shape, seed, -1, indices)
    xs, ts = [], []
    for t in sched.timesteps:
        xs.append(x)
        ts.append(int(t))
        eps = model(x, t.expand(x.shape[0])).sample
        x = sched.step(eps, t, x, eta=eta).prev_sample
    return x.clamp(-1, 1), torch.stack(xs), ts


def journey_noise(x_t: torch.Tensor, x0: torch.Tensor, alpha_bar: float) -> torch.Tensor:
    """The noise that takes x0 to x_t: eps = (x_t - sqrt(abar) x0) / sqrt(1 - abar)."""
    return (x_t - math.sqrt(alpha_bar) * x0) / math.sqrt(1.0 - alpha_bar)


def journey_steps(n_steps: int, K: int) -> list[int]:
    """K step positions spread evenly over a trajectory of ``n_steps`` (all of them when K >= n_steps)."""
    if K >= n_steps:
        return list(range(n_steps))
    return sorted({int(round(v)) for v in np.linspace(0, n_steps - 1, K)})


def journey_gradients(
    model: torch.nn.Module,
    ddpm: DDPMScheduler,
    x0: torch.Tensor,
    trajectory: torch.Tensor,
    timesteps: Sequence[int],
    param_names: Sequence[str] | None = None,
) -> torch.Tensor:
    """(n, p) Journey-TRAK gradients: grad_theta of L_Simple at each recorded step, averaged over steps.

    At step s the model sees the trajectory's noisy sample x_s at timestep t_s; its target is the
    noise that links the final sample x0 to x_s (:func:`journey_noise`), so the loss is the training
    loss of x0 evaluated on the sampling path instead of at fresh noise (Georgiev et al. 2023, as the
    D-TRAK paper uses it for Gen samples).

    Args:
        model: the noise predictor (put in eval mode).
        x0: (n, C, H, W) the generated samples.
        trajectory: (S, n, C, H, W) the noisy samples at the chosen steps.
        timesteps: the S timesteps.
        param_names: the parameters differentiated (default: every trainable one), in this order.
    """
    model.eval()
    named = dict(model.named_parameters())
    names = list(param_names) if param_names is not None else [n for n, p in named.items() if p.requires_grad]
    params = {n: named[n].detach() for n in names}
    frozen = {n: p.detach() for n, p in named.items() if n not in params}
    buffers = {n: b.detach() for n, b in model.named_buffers()}
    abar = ddpm.alphas_cumprod

    def loss(p: dict[str, torch.Tensor], xt: torch.Tensor, eps: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        out = functional_call(model, ({**p, **frozen}, buffers), (xt[None], t[None])).sample[0]
        return ((out - eps) ** 2).mean()

    per_sample = vmap(grad(loss), in_dims=(None, 0, 0, None))
    total = torch.zeros(x0.shape[0], sum(params[n].numel() for n in names), dtype=torch.float64)
    for xs, t in zip(trajectory, timesteps, strict=True):
        eps = journey_noise(xs, x0, float(abar[t]))
        g = per_sample(params, xs, eps, torch.tensor(t))
        total += torch.cat([g[n].reshape(x0.shape[0], -1) for n in names], dim=1).double()
    return (total / len(timesteps)).float()
