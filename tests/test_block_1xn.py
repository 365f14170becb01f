import pytest
import torch
from torch import nn

from nmsparse.mask import block_row_counts, is_block_uniform
from nmsparse.method import MethodError, build_method
from nmsparse.method.block_1xn import block_row_mask, bpar_scores, ramp_value, regrow_count
from nmsparse.pattern import BlockPattern
from nmsparse.select import Selection
from nmsparse.sparsifier import Sparsifier


@pytest.mark.parametrize(
    "kind,expected",
    [  # the seed's curves for ramp_start 10, ramp_end 180 at epochs 30, 60, 95, 130, 160
        ("linear", [0.12, 0.29, 0.50, 0.71, 0.88]),
        ("cos", [0.02, 0.10, 0.29, 0.55, 0.82]),
        ("exp", [0.63, 0.92, 0.99, 1.0, 1.0]),
        ("cubic", [0.002, 0.025, 0.125, 0.35, 0.69]),
    ],
)
def test_ramp_matches_the_seed_curves(kind, expected):
    values = [ramp_value(kind, e, 10, 180) for e in (30, 60, 95, 130, 160)]
    assert values == pytest.approx(expected, abs=0.006)
    assert ramp_value(kind, 5, 10, 180) == 0.0 and ramp_value(kind, 180, 10, 180) == 1.0
    assert ramp_value(kind, 0, 0, 0) == 1.0


def test_regrow_count_formula():
    # 64 input channels, p = 60/64: floor((p - p rho) * 64)
    for rho in (0.0, 0.125, 0.5, 0.9, 1.0):
        assert regrow_count(60, rho) == int((60 / 64 - 60 / 64 * rho) * 64 + 1e-9)
    assert regrow_count(60, 0.0) == 60 and regrow_count(60, 1.0) == 0


def test_bpar_matches_a_hand_computation():
    # one block row (block 2, 1x1 kernel), three input channels: block vectors b0=(1,0), b1=(2,0), b2=(0,3)
    w = torch.tensor([[1.0, 2.0, 0.0], [0.0, 0.0, 3.0]]).reshape(2, 3, 1, 1)
    scores = bpar_scores(w, torch.ones(1, 3, dtype=torch.bool), block=2)
    l1 = torch.tensor([1.0, 2.0, 3.0])
    a = l1 / 6
    red = torch.tensor([2.0, 2.0, 1.0])  # |cos| sums: b0,b1 parallel (1+1+0), b2 orthogonal (0+0+1)
    b = red / 5
    assert torch.allclose(scores[0], a - b)
    # a pruned block is a zero vector: its redundancy share is 0 and is replaced by 1
    masked = bpar_scores(w, torch.tensor([[True, True, False]]), block=2)
    assert torch.allclose(masked[0, 2], a[2] - 1.0)


def test_block_row_mask_keeps_uniform_rows_and_regrows_exactly():
    scores = torch.rand(6, 32)
    gen = torch.Generator().manual_seed(0)
    mask = block_row_mask(scores, pruned=24, regrow=5, temperature=1.0, generator=gen)
    assert mask.sum(1).tolist() == [8 + 5] * 6
    top = torch.topk(scores, 8, dim=1).indices
    assert bool(torch.gather(mask, 1, top).all())  # the deterministic top part is always kept


def _cnn():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 32, 3, padding=1), nn.ReLU(), nn.Conv2d(32, 32, 3, padding=1), nn.ReLU(),
                         nn.Conv2d(32, 64, 1), nn.Flatten(), nn.Linear(64 * 16, 10))


def _train(model, sp, start, stop):
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    for step in range(start, stop):
        x = torch.randn(4, 3, 4, 4)
        loss = model(x).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        sp.step(step)


@pytest.mark.parametrize("criterion", ["l1", "l2", "bpar"])
@pytest.mark.parametrize("mode", ["soft", "hard"])
def test_epoch_cadence_ramp_and_uniform_rows(criterion, mode):
    model = _cnn()
    opts = {"criterion": criterion, "mode": mode, "ramp": "linear", "ramp_start_epoch": 1, "ramp_end_epoch": 4}
    sp = Sparsifier("block_1xn", "1x8:0.25", Selection(), method_options=opts)
    sp.prepare(model, total_steps=12, steps_per_epoch=2)  # 6 epochs
    layer = sp.layers["2"]
    kept = []
    for epoch in range(6):
        _train(model, sp, 2 * epoch, 2 * epoch + 2)
        counts = block_row_counts(layer.dense_weight * layer.mask, 8)
        kept.append(set(counts.tolist()))
    pattern = BlockPattern(8, 0.25)
    # kept blocks per row = 8 + regrow(24, rho(e)) at epochs 1..6: rho = 0, 1/3, 2/3, 1, 1, 1
    assert kept == [{8 + regrow_count(24, r)} for r in (0.0, 1 / 3, 2 / 3, 1.0, 1.0, 1.0)]
    assert is_block_uniform(layer.dense_weight * layer.mask, pattern)
    assert layer.parametrization.rule == ("srste" if mode == "soft" else "masked")


def test_hard_mode_gives_pruned_weights_no_gradient_and_soft_decays_them():
    for mode in ("hard", "soft"):
        model = _cnn()
        sp = Sparsifier("block_1xn", "1x8:0.5", Selection(),
                        method_options={"mode": mode, "ramp_start_epoch": 0, "ramp_end_epoch": 0})
        sp.prepare(model, total_steps=10, steps_per_epoch=10)
        layer = sp.layers["2"]
        pruned = ~layer.mask
        w0 = layer.dense_weight.detach()[pruned].clone()
        _train(model, sp, 0, 3)
        moved = not torch.equal(layer.dense_weight.detach()[pruned], w0)
        assert moved == (mode == "soft")


def test_resume_gives_identical_masks():
    opts = {"ramp": "cubic", "ramp_start_epoch": 1, "ramp_end_epoch": 4, "criterion": "bpar"}
    model = _cnn()
    sp = Sparsifier("block_1xn", "1x8:0.25", Selection(), method_options=opts)
    sp.prepare(model, total_steps=12, steps_per_epoch=2)
    _train(model, sp, 0, 4)
    state = sp.state_dict()
    other_model = _cnn()
    other = Sparsifier("block_1xn", "1x8:0.25", Selection(), method_options=opts)
    other.prepare(other_model, total_steps=12, steps_per_epoch=2)
    other_model.load_state_dict(model.state_dict())
    other.load_state_dict(state)
    torch.manual_seed(1)
    _train(model, sp, 4, 8)
    torch.manual_seed(1)
    _train(other_model, other, 4, 8)
    for fqn in sp.layers:
        assert torch.equal(sp.layers[fqn].mask, other.layers[fqn].mask)


def test_errors():
    with pytest.raises(ValueError, match="ramp_start_epoch < ramp_end_epoch"):
        build_method("block_1xn", {"ramp_start_epoch": 10, "ramp_end_epoch": 5})
    with pytest.raises(MethodError, match="not before the run's end"):
        Sparsifier("block_1xn", "1x8:0.25", Selection()).prepare(_cnn(), total_steps=120, steps_per_epoch=1)
    with pytest.raises(MethodError, match="needs a 1xN pattern"):
        Sparsifier("block_1xn", "2:4", Selection()).prepare(_cnn(), total_steps=100, steps_per_epoch=1)
    sp = Sparsifier("block_1xn", "1x8:0.25", Selection(), method_options={"ramp_start_epoch": 0, "ramp_end_epoch": 0})
    with pytest.raises(MethodError, match="steps_per_epoch"):
        sp.prepare(_cnn())
        sp.step(0)
