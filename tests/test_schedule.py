import math

import pytest

from nmsparse.schedule import Constant, Cosine, Cubic, Exponential, Linear, StepDecay, WarmupThen


@pytest.mark.parametrize("cls", [Linear, Cosine, Cubic])
def test_endpoints_and_monotonic(cls):
    sched = cls(1.0, 0.1, 10, 110)
    assert sched(0) == pytest.approx(1.0) and sched(10) == pytest.approx(1.0)
    assert sched(110) == pytest.approx(0.1) and sched(500) == pytest.approx(0.1)
    values = [sched(s) for s in range(0, 120)]
    assert all(a >= b - 1e-12 for a, b in zip(values, values[1:]))


def test_values_by_hand():
    assert Cosine(1.0, 0.0, 0, 100)(50) == pytest.approx(0.5)
    assert Cubic(0.0, 1.0, 0, 10)(5) == pytest.approx(1 - 0.5**3)
    assert Exponential(1.0, 1e-4, 100)(5100) == pytest.approx(math.exp(-0.5))
    assert Exponential(1.0, 1e-4, 100)(50) == 1.0
    assert StepDecay(1.0, (10, 20), 0.5)(19) == 0.5 and StepDecay(1.0, (10, 20), 0.5)(20) == 0.25
    assert Constant(3.0)(123) == 3.0


def test_warmup_reaches_peak():
    sched = WarmupThen(Cosine(1.0, 0.0, 5, 105), 5)
    assert sched(0) == pytest.approx(0.01)
    assert sched(5) == pytest.approx(1.0)
    assert sched(3) < sched(4) < sched(5)
