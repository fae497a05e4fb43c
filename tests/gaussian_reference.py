"""Quadrature references for clipped-Gaussian moments, shared by the tests (float64, SciPy;
independent of the package's closed forms)."""

from __future__ import annotations

import numpy as np
from scipy import integrate, stats


def clipped_moment(m: float, s: float, p: int = 1, hi: float = 6.0) -> float:
  """E[clip(y, 0, hi)^p], y ~ N(m, s^2), by adaptive quadrature of the density on [0, hi] plus
  the clipped tail's hi^p P(y > hi)."""
  pdf = stats.norm(m, s).pdf
  points = [m] if 0.0 < m < hi else None
  body = integrate.quad(lambda y: y ** p * pdf(y), 0.0, hi, points=points, epsabs=1e-13,
                        epsrel=1e-12)[0]
  return body + hi ** p * stats.norm(m, s).sf(hi)


def relu6_mean(m, s) -> np.ndarray:
  """E[min(max(y, 0), 6)] elementwise over arrays of means and standard deviations."""
  return np.asarray([clipped_moment(mi, si) for mi, si in zip(m, s)])
