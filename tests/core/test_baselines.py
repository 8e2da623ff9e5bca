"""Every baseline of dtrak_ray.core.baselines against a direct implementation on a tiny case (no Ray)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from diffusers.optimization import get_cosine_schedule_with_warmup

from dtrak_ray.core.baselines import (
    cosine_lr,
    crossfit_predictions,
    ddim_trajectory,
    dot_scores,
    empirical_influence,
    fit_datamodels,
    interval_lrs,
    journey_gradients,
    journey_noise,
    journey_steps,
    pixel_features,
    relative_scale,
    renormalized_scale,
    subset_folds,
    tracin_scores,
)
from dtrak_ray.core.diffusion import add_noise, make_scheduler
from dtrak_ray.core.lds import lds, spearman_columns
from dtrak_ray.core.models import use_plain_attention
from dtrak_ray.core.sampling import ddim_sample


def _rng(seed: int = 0) -> np.random.Generator:
    return np.random.default_rng(seed)


def test_raw_pixels_dot_and_cosine_equal_loops() -> None:
    rng = _rng()
    train, test = rng.standard_normal((7, 1, 3, 3)), rng.standard_normal((4, 1, 3, 3))
    a, b = pixel_features(test), pixel_features(train)
    assert a.shape == (4, 9)
    dot = dot_scores(a, b)
    cos = dot_scores(a, b, cosine=True)
    for i in range(4):
        for n in range(7):
            x, y = test[i].ravel(), train[n].ravel()
            assert dot[i, n] == pytest.approx(float(np.sum(x * y)), rel=1e-12)
            assert cos[i, n] == pytest.approx(float(np.sum(x * y) / np.sqrt(np.sum(x * x) * np.sum(y * y))), rel=1e-12)


def test_tracin_and_gas_equal_loops_over_checkpoints() -> None:
    rng = _rng(1)
    tests = [rng.standard_normal((3, 5)) for _ in range(3)]
    trains = [rng.standard_normal((6, 5)) for _ in range(3)]
    weights = [0.5, 0.25, 0.1]
    tracin = tracin_scores(tests, trains, weights)
    gas = tracin_scores(tests, trains, weights, cosine=True)
    for i in range(3):
        for n in range(6):
            t = sum(w * float(te[i] @ tr[n]) for te, tr, w in zip(tests, trains, weights, strict=True))
            g = sum(w * float(te[i] @ tr[n]) / (np.linalg.norm(te[i]) * np.linalg.norm(tr[n])) for te, tr, w in zip(tests, trains, weights, strict=True))
            assert tracin[i, n] == pytest.approx(t, rel=1e-12)
            assert gas[i, n] == pytest.approx(g, rel=1e-12)
    with pytest.raises(ValueError, match="same number"):
        tracin_scores(tests, trains[:2], weights)


def test_cosine_lr_matches_diffusers_schedule_and_tracin_weights_average_it() -> None:
    total, warmup, base = 40, 4, 1e-3
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=base)
    sched = get_cosine_schedule_with_warmup(opt, warmup, total)
    seen = []
    for step in range(total):
        seen.append(opt.param_groups[0]["lr"])
        assert cosine_lr(step, total, warmup, base) == pytest.approx(seen[-1], rel=1e-9, abs=1e-15)
        opt.step()
        sched.step()
    weights = interval_lrs([10, 20, 40], total, warmup, base)
    assert weights == pytest.approx([np.mean(seen[0:10]), np.mean(seen[10:20]), np.mean(seen[20:40])], rel=1e-9)


def test_influence_renormalizations_equal_direct() -> None:
    rng = _rng(2)
    phi, test = rng.standard_normal((8, 5)), rng.standard_normal((3, 5))
    lam = 0.7
    h_inv = np.linalg.inv(phi.T @ phi + lam * np.eye(5))
    self_inf = np.array([[phi[n] @ h_inv @ phi[n] for n in range(8)]])
    base = test @ h_inv @ phi.T
    relative = base * relative_scale(self_inf)[0]
    renorm = base * renormalized_scale(phi)
    for i in range(3):
        for n in range(8):
            assert relative[i, n] == pytest.approx(base[i, n] / np.sqrt(phi[n] @ h_inv @ phi[n]), rel=1e-12)
            assert renorm[i, n] == pytest.approx(base[i, n] / np.sqrt(np.sum(phi[n] ** 2)), rel=1e-12)


def _subsets(m_subsets: int = 16, n: int = 10, m: int = 3, seed: int = 3) -> tuple[np.ndarray, np.ndarray]:
    rng = _rng(seed)
    masks = rng.random((m_subsets, n)) < 0.5
    true_w = rng.standard_normal((n, m))
    outputs = masks @ true_w + 0.3 * rng.standard_normal((m_subsets, m))
    return masks, outputs


def test_empirical_influence_equals_loops() -> None:
    masks, outputs = _subsets()
    masks[:, 0] = True  # always in: no contrast, score 0
    tau = empirical_influence(masks, outputs)
    for i in range(outputs.shape[1]):
        for n in range(masks.shape[1]):
            inside = [outputs[j, i] for j in range(masks.shape[0]) if masks[j, n]]
            outside = [outputs[j, i] for j in range(masks.shape[0]) if not masks[j, n]]
            expected = 0.0 if not inside or not outside else -(np.mean(inside) - np.mean(outside))
            assert tau[i, n] == pytest.approx(expected, abs=1e-12)


def test_datamodels_equal_closed_form_ridge_with_loo_chosen_alpha() -> None:
    masks, outputs = _subsets(m_subsets=20)
    alphas = [0.01, 0.3, 3.0, 30.0]
    tau, intercept, chosen = fit_datamodels(masks, outputs, alphas)
    x = masks.astype(np.float64)
    for i in range(outputs.shape[1]):
        y = outputs[:, i]

        def ridge(xs: np.ndarray, ys: np.ndarray, a: float) -> tuple[np.ndarray, float]:
            xm, ym = xs.mean(0), ys.mean()
            w = np.linalg.solve((xs - xm).T @ (xs - xm) + a * np.eye(xs.shape[1]), (xs - xm).T @ (ys - ym))
            return w, ym - xm @ w

        # Leave-one-subset-out error of each alpha, by brute force: RidgeCV must pick the best.
        loo = []
        for a in alphas:
            errs = []
            for j in range(len(y)):
                keep = np.arange(len(y)) != j
                w, b = ridge(x[keep], y[keep], a)
                errs.append((y[j] - x[j] @ w - b) ** 2)
            loo.append(np.mean(errs))
        assert chosen[i] == alphas[int(np.argmin(loo))]
        w, b = ridge(x, y, chosen[i])
        np.testing.assert_allclose(-tau[i], w, rtol=1e-6, atol=1e-9)
        assert intercept[i] == pytest.approx(b, rel=1e-6, abs=1e-9)


@pytest.mark.parametrize("method", ["empirical-influence", "datamodels"])
def test_crossfit_predicts_each_fold_without_its_outputs(method: str) -> None:
    masks, outputs = _subsets(m_subsets=16)
    folds = subset_folds(16, 4, seed=0)
    assert sorted(np.bincount(folds).tolist()) == [4, 4, 4, 4]
    pred = crossfit_predictions(masks, outputs, method, folds, alphas=(0.1, 1.0, 10.0))
    for fold in range(4):
        held = folds == fold
        if method == "empirical-influence":
            tau = empirical_influence(masks[~held], outputs[~held])
        else:
            tau = fit_datamodels(masks[~held], outputs[~held], (0.1, 1.0, 10.0))[0]
        np.testing.assert_allclose(pred[held], -(masks[held] @ tau.T), rtol=1e-10, atol=1e-12)
        # Changing the held-out fold's outputs cannot change its own predictions (no leakage).
        poked = outputs.copy()
        poked[held] += 100.0
        again = crossfit_predictions(masks, poked, method, folds, alphas=(0.1, 1.0, 10.0))
        np.testing.assert_allclose(again[held], pred[held], rtol=1e-10, atol=1e-12)
    # The evaluate stage's LDS of predictions (identity masks) is the mean Spearman of the predictions.
    res = lds(-pred.T, np.eye(16, dtype=bool), outputs, n_resamples=4)
    assert res.mean == pytest.approx(float(np.nanmean(spearman_columns(pred, outputs))), rel=1e-12)


def test_ddim_trajectory_reproduces_the_gen_sampler(tiny_unet) -> None:
    model = use_plain_attention(tiny_unet).eval()
    sched = make_scheduler(1000, 1e-4, 0.02)
    expected = ddim_sample(model, sched, (1, 8, 8), [0, 3], seed=5, steps=6)
    final, xs, ts = ddim_trajectory(model, sched, (1, 8, 8), [0, 3], seed=5, steps=6)
    torch.testing.assert_close(final, expected, rtol=0, atol=0)
    assert xs.shape == (6, 2, 1, 8, 8) and ts == sorted(ts, reverse=True)
    assert journey_steps(6, 3) == [0, 2, 5] and journey_steps(6, 10) == list(range(6))
    # The Journey noise is the noise that takes x0 to the trajectory's x_t under the forward process.
    eps = journey_noise(xs[2], final, float(sched.alphas_cumprod[ts[2]]))
    torch.testing.assert_close(add_noise(sched, final, eps, torch.tensor([ts[2]] * 2)), xs[2], rtol=1e-4, atol=1e-4)


def test_journey_gradients_equal_autograd_loop(tiny_unet) -> None:
    model = use_plain_attention(tiny_unet).eval()
    sched = make_scheduler(1000, 1e-4, 0.02)
    final, xs, ts = ddim_trajectory(model, sched, (1, 8, 8), [1, 2, 4], seed=0, steps=5)
    steps = [0, 2, 4]
    got = journey_gradients(model, sched, final, xs[steps], [ts[s] for s in steps])
    params = list(model.parameters())
    for i in range(3):
        acc = torch.zeros(got.shape[1], dtype=torch.float64)
        for s in steps:
            abar = float(sched.alphas_cumprod[ts[s]])
            eps = (xs[s, i] - abar**0.5 * final[i]) / (1 - abar) ** 0.5
            loss = ((model(xs[s, i : i + 1], torch.tensor([ts[s]])).sample[0] - eps) ** 2).mean()
            acc += torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss, params)]).double()
        expected = acc / len(steps)
        assert float((got[i].double() - expected).abs().max() / expected.abs().max()) < 1e-5
