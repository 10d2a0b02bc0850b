"""Noise levels and sampler updates of diffusion and consistency models: pure numpy, no I/O.

A model here is a *denoiser* ``D(x, sigma)``: given a sample ``x`` carrying
Gaussian noise of standard deviation ``sigma``, it predicts the clean sample
(the parameterisation of Karras et al., "Elucidating the Design Space of
Diffusion-Based Generative Models", which consistency models share). The
noise levels of a run are Karras' schedule (:func:`karras_sigmas`); two
samplers step along them:

* ``euler`` — the deterministic first-order solver of the probability-flow
  ODE: from ``x`` at ``sigma``, move to ``sigma_next`` along
  ``(x - D(x, sigma)) / sigma``; the last step (to 0) lands on ``D``.
* ``consistency`` — multistep consistency sampling (Song et al.,
  "Consistency Models"): a consistency model maps any noise level straight
  to a clean sample, so one step is enough; each further step adds fresh
  noise back to level ``sigma_next`` and denoises again.
"""

from __future__ import annotations

import numpy as np

__all__ = ["consistency_renoise", "euler_step", "karras_sigmas"]


def karras_sigmas(steps: int, sigma_min: float, sigma_max: float, rho: float = 7.0) -> np.ndarray:
    """``steps`` noise levels from ``sigma_max`` down to ``sigma_min`` (one step:
    ``[sigma_max]``), spaced evenly in ``sigma ** (1 / rho)``."""
    if steps < 1 or not 0 < sigma_min <= sigma_max:
        raise ValueError("need steps >= 1 and 0 < sigma_min <= sigma_max")
    if steps == 1:
        return np.array([sigma_max], np.float64)
    ramp = np.linspace(0.0, 1.0, steps)
    lo, hi = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    return np.asarray((hi + ramp * (lo - hi)) ** rho, np.float64)


def euler_step(x: np.ndarray, denoised: np.ndarray, sigma: float, sigma_next: float) -> np.ndarray:
    """``x`` at ``sigma`` moved to ``sigma_next`` (0 gives ``denoised``)."""
    return np.asarray(denoised + (sigma_next / sigma) * (x - denoised), np.float32)


def consistency_renoise(
    denoised: np.ndarray, sigma_next: float, sigma_min: float, noise: np.ndarray
) -> np.ndarray:
    """A clean sample noised back to level ``sigma_next`` for the next consistency step."""
    scale = np.sqrt(max(sigma_next**2 - sigma_min**2, 0.0))
    return np.asarray(denoised + scale * noise, np.float32)
