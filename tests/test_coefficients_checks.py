"""A coefficients.Schedule object is validated like the named and list forms, at construction."""

from __future__ import annotations

import math

import pytest
import torch

from fastoptim import Muon, coefficients, newton_schulz
from fastoptim.coefficients import Schedule


@pytest.mark.parametrize(
    "schedule,match",
    [
        (Schedule(((3.0, math.nan, 1.0),)), "finite"),
        (Schedule(((3.0, -4.0),)), "triple"),
        (Schedule(((3.0, -4.0, 2.0),), safety=math.nan), "safety"),
        (Schedule(((3.0, -4.0, 2.0),), safety=0.0), "safety"),
        (Schedule("abc"), "sequence"),
    ],
)
def test_a_bad_schedule_object_is_refused(schedule, match):
    with pytest.raises(ValueError, match=match):
        coefficients.resolve(schedule)
    with pytest.raises(ValueError, match=match):
        Muon([torch.randn(4, 4, requires_grad=True)], coefficients=schedule)
    with pytest.raises(ValueError, match=match):
        newton_schulz(torch.randn(4, 4), coefficients=schedule)


def test_a_good_schedule_object_resolves_to_itself():
    schedule = coefficients.resolve("polar_express")
    assert coefficients.resolve(schedule) == schedule
