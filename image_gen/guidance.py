"""Training-time classifier-free guidance (paper A.7, the release's train.py).

Each class label in a step gets its own guidance scale alpha, drawn on [alpha_min, alpha_max] with
density proportional to alpha^(-power) (inverse CDF; log-uniform at power 1), and forced to 1 with
probability no_cfg_frac. Unconditional real samples join that label's negatives with weight
(alpha - 1)(G - 1) / N_unc, so alpha = 1 leaves them out; alpha is also fed to the generator.
"""

from __future__ import annotations

import math

import torch


def sample_alpha(
    n: int,
    alpha_min: float = 1.0,
    alpha_max: float = 4.0,
    power: float = 5.0,
    no_cfg_frac: float = 0.0,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """n guidance scales [n] float32 with density ~ alpha^(-power) on [alpha_min, alpha_max],
    drawn on `device` (the generator's device; default CPU) in float64."""
    if not 0 < alpha_min <= alpha_max:
        raise ValueError(f"alpha_min/alpha_max: expected 0 < min <= max, got "
                         f"{alpha_min}/{alpha_max}")
    if not 0 <= no_cfg_frac <= 1:
        raise ValueError(f"no_cfg_frac: expected a probability in [0, 1], got {no_cfg_frac}")
    u = torch.rand(n, generator=generator, dtype=torch.float64, device=device)
    e = 1.0 - power  # the CDF integrates alpha^(-power) to alpha^e / e (log at e = 0)
    if abs(e) < 1e-6:
        alpha = torch.exp(math.log(alpha_min) + u * math.log(alpha_max / alpha_min))
    else:
        alpha = (alpha_min**e + u * (alpha_max**e - alpha_min**e)) ** (1.0 / e)
    plain = torch.rand(n, generator=generator, dtype=torch.float64, device=device) < no_cfg_frac
    return torch.where(plain, torch.ones_like(alpha), alpha).float()


def unconditional_weights(alpha: torch.Tensor, gen_per_label: int, n_unc: int,
                          validate: bool = True) -> torch.Tensor:
    """Weights [P, n_unc] of the unconditional negatives of each label: (alpha - 1)(G - 1)/N_unc.
    `validate` checks alpha >= 1 (a device-to-host copy)."""
    if n_unc < 1:
        raise ValueError(f"n_unc: expected >= 1 unconditional negatives, got {n_unc}")
    if validate and bool((alpha < 1).any()):
        raise ValueError(f"alpha: expected guidance scales >= 1, got min {float(alpha.min())}")
    w = (alpha.float() - 1.0) * (gen_per_label - 1) / n_unc
    return w[:, None].expand(-1, n_unc).contiguous()
