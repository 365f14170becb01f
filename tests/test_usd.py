import pytest
import torch
from torch import nn

from nmsparse.mask import is_nm
from nmsparse.method import MethodError, build_method
from nmsparse.method.usd import domino_thresholds, penalty_factors, votes_to_lower
from nmsparse.pattern import NMPattern
from nmsparse.schedule import Cubic
from nmsparse.select import Rule, Selection
from nmsparse.sparsifier import Sparsifier

from .conftest import train_steps


def test_thresholds_are_the_mean_of_the_lower_half():
    groups = torch.tensor([[4.0, 3, 2, 1, 1, 2, 3, 4], [8.0, 0, 0, 0, 0, 0, 0, 1]])
    assert torch.allclose(domino_thresholds(groups), torch.tensor([1.5, 0.0]))


def test_vote_triggers_at_the_ratio():
    thresholds = torch.full((4,), 0.5)
    # survivors per group above 0.5: 3, 3, 3, 4 -> with n_live 4, three of four groups vote
    groups = torch.tensor([[1.0, 1, 1, 0], [1.0, 1, 1, 0], [1.0, 1, 1, 0], [1.0, 1, 1, 1]])
    assert votes_to_lower(groups, thresholds, n_live=4, vote_ratio=0.75)
    assert not votes_to_lower(groups, thresholds, n_live=4, vote_ratio=0.8)
    assert not votes_to_lower(groups, thresholds, n_live=3, vote_ratio=0.25)


def test_penalty_factors_hand_computed():
    erk = {"a": 0.8, "b": 0.4}
    dens = {"a": 0.5, "b": 1.0}  # remaining budget: a 0.8 - 0.5 = 0.3, b 0.4 - 0 = 0.4
    flops = {"a": 100.0, "b": 10.0}  # live flops: a 50, b 10
    f = penalty_factors(erk, dens, flops, 0.5, 0.5)
    assert f["a"] == pytest.approx(0.5 * 0.3 / 0.4 + 0.5 * 1.0)
    assert f["b"] == pytest.approx(0.5 * 1.0 + 0.5 * 10 / 50)
    # a layer past its ERK budget gets no ERK pull; a tiny remaining budget everywhere switches it off
    f = penalty_factors({"a": 0.1, "b": 0.105}, {"a": 0.5, "b": 0.9}, flops, 1.0, 0.0)
    assert f == {"a": 0.0, "b": 0.0}


def test_gmp_density_ramp():
    gmp = Cubic(1.0, 0.25, 0, 100)  # the unstructured phase's density ramp (Zhu & Gupta)
    assert gmp(0) == 1.0
    assert gmp(100) == pytest.approx(0.25)
    assert gmp(50) == pytest.approx(0.25 + 0.75 * 0.125)
    assert gmp(500) == pytest.approx(0.25)


def _mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 16))


def _train(model, sp, start, stop, lr=0.05):
    train_steps(model, sp, stop - start, (16, 32), start=start, lr=lr, seed=start)


def _usd(options, pattern="8:8"):
    return Sparsifier("usd", pattern, Selection(keep_classifier=False), method_options=options)


def test_first_vote_drops_to_m_minus_one_without_a_scheme_change():
    model = _mlp()
    sp = _usd({"target_sparsity": 0.5, "check_every_steps": 1, "penalty_strength": 0.0})
    sp.prepare(model, total_steps=100)
    _train(model, sp, 0, 1)
    for s in sp.method.search.values():
        assert s.n_live == 7 and s.n == 8 and s.frozen
    assert all(str(layer.patterns[0]) == "7:8" for layer in sp.layers.values())
    for fqn, _layer in sp.layers.items():
        assert is_nm(dict(model.named_modules())[fqn].weight, NMPattern(7, 8))


def test_search_stops_at_the_target_with_power_of_two_schemes():
    model = _mlp()
    sp = _usd({"target_sparsity": 0.75, "check_every_steps": 2, "penalty_strength": 2.0, "penalty_every_steps": 1})
    sp.prepare(model, total_steps=400)
    for start in range(0, 400, 20):
        _train(model, sp, start, start + 20, lr=0.1)
        if sp.method.phase == "finetune":
            break
    method = sp.method
    assert method.phase == "finetune" and method.target_reached and not method.forced
    assert method.current_sparsity() >= 0.75 - 1e-3
    for fqn, s in method.search.items():
        assert s.n in (1, 2, 4, 8)
        layer = sp.layers[fqn]
        assert layer.patterns[0] == NMPattern(s.n, 8)
        assert layer.parametrization.rule == "srste"
    summary = method.summary()
    assert summary["target_reached"] and set(summary["scheme"]) == set(sp.layers)
    entries = sp.squash()
    for entry in entries:
        assert is_nm(
            dict(model.named_modules())[entry["fqn"]].weight, NMPattern(int(entry["pattern"].split(":")[0]), 8)
        )


def test_deadline_forces_the_target_and_says_so():
    model = _mlp()
    sp = _usd({"target_sparsity": 0.8, "check_every_steps": 50, "penalty_strength": 0.0, "finetune_steps": 5})
    sp.prepare(model, total_steps=10)
    _train(model, sp, 0, 10)
    m = sp.method
    assert m.phase == "finetune" and m.forced and m.target_reached and m.stop_step == 5
    assert m.current_sparsity() >= 0.8 - 1e-3


def test_flops_budget_counts_positions():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(8, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 16, 1), nn.Flatten(),
                          nn.Linear(16 * 16, 8))
    sp = Sparsifier("usd", "8:8", Selection(keep_classifier=False, keep_first_conv=False),
                    method_options={"budget": "flops"})
    sp.prepare(model, total_steps=10)
    model(torch.randn(2, 8, 4, 4))
    flops = sp.method.flops
    assert flops == {"0": 16 * 8 * 9 * 16.0, "2": 16 * 16 * 16.0, "4": 256 * 8.0}


def test_unstructured_phase_prunes_gradually_then_searches():
    model = _mlp()
    sp = _usd({"target_sparsity": 0.75, "unstructured_steps": 20, "unstructured_fraction": 0.8,
               "check_every_steps": 5, "penalty_strength": 0.0})
    sp.prepare(model, total_steps=100)
    densities = []
    for start in range(0, 20, 5):
        _train(model, sp, start, start + 5)
        densities.append(float(sp.layers["2"].mask.float().mean()))
    assert densities[:3] == sorted(densities[:3], reverse=True) and densities[0] < 1.0
    assert sp.method.phase == "search" and densities[3] == 1.0  # the search starts from n = m ...
    target = sp.method.unstructured_density["2"]
    zeros = float((sp.layers["2"].dense_weight == 0).float().mean())
    assert zeros == pytest.approx(1 - target, abs=0.01)  # ... on weights the unstructured phase set to zero


def test_state_round_trip_mid_search():
    opts = {"target_sparsity": 0.75, "check_every_steps": 3, "penalty_strength": 1.0}
    model = _mlp()
    sp = _usd(opts)
    sp.prepare(model, total_steps=200)
    _train(model, sp, 0, 9)
    state = sp.state_dict()
    other_model = _mlp()
    other = _usd(opts)
    other.prepare(other_model, total_steps=200)
    other_model.load_state_dict(model.state_dict())
    other.load_state_dict(state)
    for fqn in sp.layers:
        a, b = sp.method.search[fqn], other.method.search[fqn]
        assert (a.n, a.n_live, a.frozen) == (b.n, b.n_live, b.frozen)
        assert torch.equal(a.thresholds, b.thresholds)
        assert sp.layers[fqn].patterns == other.layers[fqn].patterns
    _train(model, sp, 9, 15)
    _train(other_model, other, 9, 15)
    for fqn in sp.layers:
        assert torch.equal(sp.layers[fqn].mask, other.layers[fqn].mask)


def test_option_and_layer_errors(tiny_vit):
    with pytest.raises(ValueError, match="target_sparsity"):
        build_method("usd", {"target_sparsity": 1.5})
    with pytest.raises(MethodError, match="one n:m per layer"):
        selection = Selection(layers=("qkv",), rules=(Rule.parse("re:.*qkv=4:4,4:4,2:4"),))
        Sparsifier("usd", "4:4", selection, method_options={}).prepare(tiny_vit)
