import pytest
import torch
from torch import nn

from nmsparse.mask import block_row_counts, is_block_uniform
from nmsparse.method import MethodError, build_method
from nmsparse.method.block_1xn import block_row_mask, bpar_scores, ramp_schedule, regrow_count
from nmsparse.pattern import BlockPattern
from nmsparse.select import Selection
from nmsparse.sparsifier import Sparsifier
from nmsparse.train.plan import options_in_steps

from .conftest import train_steps


@pytest.mark.parametrize(
    "kind,expected",
    [  # the seed's curves for ramp_start 10, ramp_end 180 at epochs 30, 60, 95, 130, 160
        ("linear", [0.12, 0.29, 0.50, 0.71, 0.88]),
        ("cos", [0.02, 0.10, 0.29, 0.55, 0.82]),
        ("saturating_exp", [0.63, 0.92, 0.99, 1.0, 1.0]),
        ("cubic", [0.002, 0.025, 0.125, 0.35, 0.69]),
    ],
)
def test_ramp_matches_the_seed_curves(kind, expected):
    # in steps, with 50 steps per epoch (masks once per epoch): the seed's per-epoch values at epoch ends
    spe = 50
    ramp = ramp_schedule(kind, 10 * spe, 180 * spe, unit=spe)
    values = [ramp(e * spe) for e in (30, 60, 95, 130, 160)]
    assert values == pytest.approx(expected, abs=0.006)
    assert ramp(5 * spe) == 0.0 and ramp(180 * spe) == 1.0
    assert ramp_schedule(kind, 0, 0)(0) == 1.0
    assert all(ramp(s) <= ramp(s + 7) for s in range(0, 200 * spe, 97))  # monotone


def test_regrow_count_formula():
    # 64 input channels, p = 60/64: int((p - p rho) * 64)
    for rho in (0.0, 0.125, 0.5, 0.9, 1.0):
        assert regrow_count(60 / 64, rho, 64) == int((60 / 64 - 60 / 64 * rho) * 64)
    assert regrow_count(60 / 64, 0.0, 64) == 60 and regrow_count(60 / 64, 1.0, 64) == 0
    # by hand, where p C is fractional: p = 0.7, C = 7, rho = 0.1: (0.7 - 0.07) * 7 = 4.41 -> 4 (SUBP's
    # code); 90% of the int(4.9) = 4 pruned blocks would be 3.6 -> 3
    assert regrow_count(0.7, 0.1, 7) == 4
    # p = 0.7, C = 90, rho = 0.5: (0.7 - 0.35) * 90 = 31.499999999999996 -> 31
    assert regrow_count(0.7, 0.5, 90) == 31


def test_bpar_matches_a_hand_computation():
    # one block row (block 2, 1x1 kernel), three input channels: block vectors b0=(1,0), b1=(2,0), b2=(0,3)
    w = torch.tensor([[1.0, 2.0, 0.0], [0.0, 0.0, 3.0]]).reshape(2, 3, 1, 1)
    scores = bpar_scores(w, torch.ones(1, 3, dtype=torch.bool), block=2)
    l1 = torch.tensor([1.0, 2.0, 3.0])
    a = l1 / 6
    red = torch.tensor([2.0, 2.0, 1.0])  # |cos| sums: b0,b1 parallel (1+1+0), b2 orthogonal (0+0+1)
    b = red / 5
    assert torch.allclose(scores[0], a - b)
    # a pruned block is a zero vector: its redundancy share is 0 and is replaced by 1; its L1 share is
    # of the masked weights (V2: 0) or of the raw ones (V1)
    mask = torch.tensor([[True, True, False]])
    assert torch.allclose(bpar_scores(w, mask, block=2)[0, 2], torch.tensor(-1.0))
    assert torch.allclose(bpar_scores(w, mask, block=2, masked_l1=False)[0, 2], a[2] - 1.0)


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
    train_steps(model, sp, stop - start, (4, 3, 4, 4), start=start)


@pytest.mark.parametrize("criterion", ["l1", "l2", "bpar"])
@pytest.mark.parametrize("mode", ["soft", "hard"])
def test_epoch_cadence_ramp_and_uniform_rows(criterion, mode):
    model = _cnn()
    opts = options_in_steps({"criterion": criterion, "mode": mode, "ramp": "linear", "ramp_start_epoch": 1,
                             "ramp_end_epoch": 4, "update_every_epochs": 1}, steps_per_epoch=2)
    assert opts["ramp_start_step"] == 2 and opts["ramp_end_step"] == 8 and opts["update_every_steps"] == 2
    sp = Sparsifier("block_1xn", "1x8:0.25", Selection(), method_options=opts)
    sp.prepare(model, total_steps=12)  # 6 epochs
    layer = sp.layers["2"]
    kept = []
    for epoch in range(6):
        _train(model, sp, 2 * epoch, 2 * epoch + 2)
        counts = block_row_counts(layer.dense_weight * layer.mask, 8)
        kept.append(set(counts.tolist()))
    pattern = BlockPattern(8, 0.25)
    # kept blocks per row = 8 + regrow(24, rho(e)) at epochs 1..6: rho = 0, 1/3, 2/3, 1, 1, 1
    assert kept == [{8 + regrow_count(0.75, r, 32)} for r in (0.0, 1 / 3, 2 / 3, 1.0, 1.0, 1.0)]
    assert is_block_uniform(layer.dense_weight * layer.mask, pattern)
    assert layer.parametrization.rule == ("srste" if mode == "soft" else "masked")


def test_hard_mode_without_decay_gives_pruned_weights_no_gradient_and_soft_decays_them():
    for mode in ("hard", "soft"):
        model = _cnn()
        sp = Sparsifier("block_1xn", "1x8:0.5", Selection(),
                        method_options={"mode": mode, "hard_decay": False, "update_every_steps": 10})
        sp.prepare(model, total_steps=10)
        layer = sp.layers["2"]
        pruned = ~layer.mask
        w0 = layer.dense_weight.detach()[pruned].clone()
        _train(model, sp, 0, 3)
        moved = not torch.equal(layer.dense_weight.detach()[pruned], w0)
        assert moved == (mode == "soft")


def test_resume_gives_identical_masks():
    opts = {"ramp": "cubic", "ramp_start_step": 2, "ramp_end_step": 8, "criterion": "bpar", "update_every_steps": 2}
    model = _cnn()
    sp = Sparsifier("block_1xn", "1x8:0.25", Selection(), method_options=opts)
    sp.prepare(model, total_steps=12)
    _train(model, sp, 0, 4)
    state = sp.state_dict()
    other_model = _cnn()
    other = Sparsifier("block_1xn", "1x8:0.25", Selection(), method_options=opts)
    other.prepare(other_model, total_steps=12)
    other_model.load_state_dict(model.state_dict())
    other.load_state_dict(state)
    torch.manual_seed(1)
    _train(model, sp, 4, 8)
    torch.manual_seed(1)
    _train(other_model, other, 4, 8)
    for fqn in sp.layers:
        assert torch.equal(sp.layers[fqn].mask, other.layers[fqn].mask)


def test_errors():
    with pytest.raises(ValueError, match="ramp_start_step < ramp_end_step"):
        build_method("block_1xn", {"ramp_start_step": 10, "ramp_end_step": 5})
    with pytest.raises(ValueError, match="update_every_steps must be >= 1"):
        build_method("block_1xn", {"update_every_steps": 0})
    opts = {"ramp_start_step": 10, "ramp_end_step": 180}
    with pytest.raises(MethodError, match="not before the run's end"):
        Sparsifier("block_1xn", "1x8:0.25", Selection(), method_options=opts).prepare(_cnn(), total_steps=120)
    with pytest.raises(MethodError, match="needs a 1xN pattern"):
        Sparsifier("block_1xn", "2:4", Selection()).prepare(_cnn(), total_steps=100)
    with pytest.raises(ValueError, match="both ramp_start_epoch and ramp_start_step"):
        options_in_steps({"ramp_start_epoch": 1, "ramp_start_step": 3}, 10)
    with pytest.raises(ValueError, match="non-negative number of epochs"):
        options_in_steps({"ramp_start_epoch": "ten"}, 10)


def test_bpar_by_hand_in_both_variants():
    """One block row of three 2-long blocks [1, 0], [0, 2], [3, 4], the third pruned. Redundancy under the
    mask (both variants): unit vectors e0, e1, 0 -> sums 1, 1, 0 -> shares 0.5, 0.5, (0 -> 1).
    V1 L1 share of the raw blocks: 1/10, 2/10, 7/10; V2 of the masked ones: 1/3, 2/3, 0."""
    from nmsparse.method.block_1xn import bpar_scores

    weight = torch.tensor([[1.0, 0.0, 3.0], [0.0, 2.0, 4.0]]).reshape(
        2, 3, 1, 1
    )  # block 2: rows 0-1 form one block row
    mask = torch.tensor([[True, True, False]])
    v1 = bpar_scores(weight, mask, 2, masked_l1=False)
    v2 = bpar_scores(weight, mask, 2, masked_l1=True)
    assert torch.allclose(v1, torch.tensor([[0.1 - 0.5, 0.2 - 0.5, 0.7 - 1.0]]))
    assert torch.allclose(v2, torch.tensor([[1 / 3 - 0.5, 2 / 3 - 0.5, 0.0 - 1.0]]))


@pytest.mark.parametrize("score_masked", [False, True])
def test_bpar_uses_the_current_mask_in_both_variants(score_masked, monkeypatch):
    """V1 (score_masked false) scores raw weights but still applies the current block mask in the
    redundancy term, as SUBP's V1 does."""
    from nmsparse.method import block_1xn

    seen: list = []
    real = block_1xn.bpar_scores
    monkeypatch.setattr(block_1xn, "bpar_scores", lambda w, m, b, a, masked_l1: seen.append((m.clone(), masked_l1))
                        or real(w, m, b, a, masked_l1))
    model = _cnn()
    sp = Sparsifier("block_1xn", "1x8:0.5", Selection(), method_options={
        "criterion": "bpar", "score_masked": score_masked, "update_every_steps": 2})
    sp.prepare(model, total_steps=8)
    _train(model, sp, 0, 2)  # the epoch-end update scores with the mask set at prepare
    mask, masked_l1 = seen[-1]
    assert masked_l1 is score_masked and not bool(mask.all())


def test_kept_blocks_per_row_round_as_subp():
    """SUBP prunes floor(p * C) blocks per row: keeping half of 5 keeps 3, not round(2.5) = 2."""
    from nmsparse.pattern import BlockPattern

    assert BlockPattern(16, 0.5).kept_per_row(5) == 3
    assert BlockPattern(16, 0.25).kept_per_row(64) == 16 and BlockPattern(16, 0.25).kept_per_row(6) == 2
    assert BlockPattern(16, 0.01).kept_per_row(8) == 1  # at least one block
    # p = 0.7 of 90: SUBP's int(0.7 * 90) = int(62.99999999999999) = 62 pruned, 28 kept (by hand)
    assert BlockPattern(16, 0.3).kept_per_row(90) == 28 and BlockPattern(16, 0.3).kept_per_row(10) == 3


def test_hard_mode_decays_pruned_weights_as_hubp_unless_turned_off():
    from nmsparse.grad import apply_rule

    w = torch.tensor([[4.0, -3.0, 2.0, 1.0]], requires_grad=True)
    mask = torch.tensor([[True, False, True, False]])
    g = torch.tensor([[0.1, 0.2, 0.3, 0.4]])
    apply_rule("masked", w, mask, 0.0, 0.5).backward(g)
    assert torch.allclose(w.grad, torch.tensor([[0.1, 0.5 * -3.0, 0.3, 0.5 * 1.0]]))  # g*M + 0.5*(1-M)*W
    for hard_decay, expected in ((True, 2e-4), (False, 0.0)):
        model = _cnn()
        sp = Sparsifier("block_1xn", "1x8:0.5", Selection(), method_options={
            "mode": "hard", "hard_decay": hard_decay})
        sp.prepare(model, total_steps=8)
        layer = sp.layers["2"]
        assert layer.parametrization.rule == "masked" and layer.parametrization.decay == expected
