"""Progress under step and time budgets, routed to stderr for --json commands."""

import io
import math

import pytest

from nmsparse import progress as progress_module
from nmsparse.progress import Progress, format_clock


class _Clock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self):
        return self.now


def test_a_time_budget_shows_elapsed_budget_and_a_remaining_time_within_5_percent(monkeypatch):
    """A 15-minute recovery at 0.17 step/s, run as recover() runs it (stop at the first step boundary past
    the budget): every printed 'left' is within 5% of the time that really remained."""
    clock = _Clock()
    monkeypatch.setattr(progress_module.time, "perf_counter", clock)
    out = io.StringIO()
    bar = Progress(0, 0, "lines", every=10, budget_seconds=900.0)
    bar.stream = out
    start, step, step_time, printed = clock.now, 0, 1 / 0.17, []
    while clock.now - start < 900.0:
        clock.now += step_time * (1.0 + 0.02 * math.sin(step))  # a little jitter, as real steps have
        step += 1
        before = out.getvalue().count("\n")
        bar.update(step, "loss 0.43")
        if out.getvalue().count("\n") > before:
            printed.append((clock.now, bar.remaining()))
    end = clock.now
    lines = out.getvalue().splitlines()
    assert lines and lines[0].startswith("step 10  0:5") and " / 15:00  left " in lines[0] and "loss 0.43" in lines[0]
    assert "step/s" in lines[0] and "eta" not in lines[0]
    for at, left in printed:
        truth = end - at
        assert abs(left - truth) <= 0.05 * truth + 1e-6, (at - start, left, truth)


def test_a_step_budget_shows_n_of_total_and_the_eta(monkeypatch):
    clock = _Clock()
    monkeypatch.setattr(progress_module.time, "perf_counter", clock)
    out = io.StringIO()
    bar = Progress(100, 0, "lines", every=25)
    bar.stream = out
    for step in range(1, 101):
        clock.now += 2.0
        bar.update(step, "loss 1.0")
    lines = out.getvalue().splitlines()
    assert lines[0] == "step 25/100  loss 1.0  0.50 step/s  eta 0:02:30"
    assert lines[-1].startswith("step 100/100") and len(lines) == 4


def test_set_stream_routes_and_throttles_lines(monkeypatch):
    clock = _Clock()
    monkeypatch.setattr(progress_module.time, "perf_counter", clock)
    err = io.StringIO()
    progress_module.set_stream(err, throttle_seconds=5.0)
    try:
        bar = Progress(40, 0, "auto", every=1)  # auto on a stream that is no terminal: plain lines
        assert bar.mode == "lines"
        for step in range(1, 41):
            clock.now += 1.0
            bar.update(step, "")
    finally:
        progress_module.set_stream(None)
    lines = err.getvalue().splitlines()
    assert 7 <= len(lines) <= 9 and lines[-1].startswith("step 40/40")  # one per 5 s, and the last
    assert "\x1b[" not in err.getvalue()


@pytest.mark.parametrize("seconds,text", [(0, "0:00"), (61.4, "1:01"), (900, "15:00"), (3725, "1:02:05")])
def test_clock_format(seconds, text):
    assert format_clock(seconds) == text
