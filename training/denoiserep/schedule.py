"""The diffusion schedule behind DenoiseRep: per-timestep coefficients and timestep assignment.

A converted layer owns one fixed timestep ``t`` of a linear beta schedule ``beta_1..beta_T``. Every
coefficient is computed once, in float64, and kept as a plain Python float, so that no schedule
tensor ever appears in a state_dict and the fused weights do not depend on the dtype the model
happens to train in.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from .errors import DenoiseRepError

SCHEDULES = ("depth", "reference")


@dataclass(frozen=True)
class StepCoefficients:
    """The constants of one reverse-diffusion step at timestep ``t`` (1-based).

    ``c1 = beta_t / (sqrt(alpha_t) sqrt(1 - abar_t))`` and ``c3 = 1 / sqrt(alpha_t)`` define the
    posterior-mean step ``denoise(x) = c3 x - c1 eps(x)``; ``sqrt_abar`` and ``sqrt_one_minus_abar``
    build the noised feature ``x_t`` of the training signal.
    """

    t: int
    beta: float
    c1: float
    c3: float
    sqrt_abar: float
    sqrt_one_minus_abar: float


@dataclass(frozen=True)
class DiffusionSchedule:
    """A linear beta schedule of ``timesteps`` steps from ``beta[0]`` to ``beta[1]`` (both inclusive).

    Args:
        timesteps: T, the schedule length (the reference uses 1000).
        beta: (beta_1, beta_T), with 0 < beta_1 <= beta_T < 1 (the reference uses (1e-4, 2e-3)).
    """

    timesteps: int
    beta: tuple[float, float]

    def __post_init__(self) -> None:
        if isinstance(self.timesteps, bool) or not isinstance(self.timesteps, int) or self.timesteps < 1:
            raise DenoiseRepError(f"timesteps must be a positive integer, got {self.timesteps!r}")
        if len(self.beta) != 2:
            raise DenoiseRepError(f"beta must be a pair (beta_1, beta_T), got {self.beta!r}")
        lo, hi = (float(b) for b in self.beta)
        if not (0.0 < lo <= hi < 1.0):
            raise DenoiseRepError(
                f"beta must satisfy 0 < beta_1 <= beta_T < 1, got {self.beta!r} "
                "(the reference uses (1e-4, 2e-3))"
            )
        object.__setattr__(self, "beta", (lo, hi))

    def betas(self) -> torch.Tensor:
        """All T betas as a float64 tensor (index t-1 holds beta_t)."""
        return torch.linspace(self.beta[0], self.beta[1], self.timesteps, dtype=torch.float64)

    def step(self, t: int) -> StepCoefficients:
        """The coefficients of timestep ``t`` (1-based, 1 <= t <= T)."""
        if not 1 <= t <= self.timesteps:
            raise DenoiseRepError(f"timestep {t} is outside 1..{self.timesteps}")
        betas = self.betas()[:t]
        beta_t = float(betas[-1])
        alpha_t = 1.0 - beta_t
        abar_t = float(torch.prod(1.0 - betas))
        return StepCoefficients(
            t=t,
            beta=beta_t,
            c1=beta_t / (math.sqrt(alpha_t) * math.sqrt(1.0 - abar_t)),
            c3=1.0 / math.sqrt(alpha_t),
            sqrt_abar=math.sqrt(abar_t),
            sqrt_one_minus_abar=math.sqrt(1.0 - abar_t),
        )


def depth_timesteps(num_layers: int, timesteps: int) -> list[int]:
    """The paper's assignment: layers in forward order get t = n, n-1, ..., 1 (shallowest largest)."""
    if num_layers > timesteps:
        raise DenoiseRepError(
            f"schedule='depth' needs one timestep per converted layer: {num_layers} layers but "
            f"timesteps={timesteps}; pass timesteps >= {num_layers}"
        )
    return list(range(num_layers, 0, -1))


def reference_timesteps(blocks: Sequence[str], timesteps: int) -> list[int]:
    """The public code's assignment: every block gets the same pair, 0-based (2B, 2B-1).

    The public code indexes its schedule from 0, so its fc1 "t = 2B" is our 1-based step 2B + 1 (for
    a 12-block ViT: sqrt(1 - abar) = 0.0554 and c1 = 2.631e-3) and its fc2 is our step 2B.

    Args:
        blocks: for each converted layer in forward order, the name of the MLP block holding it.
            Every block must hold exactly two converted layers (fc1 then fc2).
        timesteps: T; 2B + 1 must not exceed it.

    Returns:
        One 1-based timestep per layer: 2B + 1 for the first layer of each block, 2B for the second.
    """
    counts: dict[str, int] = {}
    for block in blocks:
        counts[block] = counts.get(block, 0) + 1
    odd = {block: n for block, n in counts.items() if n != 2}
    if odd:
        block, n = next(iter(odd.items()))
        raise DenoiseRepError(
            f"schedule='reference' reproduces the public code's (fc1, fc2) pairs and needs exactly two "
            f"converted Linear layers per MLP block, but block {block!r} has {n}; use schedule='depth'"
        )
    top = 2 * len(counts) + 1
    if top > timesteps:
        raise DenoiseRepError(
            f"schedule='reference' gives every block the 1-based timesteps ({top}, {top - 1}) but "
            f"timesteps={timesteps}; pass timesteps >= {top}"
        )
    seen: set[str] = set()
    assigned = []
    for block in blocks:
        assigned.append(top - 1 if block in seen else top)
        seen.add(block)
    return assigned
