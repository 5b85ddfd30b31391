"""Bounds for the statistical checks of random exercises (dropout, Gumbel-softmax, masking)."""

from __future__ import annotations

import math


def hoeffding_radius(n: int, delta: float) -> float:
    """Half-width t with P(|mean of n iid [0, 1] variables - expectation| > t) <= delta.

    Hoeffding: P(|mean - E| > t) <= 2 exp(-2 n t^2); solved for t. The DKW inequality
    (Massart's constant) bounds a Kolmogorov-Smirnov distance by the same expression.
    """
    return math.sqrt(math.log(2 / delta) / (2 * n))
