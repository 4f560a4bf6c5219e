from __future__ import annotations

import numpy as np
import pytest
from diffusers import UniPCMultistepScheduler

from wanserve.engine.sampling import Expert, plan_steps, reference_sigmas, reference_timesteps


def formula_timesteps(steps: int, shift: float) -> list[int]:
    """DESIGN.md section 4, written out independently of the module under test."""
    sigma_max = float(np.float32(0.999))
    sigmas = np.linspace(sigma_max, 0, steps + 1)[:-1]
    shifted = shift * sigmas / (1 + (shift - 1) * sigmas)
    return [int(x) for x in (shifted * 1000).astype(np.int64)]


DOCUMENTED = {
    (4, 12): [999, 972, 922, 799],
    (6, 5): [999, 961, 908, 833, 713, 499],
}


@pytest.mark.parametrize(("steps", "shift"), [(4, 12), (6, 5), (40, 12), (30, 5), (1, 5), (2, 1), (100, 10)])
def test_timesteps_match_reference(steps: int, shift: float) -> None:
    ours = reference_timesteps(steps, shift)
    assert ours == formula_timesteps(steps, shift)
    assert len(ours) == steps
    if (steps, shift) in DOCUMENTED:
        assert ours == DOCUMENTED[(steps, shift)]
    if (steps, shift) == (30, 5):
        assert ours[:6] == [999, 992, 985, 978, 969, 961] and ours[-2:] == [262, 146]
    if (steps, shift) == (40, 12):
        assert ours[:6] == [999, 997, 995, 993, 990, 988] and ours[-2:] == [386, 235]


@pytest.mark.parametrize(("steps", "shift"), [(4, 12), (6, 5), (40, 12), (30, 5)])
def test_unipc_given_reference_grid_reproduces_reference(steps: int, shift: float) -> None:
    scheduler = UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=shift)
    scheduler.set_timesteps(sigmas=reference_sigmas(steps))
    assert scheduler.timesteps.tolist() == reference_timesteps(steps, shift)
    # ...while the stock grid is one step higher: the difference this project exists to remove.
    stock = UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=shift)
    stock.set_timesteps(steps)
    assert stock.timesteps.tolist() != reference_timesteps(steps, shift)


def test_plan_splits_experts_at_boundary_with_per_expert_guidance() -> None:
    plan = plan_steps([999, 900, 875, 874, 500], guidance_scale=3.0, guidance_scale_2=1.0)
    assert [p.expert for p in plan] == [Expert.HIGH, Expert.HIGH, Expert.HIGH, Expert.LOW, Expert.LOW]
    assert [p.forwards for p in plan] == [2, 2, 2, 1, 1]
    plan = plan_steps([999, 500], guidance_scale=1.0, guidance_scale_2=4.0)
    assert [p.forwards for p in plan] == [1, 2]
