import math

import pytest
import torch
from torch import nn

from nmsparse.mask import is_nm
from nmsparse.method import MethodError, build_method
from nmsparse.method.progressive import decay_schedule, frame_starts, pattern_stages, phase_bounds
from nmsparse.pattern import NMPattern, parse_pattern
from nmsparse.select import Rule, Selection
from nmsparse.sparsifier import Sparsifier

from .conftest import train_steps


def _p(text):
    return parse_pattern(text)


def _texts(stages):
    return [str(p) for p in stages]


# ------------------------------------------------------------------------------------ formulas
def test_decay_values_match_the_paper_settings():
    assert decay_schedule("exp", 1e-4, 100)(100 + 5000) == pytest.approx(0.6065, abs=1e-4)
    assert decay_schedule("exp", 1e-4, 100)(100 + 10000) == pytest.approx(0.3679, abs=1e-4)
    assert decay_schedule("exp", 1e-4, 100)(100 + 50000) == pytest.approx(0.0067, abs=1e-4)
    assert decay_schedule("exp", 2e-4, 100)(100 + 5000) == pytest.approx(math.exp(-1))
    assert decay_schedule("linear", 8e-4, 100)(100 + 625) == pytest.approx(0.5)
    assert (
        decay_schedule("linear", 8e-4, 100)(100 + 1250) == 0.0
        and decay_schedule("linear", 8e-4, 100)(100 + 5000) == 0.0
    )
    assert decay_schedule("step", 1.0, 100)(100 + 0) == 0.0
    assert decay_schedule("exp", 1e-4, 100)(100 + -1) == 1.0  # dense phase
    with pytest.raises(MethodError, match="unknown decay"):
        decay_schedule("cosine", 1.0, 100)(100 + 3)


@pytest.mark.parametrize(
    "target,kind,expected",
    [
        ("1:8", "stepwise", ["7:8", "4:8", "2:8", "1:8"]),
        ("1:16", "stepwise", ["15:16", "8:16", "4:16", "2:16", "1:16"]),
        ("2:8", "stepwise", ["7:8", "4:8", "2:8"]),
        ("2:4", "stepwise", ["3:4", "2:4"]),
        ("3:8", "stepwise", ["7:8", "4:8", "3:8"]),
        ("1:8", "geometric", ["8:64", "4:32", "2:16", "1:8"]),
        ("1:8", "densify", ["1:64", "1:32", "1:16", "1:8"]),
        ("2:4", "none", ["2:4"]),
    ],
)
def test_pattern_stages(target, kind, expected):
    assert _texts(pattern_stages(_p(target), kind)) == expected


def test_geometric_stages_keep_density_and_axis():
    stages = pattern_stages(NMPattern(1, 8, "out"), "geometric", 3)
    assert {p.density for p in stages} == {1 / 8} and {p.axis for p in stages} == {"out"}


@pytest.mark.parametrize(
    "total,dense,finetune,frames,bounds,starts",
    [
        (300, 0.1, 0.1, 4, (30, 270), [30, 90, 150, 210]),  # the paper's epochs example
        (100, 0.0, 0.25, 3, (0, 75), [0, 25, 50]),
        (7, 0.0, 0.0, 2, (0, 7), [0, 3]),
        (1000, 0.2, 0.0, 5, (200, 1000), [200, 360, 520, 680, 840]),
        (10, 0.15, 0.15, 4, (1, 9), [1, 3, 5, 7]),
    ],
)
def test_phase_and_frame_boundaries(total, dense, finetune, frames, bounds, starts):
    assert phase_bounds(total, dense, finetune) == bounds
    assert frame_starts(*bounds, frames) == starts


# -------------------------------------------------------------------------- through a sparsifier
def _mlp(width=16):
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(width, width), nn.ReLU(), nn.Linear(width, width), nn.ReLU(), nn.Linear(width, 4))


def _everything():
    return Selection(keep_classifier=False)


def _run(model, sparsifier, start, stop, lr=0.05):
    train_steps(model, sparsifier, stop - start, (8, model[0].in_features), start=start, lr=lr, seed=start)


def test_dense_phase_is_exactly_dense_and_step_decay_is_the_hard_mask():
    model = _mlp()
    dense_copy = _mlp()
    x = torch.randn(5, 16)
    sp = Sparsifier("progressive", "2:4", _everything(), method_options={"decay": "step", "dense_fraction": 0.5})
    sp.prepare(model, total_steps=10)
    assert torch.equal(model(x), dense_copy(x))  # d = 1: W * (M + (1 - M)) == W exactly
    with torch.no_grad():
        for step in range(4):
            sp.step(step)  # no weight change
    assert torch.equal(model(x), dense_copy(x))
    sp.step(4)  # next forward is step 5 = the sparse start: masks recomputed, d = 0
    hard = _mlp()
    with torch.no_grad():
        for fqn, layer in sp.layers.items():
            dict(hard.named_modules())[fqn].weight.mul_(layer.mask)
            assert is_nm(dict(model.named_modules())[fqn].weight, NMPattern(2, 4))
    assert torch.equal(model(x), hard(x))


def test_mdgf_counts_decay_from_the_sparse_start():
    """Regression (reference code P-3): with a dense phase, d restarts at 1 when sparsity begins."""
    model = _mlp()
    opts = {"decay": "exp", "decay_rate": 0.1, "dense_fraction": 0.5}
    sp = Sparsifier("progressive", "2:4", _everything(), method_options=opts)
    sp.prepare(model, total_steps=20)
    factors = {}
    for step in range(15):
        sp.step(step)
        factors[step + 1] = next(iter(sp.layers.values())).parametrization.dense_factor
    assert factors[9] == 1.0 and factors[10] == 1.0
    assert factors[11] == pytest.approx(math.exp(-0.1)) and factors[15] == pytest.approx(math.exp(-0.5))


def test_decayed_forward_blends_pruned_weights():
    model = _mlp()
    opts = {"decay": "linear", "decay_rate": 0.25}
    sp = Sparsifier("progressive", "2:4", _everything(), method_options=opts)
    sp.prepare(model, total_steps=100)
    with torch.no_grad():
        sp.step(0)  # next step 1: d = 0.75
    layer = sp.layers["0"]
    w = layer.dense_weight.detach()
    expected = w * (layer.mask + (~layer.mask) * 0.75)
    assert torch.allclose(model[0].weight, expected)


def test_bias_is_kept():
    """Regression (reference code P-2): sparse layers must keep their bias."""
    model = _mlp()
    with torch.no_grad():
        model[4].bias.fill_(5.0)
        model[4].weight.fill_(1.0)
    sp = Sparsifier("progressive", "2:4", _everything(), method_options={"decay": "step"})
    sp.prepare(model, total_steps=10)
    out = model[4](torch.zeros(2, 16))
    assert torch.equal(out, torch.full((2, 4), 5.0))


def test_sdgf_stages_switch_at_frame_boundaries_and_masks_follow():
    model = _mlp()
    opts = {"decay": "step", "stages": "stepwise", "finetune_fraction": 0.2}
    sp = Sparsifier("progressive", "1:8", _everything(), method_options=opts)
    sp.prepare(model, total_steps=50)  # sparse phase [0, 40): frames start 0, 10, 20, 30
    seen = {0: str(sp.layers["0"].patterns[0])}
    for step in range(45):
        _run(model, sp, step, step + 1)
        seen[step + 1] = str(sp.layers["0"].patterns[0])
        for fqn, layer in sp.layers.items():
            assert is_nm(dict(model.named_modules())[fqn].weight, layer.patterns[0])
    assert [seen[s] for s in (0, 9, 10, 19, 20, 29, 30, 39, 40, 45)] == [
        "7:8", "7:8", "4:8", "4:8", "2:8", "2:8", "1:8", "1:8", "1:8", "1:8"]


def test_finetune_phase_freezes_masks_and_pruned_weights():
    model = _mlp()
    opts = {"decay": "exp", "decay_rate": 0.5, "finetune_fraction": 0.5}
    sp = Sparsifier("progressive", "2:4", _everything(), method_options=opts)
    sp.prepare(model, total_steps=10)
    _run(model, sp, 0, 5)
    layer = sp.layers["0"]
    assert layer.parametrization.dense_factor == 0.0 and layer.parametrization.rule == "masked"
    mask = layer.mask.clone()
    pruned_before = layer.dense_weight.detach()[~mask].clone()
    _run(model, sp, 5, 10, lr=0.5)
    assert torch.equal(layer.mask, mask)
    assert torch.equal(layer.dense_weight.detach()[~mask], pruned_before)


def test_per_slice_patterns_do_not_leak_between_layers(tiny_vit):
    """Regression (reference code P-8): qkv's own pattern must not overwrite the MLP's."""
    selection = Selection(layers=("ff", "qkv"), rules=(Rule.parse("re:.*attn\\.qkv=2:4,2:4,1:4"),))
    sp = Sparsifier("progressive", "1:8", selection, method_options={"decay": "step", "stages": "stepwise"})
    sp.prepare(tiny_vit, total_steps=40)
    method = sp.method
    assert [_texts(s) for s in method.stage_lists["blocks.0.attn.qkv"]] == [
        ["3:4", "2:4"],
        ["3:4", "2:4"],
        ["3:4", "2:4", "1:4"],
    ]
    assert [_texts(s) for s in method.stage_lists["blocks.0.mlp.fc1"]] == [["7:8", "4:8", "2:8", "1:8"]]
    assert _texts(method.patterns_at("blocks.0.attn.qkv", 39)) == ["2:4", "2:4", "1:4"]
    assert _texts(method.patterns_at("blocks.1.mlp.fc2", 39)) == ["1:8"]
    # q, k: 2 frames starting at 0, 20; v: 3 frames starting at 0, 13, 26
    assert _texts(method.patterns_at("blocks.0.attn.qkv", 14)) == ["3:4", "3:4", "2:4"]
    assert _texts(sp.layers["blocks.0.attn.qkv"].patterns) == ["3:4", "3:4", "3:4"]


def test_schedule_state_survives_a_resume_mid_stage():
    """Regression (reference code P-9): stage patterns and d(t) come back after a restore."""
    opts = {"decay": "exp", "decay_rate": 0.05, "stages": "stepwise", "dense_fraction": 0.1}
    model = _mlp()
    sp = Sparsifier("progressive", "1:8", _everything(), method_options=opts)
    sp.prepare(model, total_steps=60)
    _run(model, sp, 0, 30)
    state, weights = sp.state_dict(), {k: v.clone() for k, v in model.state_dict().items()}

    resumed_model = _mlp()
    resumed = Sparsifier("progressive", "1:8", _everything(), method_options=opts)
    resumed.prepare(resumed_model, total_steps=60)
    resumed_model.load_state_dict(weights)
    resumed.load_state_dict(state)
    for fqn, layer in sp.layers.items():
        other = resumed.layers[fqn]
        assert other.patterns == layer.patterns and torch.equal(other.mask, layer.mask)
        assert other.parametrization.dense_factor == layer.parametrization.dense_factor
    _run(model, sp, 30, 45)
    _run(resumed_model, resumed, 30, 45)
    for fqn, layer in sp.layers.items():
        assert torch.equal(resumed.layers[fqn].mask, layer.mask)
        assert str(layer.patterns[0]) == "2:8"

    longer = Sparsifier("progressive", "1:8", _everything(), method_options=opts)
    longer.prepare(_mlp(), total_steps=80)
    with pytest.raises(MethodError, match="spans 60 steps"):
        longer.load_state_dict(state)


def test_errors_are_raised_not_swallowed():
    """Regression (reference code P-7): a schedule that cannot apply fails loudly at prepare."""
    with pytest.raises(MethodError, match="run length"):
        Sparsifier("progressive", "2:4", _everything(), method_options={"dense_fraction": 0.2}).prepare(_mlp())
    geometric = Sparsifier("progressive", "1:8", _everything(), method_options={"stages": "geometric"})
    with pytest.raises(MethodError, match="8:64 does not fit"):
        geometric.prepare(_mlp(16), total_steps=10)
    explicit = {"stages": "explicit", "stage_patterns": ["4:8", "2:8"]}
    with pytest.raises(MethodError, match="end the list at the target"):
        Sparsifier("progressive", "1:8", _everything(), method_options=explicit).prepare(_mlp(), total_steps=10)
    with pytest.raises(ValueError, match="no sparse phase"):
        build_method("progressive", {"dense_fraction": 0.5, "finetune_fraction": 0.5})
    with pytest.raises(ValueError, match="exactly when stages is 'explicit'"):
        build_method("progressive", {"stage_patterns": ["2:4"]})


def test_explicit_stages_and_srste_baseline_rule():
    opts = {"decay": "step", "stages": "explicit", "stage_patterns": ["6:8", "3:8", "2:8"], "pruned_decay": 2e-4}
    model = _mlp()
    sp = Sparsifier("progressive", "2:8", _everything(), method_options=opts)
    sp.prepare(model, total_steps=30)
    seen = []
    for step in range(30):
        _run(model, sp, step, step + 1)
        seen.append(str(sp.layers["0"].patterns[0]))
    assert seen[8] == "6:8" and seen[9] == "3:8" and seen[19] == "2:8"
    assert sp.layers["0"].parametrization.rule == "srste" and sp.layers["0"].parametrization.decay == 2e-4
