"""Mixup and Remix building blocks for a training step: the mixing ratio, mixed inputs, label weights.

A step mixes each sample a of a batch with sample b = perm[a] of the same batch:
``x_mixed = lam * x_a + (1 - lam) * x_b``.  The label weights returned here are the weight of
label a, per sample; label b gets one minus it, so the loss of a sample is
``w * loss(out, y_a) + (1 - w) * loss(out, y_b)``.  Mixup (Zhang et al.) uses ``w = lam``;
Remix (Chou et al., "Remix: Rebalanced Mixup", 2020) moves the whole label to the minority
class of an unbalanced pair when the minority image is not drowned out.
"""
from __future__ import annotations

import math
import numbers

import torch

from benchmark.errors import UserError


def sample_lambda(alpha: float, generator: torch.Generator) -> float:
    """lam ~ Beta(alpha, alpha), drawn only from ``generator`` (a CPU ``torch.Generator``).

    Exact, not approximate: lam = G1 / (G1 + G2) with G1, G2 independent Gamma(alpha, 1).
    Each gamma variate comes from Marsaglia and Tsang's rejection method (2000) on
    generator-drawn standard normals and uniforms, with shape alpha + 1 and the boost
    ``Gamma(alpha) = Gamma(alpha + 1) * U ** (1 / alpha)`` when alpha < 1.  The ratio is
    formed from log-gammas, so small alphas (lam near 0 or 1) neither underflow nor give
    0 / 0.  The same generator state gives the same lam; the global RNG is never touched.
    """
    if not (isinstance(alpha, numbers.Real) and math.isfinite(alpha) and alpha > 0):
        raise UserError(f"mixup alpha must be a positive number, got {alpha!r}")
    log_g1 = log_standard_gamma(float(alpha), generator)
    log_g2 = log_standard_gamma(float(alpha), generator)
    difference = log_g1 - log_g2  # lam = sigmoid(difference), computed without overflow
    if difference >= 0:
        return 1.0 / (1.0 + math.exp(-difference))
    odds = math.exp(difference)
    return odds / (1.0 + odds)


def log_standard_gamma(shape: float, generator: torch.Generator) -> float:
    """log of one Gamma(shape, 1) variate (Marsaglia-Tsang, boosted below shape 1)."""
    boosted = shape < 1.0
    d = (shape + 1.0 if boosted else shape) - 1.0 / 3.0
    c = 1.0 / math.sqrt(9.0 * d)
    while True:
        x = normal(generator)
        v = (1.0 + c * x) ** 3
        if v <= 0.0:
            continue
        if math.log(uniform_open_zero(generator)) < 0.5 * x * x + d - d * v + d * math.log(v):
            log_gamma = math.log(d * v)
            break
    if boosted:
        log_gamma += math.log(uniform_open_zero(generator)) / shape
    return log_gamma


def normal(generator: torch.Generator) -> float:
    return torch.randn((), generator=generator, dtype=torch.float64).item()


def uniform_open_zero(generator: torch.Generator) -> float:
    """A uniform draw in (0, 1], so its logarithm is finite."""
    return 1.0 - torch.rand((), generator=generator, dtype=torch.float64).item()


def mix_inputs(x: torch.Tensor, perm: torch.Tensor, lam: float) -> torch.Tensor:
    """``lam * x + (1 - lam) * x[perm]`` for a floating-point batch (one fused ``lerp``)."""
    if not x.is_floating_point():
        raise TypeError(f"mix_inputs needs floating-point inputs, got {x.dtype}")
    return torch.lerp(x[perm], x, lam)


def remix_label_weights(lam: float, counts_a: torch.Tensor, counts_b: torch.Tensor,
                        kappa: float = 3.0, tau: float = 0.5) -> torch.Tensor:
    """Remix's per-sample weight of label a (label b gets ``1 - weight``), float32.

    ``counts_a[i]`` is the training count n_a of sample i's class, ``counts_b[i]`` that of its
    partner's class (positive numbers), and ``x_mixed = lam * x_a + (1 - lam) * x_b``.  The rule
    of Chou et al. (their n_i, n_j, lambda_y are n_a, n_b and this weight):

    * 0 (all of the label to b) when n_a / n_b >= kappa and lam < tau: a is the majority
      class by a factor kappa or more and b's image makes up more than 1 - tau of the mix;
    * 1 (all of the label to a) when n_a / n_b <= 1 / kappa and 1 - lam < tau: the mirror case,
      a is the minority class and its image makes up more than 1 - tau of the mix;
    * lam otherwise, as in mixup.

    Both comparisons on the ratio include equality; those on lam are strict, so lam == tau
    (or 1 - lam == tau) keeps lam.  The ratio tests are made as n_a >= kappa * n_b and
    kappa * n_a <= n_b in float64, so integer counts exactly at the boundary count as at it.
    Runs on the counts' device without synchronising it (no boolean indexing).
    """
    if not (math.isfinite(kappa) and kappa >= 1):
        raise UserError(f"remix kappa must be a number >= 1, got {kappa!r}")
    if not (0 <= tau <= 1):
        raise UserError(f"remix tau must lie in [0, 1], got {tau!r}")
    n_a = counts_a.to(torch.float64)
    n_b = counts_b.to(device=n_a.device, dtype=torch.float64)
    weights = torch.full(n_a.shape, float(lam), dtype=torch.float32, device=n_a.device)
    # Rule 0 is applied last so it wins where both hold (only possible with kappa == 1 and
    # tau > 0.5), the order of the paper's case list and of public Remix code.
    if 1.0 - lam < tau:
        weights = weights.masked_fill(kappa * n_a <= n_b, 1.0)
    if lam < tau:
        weights = weights.masked_fill(n_a >= kappa * n_b, 0.0)
    return weights


def mixup_label_weights(lam: float, n: int, device: torch.device | str | None = None) -> torch.Tensor:
    """Mixup's per-sample weight of label a: ``lam`` for each of the n samples, float32."""
    return torch.full((n,), float(lam), dtype=torch.float32, device=device)
