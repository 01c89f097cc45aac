"""Mixup and Remix blocks: the Remix label rule at its boundaries, reproducible Beta draws, mixing."""
import numpy as np
import pytest
import torch
from scipy import stats

from baselines.mixup import (mix_inputs, mixup_label_weights, remix_label_weights,
                             sample_lambda)
from benchmark.errors import UserError


def weight(lam, n_a, n_b, kappa=3.0, tau=0.5):
    return remix_label_weights(lam, torch.tensor([n_a]), torch.tensor([n_b]), kappa, tau).item()


@pytest.mark.parametrize("n_a, n_b, lam, expected", [
    # a is the majority by exactly kappa, by more, and by just less.
    (300, 100, 0.3, 0.0),
    (5000, 50, 0.3, 0.0),
    (299, 100, 0.3, 0.3),
    # the same pairs when a's image dominates the mix: plain mixup.
    (300, 100, 0.7, 0.7),
    (5000, 50, 0.9, 0.9),
    # lam exactly at tau is not below it; just below is.
    (300, 100, 0.5, 0.5),
    (300, 100, 0.4999, 0.0),
    (300, 100, 0.5001, 0.5001),
    # a is the minority by exactly 1 / kappa, by more, and by just less.
    (100, 300, 0.7, 1.0),
    (50, 5000, 0.6, 1.0),
    (101, 300, 0.7, 0.7),
    # 1 - lam exactly at tau keeps lam; just under moves the label to a.
    (100, 300, 0.5, 0.5),
    (100, 300, 0.5001, 1.0),
    (100, 300, 0.4999, 0.4999),
    (100, 300, 0.2, 0.2),
    # equal counts never trigger either rule.
    (500, 500, 0.1, 0.1),
    (500, 500, 0.9, 0.9),
])
def test_remix_rule_at_its_boundaries(n_a, n_b, lam, expected):
    # float32 weights: 0 and 1 exactly, lam to float32 precision.
    assert weight(lam, n_a, n_b) == pytest.approx(expected, abs=1e-6)


def test_remix_other_kappa_and_tau_and_batch_shape():
    counts_a = torch.tensor([10, 25, 4, 10])
    counts_b = torch.tensor([4, 10, 10, 10])
    # kappa 2.5: 10/4 and 25/10 sit exactly on it, 4/10 exactly on 1 / kappa; with tau 0.6
    # both lam tests hold for lam in (0.4, 0.6).
    both = remix_label_weights(0.55, counts_a, counts_b, kappa=2.5, tau=0.6)
    assert both.dtype == torch.float32 and both.shape == (4,)
    assert both.tolist() == [0.0, 0.0, 1.0, pytest.approx(0.55)]
    assert remix_label_weights(0.35, counts_a, counts_b, kappa=2.5, tau=0.6).tolist() == \
        [0.0, 0.0, pytest.approx(0.35), pytest.approx(0.35)]
    assert remix_label_weights(0.65, counts_a, counts_b, kappa=2.5, tau=0.6).tolist() == \
        [pytest.approx(0.65), pytest.approx(0.65), 1.0, pytest.approx(0.65)]


def test_remix_with_kappa_one_gives_rule_zero_precedence_like_the_paper():
    # Equal counts satisfy both ratio tests when kappa == 1; tau 0.6 lets both lam tests hold.
    assert weight(0.5, 7, 7, kappa=1.0, tau=0.6) == 0.0


@pytest.mark.parametrize("kappa, tau", [(0.5, 0.5), (float("nan"), 0.5), (3.0, 1.5)])
def test_remix_refuses_bad_parameters(kappa, tau):
    with pytest.raises(UserError):
        remix_label_weights(0.3, torch.tensor([3]), torch.tensor([1]), kappa, tau)


def test_mixup_weights_are_lam_everywhere():
    weights = mixup_label_weights(0.3, 5)
    assert weights.dtype == torch.float32 and weights.tolist() == [pytest.approx(0.3)] * 5


def test_sample_lambda_is_reproducible_and_leaves_the_global_rng_alone():
    before = torch.random.get_rng_state()
    first = [sample_lambda(1.0, torch.Generator().manual_seed(7)) for _ in range(3)]
    generator = torch.Generator().manual_seed(7)
    sequence = [sample_lambda(0.4, generator) for _ in range(5)]
    generator.manual_seed(7)
    assert [sample_lambda(0.4, generator) for _ in range(5)] == sequence
    assert first[0] == first[1] == first[2]
    assert len(set(sequence)) == 5
    assert sample_lambda(1.0, torch.Generator().manual_seed(8)) != first[0]
    assert torch.equal(torch.random.get_rng_state(), before)


@pytest.mark.parametrize("alpha", [0.2, 1.0, 2.0])
def test_sample_lambda_follows_beta(alpha):
    generator = torch.Generator().manual_seed(0)
    draws = np.array([sample_lambda(alpha, generator) for _ in range(2000)])
    assert draws.min() >= 0.0 and draws.max() <= 1.0
    assert stats.kstest(draws, stats.beta(alpha, alpha).cdf).pvalue > 0.01
    # Beta(a, a) has mean 1/2 and variance 1 / (4 (2a + 1)).
    assert abs(draws.mean() - 0.5) < 0.03
    assert draws.var() == pytest.approx(1 / (4 * (2 * alpha + 1)), rel=0.1)


def test_sample_lambda_with_tiny_alpha_stays_finite_and_symmetric():
    # Beta(0.02, 0.02) puts most of its mass within 1e-10 of 0 or 1: the log-space ratio copes.
    # (No KS test here: near 1 the draws round to exactly 1.0 in float64, numpy's too.)
    generator = torch.Generator().manual_seed(0)
    draws = np.array([sample_lambda(0.02, generator) for _ in range(2000)])
    assert np.isfinite(draws).all() and draws.min() >= 0.0 and draws.max() <= 1.0
    assert abs((draws < 0.5).mean() - 0.5) < 0.04
    assert draws.var() == pytest.approx(1 / (4 * 1.04), rel=0.05)


def test_sample_lambda_mean_for_alpha_one():
    generator = torch.Generator().manual_seed(1)
    draws = [sample_lambda(1.0, generator) for _ in range(5000)]
    assert abs(np.mean(draws) - 0.5) < 0.015  # 3.7 standard errors of a uniform mean


@pytest.mark.parametrize("alpha", [0.0, -1.0, float("inf")])
def test_sample_lambda_refuses_non_positive_alpha(alpha):
    with pytest.raises(UserError):
        sample_lambda(alpha, torch.Generator().manual_seed(0))


def test_mix_inputs():
    x = torch.arange(24, dtype=torch.float32).reshape(4, 2, 3)
    perm = torch.tensor([2, 0, 3, 1])
    mixed = mix_inputs(x, perm, 0.3)
    assert torch.allclose(mixed, 0.3 * x + 0.7 * x[perm])
    assert torch.equal(mix_inputs(x, perm, 1.0), x)
    assert torch.equal(mix_inputs(x, perm, 0.0), x[perm])
    with pytest.raises(TypeError):
        mix_inputs(x.to(torch.uint8), perm, 0.3)
