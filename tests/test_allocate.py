import math

import pytest

from nmsparse.allocate import (
    AllocationError,
    ERKAllocator,
    erk_densities,
    kept_params,
    load_scheme,
    nm_allocation,
    power_of_two_candidates,
    save_scheme,
    uniform_densities,
)
from nmsparse.select import Selection
from nmsparse.sparsifier import Sparsifier

SHAPES = {
    "conv1": (64, 3, 7, 7),
    "layer1.conv": (64, 64, 3, 3),
    "layer2.conv": (128, 64, 3, 3),
    "layer3.conv": (256, 128, 3, 3),
    "layer3.down": (256, 128, 1, 1),
    "fc": (10, 256),
}


def _kept(densities):
    return sum(d * math.prod(SHAPES[f]) for f, d in densities.items())


@pytest.mark.parametrize("density", [0.05, 0.25, 0.5, 0.9])
def test_erk_preserves_the_budget_and_stays_in_range(density):
    dens = erk_densities(SHAPES, density)
    total = sum(math.prod(s) for s in SHAPES.values())
    assert abs(_kept(dens) - density * total) <= 1e-6 * total
    assert all(0.0 <= d <= 1.0 for d in dens.values())
    assert dens == erk_densities(SHAPES, density)  # deterministic


def test_erk_prefers_small_layers_and_densifies_iteratively():
    dens = erk_densities(SHAPES, 0.5)
    assert dens["fc"] == 1.0 and dens["conv1"] == 1.0  # would exceed 1: made dense, the rest re-solved
    assert dens["layer3.conv"] < dens["layer2.conv"] < dens["layer1.conv"]


def test_erk_power_zero_is_uniform_and_overrides_are_respected():
    flat = erk_densities(SHAPES, 0.3, power_scale=0.0)
    assert all(d == pytest.approx(0.3) for d in flat.values())
    fixed = erk_densities(SHAPES, 0.3, fixed={"fc": 1.0, "conv1": 0.5})
    assert fixed["fc"] == 1.0 and fixed["conv1"] == 0.5
    total = sum(math.prod(s) for s in SHAPES.values())
    assert abs(_kept(fixed) - 0.3 * total) <= 1e-6 * total
    with pytest.raises(AllocationError, match="fixed layers use"):
        erk_densities(SHAPES, 0.01, fixed={"layer3.conv": 1.0})
    with pytest.raises(AllocationError, match="unknown layers"):
        erk_densities(SHAPES, 0.3, fixed={"nope": 1.0})
    with pytest.raises(AllocationError, match=r"\(0, 1\]"):
        uniform_densities(SHAPES, 0.0)


@pytest.mark.parametrize("density,m,cands", [(0.25, 8, None), (0.125, 8, power_of_two_candidates(8)), (0.5, 4, None)])
def test_nm_rounding_keeps_the_budget_within_one_step(density, m, cands):
    dens = erk_densities(SHAPES, density)
    pats = nm_allocation(SHAPES, dens, m, cands)
    budget = _kept(dens)
    kept = kept_params(SHAPES, pats)
    cand = sorted(cands or range(1, m + 1))
    largest_step = max(math.prod(s) for s in SHAPES.values()) * max(b - a for a, b in zip(cand, cand[1:])) / m
    assert kept <= budget + 1e-6 and budget - kept < largest_step
    assert all(p.m == m and p.n in cand for p in pats.values())


def test_power_of_two_candidates():
    assert power_of_two_candidates(8) == (1, 2, 4, 8)
    assert power_of_two_candidates(16) == (1, 2, 4, 8, 16)
    assert power_of_two_candidates(6) == (1, 2, 4, 6)


def test_erk_allocator_in_a_sparsifier(tiny_cnn):
    sp = Sparsifier("magnitude", "2:8", Selection(), allocation=ERKAllocator(0.75, m=8))
    sp.prepare(tiny_cnn)
    patterns = {fqn: layer.patterns[0] for fqn, layer in sp.layers.items()}
    assert len({str(p) for p in patterns.values()}) > 1  # layers differ
    shapes = {fqn: tuple(layer.module.weight.shape) for fqn, layer in sp.layers.items()}
    total = sum(math.prod(s) for s in shapes.values())
    assert kept_params(shapes, patterns) <= 0.25 * total + 1e-6
    assert all(r.verified for r in sp.report() if r.skip_reason is None)


def test_scheme_round_trip_and_errors(tmp_path):
    path = tmp_path / "scheme.json"
    save_scheme(path, {"b": "2:8", "a": "1:8"})
    assert load_scheme(path) == {"a": "1:8", "b": "2:8"}
    with pytest.raises(AllocationError, match="does not exist"):
        load_scheme(tmp_path / "missing.json")
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(AllocationError, match="is not JSON"):
        load_scheme(tmp_path / "bad.json")
    (tmp_path / "badp.json").write_text('{"a": "5:4"}')
    with pytest.raises(AllocationError, match="layer a"):
        load_scheme(tmp_path / "badp.json")
