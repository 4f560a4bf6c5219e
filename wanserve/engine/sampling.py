"""The sampling schedule of the Wan 2.2 reference code, and the per-step expert/guidance plan.

Stock diffusers builds its flow sigmas as linspace(1, 1/1000, N+1)[:-1] and nudges the first one,
which makes every timestep one higher than the reference sampler's and the latents ~9% different.
The reference builds linspace(float32(0.999), 0, N+1)[:-1], shifts it, and feeds the model the
integer part of sigma*1000. Handing that unshifted grid to diffusers' UniPC scheduler as `sigmas=`
(with `flow_shift` = the request's shift) reproduces the reference timesteps and sigmas exactly.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum

import numpy as np

NUM_TRAIN_TIMESTEPS = 1000
BOUNDARY_RATIO = 0.875
# The reference scheduler's sigma_max: 1 - 1/1000 stored in float32, read back as a Python float.
REFERENCE_SIGMA_MAX = float(np.float32(1.0 - 1.0 / NUM_TRAIN_TIMESTEPS))


class Expert(StrEnum):
    HIGH = "high"  # `transformer`: high-noise steps, t >= boundary
    LOW = "low"  # `transformer_2`: low-noise steps


def reference_sigmas(num_steps: int) -> np.ndarray:
    """The unshifted sigma grid of the reference sampler (float64, length num_steps)."""
    if num_steps < 1:
        raise ValueError("num_steps must be >= 1")
    return np.linspace(REFERENCE_SIGMA_MAX, 0.0, num_steps + 1)[:-1].copy()


def shift_sigmas(sigmas: np.ndarray, shift: float) -> np.ndarray:
    return shift * sigmas / (1.0 + (shift - 1.0) * sigmas)


def reference_timesteps(num_steps: int, shift: float) -> list[int]:
    """Integer timesteps the reference code feeds the model for (steps, shift)."""
    shifted = shift_sigmas(reference_sigmas(num_steps), shift)
    return [int(t) for t in (shifted * NUM_TRAIN_TIMESTEPS).astype(np.int64)]


@dataclass(frozen=True)
class StepPlan:
    """What one denoising step runs."""

    index: int
    timestep: int
    expert: Expert
    guidance_scale: float

    @property
    def uses_cfg(self) -> bool:
        # CFG is skipped per expert: a scale <= 1 means one forward for that expert's steps only.
        return self.guidance_scale > 1.0

    @property
    def forwards(self) -> int:
        return 2 if self.uses_cfg else 1


def plan_steps(
    timesteps: list[int],
    guidance_scale: float,
    guidance_scale_2: float,
    boundary_ratio: float = BOUNDARY_RATIO,
) -> list[StepPlan]:
    """Assign each timestep to an expert (high while t >= boundary) with that expert's guidance."""
    boundary = boundary_ratio * NUM_TRAIN_TIMESTEPS
    plan = []
    for i, t in enumerate(timesteps):
        high = t >= boundary
        plan.append(
            StepPlan(
                index=i,
                timestep=int(t),
                expert=Expert.HIGH if high else Expert.LOW,
                guidance_scale=guidance_scale if high else guidance_scale_2,
            )
        )
    return plan
