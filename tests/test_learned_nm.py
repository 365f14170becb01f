import math

import pytest
import torch
from torch import nn

from nmsparse.mask import is_nm, nm_mask
from nmsparse.method import MethodError
from nmsparse.method.learned_nm import LearnedMask, pattern_table
from nmsparse.pattern import NMPattern, parse_pattern
from nmsparse.select import Selection
from nmsparse.sparsifier import Sparsifier

from .conftest import train_steps


class ConvBN(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 16, 3, padding=1)
        self.bn2 = nn.BatchNorm2d(16)
        self.fc = nn.Linear(16, 8)

    def forward(self, x):
        x = torch.relu(self.bn1(self.conv1(x)))
        x = torch.relu(self.bn2(self.conv2(x)))
        return self.fc(x.mean((2, 3)))


def _train(model, sp, steps, lr=0.5):
    model.train()
    train_steps(
        model,
        sp,
        steps,
        (8, 3, 8, 8),
        loss=lambda m, x: nn.functional.cross_entropy(m(x), torch.randint(0, 8, (8,))),
        optimizer=lambda params: torch.optim.AdamW(params, lr=lr, weight_decay=1e-4),
    )


def test_pattern_table():
    table = pattern_table(2, 4)
    assert table.shape == (6, 4) and bool((table.sum(1) == 2).all()) and len({tuple(r.tolist()) for r in table}) == 6
    assert pattern_table(4, 8).shape == (math.comb(8, 4), 8)


@pytest.mark.parametrize("spec", ["2:4", "1:4", "2:8", "2:4@flat", "4:16"])
def test_every_sample_is_a_valid_pattern_and_argmax_starts_at_magnitude(spec):
    pattern = parse_pattern(spec)
    weight = torch.randn(8, 16, 3, 3)
    relax = "patterns" if math.comb(pattern.m, pattern.n) <= 70 else "topn"
    module = LearnedMask(weight, pattern, relax, "magnitude", 3.0)
    assert torch.equal(module.mask, nm_mask(weight, pattern, absolute=True))  # logits start at the magnitude mask
    module.train()
    for _ in range(5):
        sampled = module(torch.ones_like(weight))
        assert is_nm(sampled, pattern) and set(sampled.unique().tolist()) <= {0.0, 1.0}
    module.eval()
    first = module(weight)
    assert torch.equal(first, module(weight))  # eval is deterministic (argmax), not a random draw
    assert torch.equal(first, weight * module.mask)


def test_gradient_reaches_logits_only_through_the_soft_sample():
    weight = torch.randn(4, 8)
    module = LearnedMask(weight, NMPattern(2, 4), "patterns", "uniform", 0.0)
    module.train()
    (module(weight) * torch.randn(4, 8)).sum().backward()
    assert module.logits.grad is not None and module.logits.grad.abs().sum() > 0
    assert not module.table.requires_grad  # the pattern table is a constant


def test_masks_mode_keeps_weights_and_bn_statistics_bit_identical():
    torch.manual_seed(0)
    model = ConvBN()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    sp = Sparsifier("learned_nm", "2:4", Selection(keep_first_conv=False, keep_classifier=False))
    sp.prepare(model, total_steps=10)
    masks0 = {f: layer.mask.clone() for f, layer in sp.layers.items()}
    _train(model, sp, 10)
    changed = any(not torch.equal(masks0[f], layer.mask) for f, layer in sp.layers.items())
    assert changed, "the masks did not learn anything"
    for _fqn, layer in sp.layers.items():
        assert is_nm(layer.dense_weight * layer.mask, NMPattern(2, 4))
    sp.squash()
    after = model.state_dict()
    for key, value in before.items():
        if key.endswith("weight") and key.split(".")[0] in ("conv1", "conv2", "fc"):
            masked = after[key]
            assert torch.equal(masked[masked != 0], value[masked != 0])  # kept weights untouched
        else:
            assert torch.equal(after[key], value), key  # biases, BN affine and running stats untouched


def test_bn_stats_update_when_not_frozen_and_weights_train_together():
    torch.manual_seed(0)
    model = ConvBN()
    mean0 = model.bn2.running_mean.clone()
    sp = Sparsifier("learned_nm", "2:4", Selection(), method_options={"train": "masks_and_weights"})
    sp.prepare(model, total_steps=4)
    w0 = sp.layers["conv2"].dense_weight.detach().clone()
    _train(model, sp, 4, lr=0.01)
    assert not torch.equal(model.bn2.running_mean, mean0)
    assert not torch.equal(sp.layers["conv2"].dense_weight.detach(), w0)


def test_temperature_anneal_and_errors(tiny_vit):
    sp = Sparsifier("learned_nm", "2:4", Selection(), method_options={"temperature": 2.0, "temperature_end": 0.5})
    sp.prepare(ConvBN(), total_steps=10)
    assert sp.method.temperature_at(0) == 2.0 and sp.method.temperature_at(10) == pytest.approx(0.5)
    assert sp.method.temperature_at(5) == pytest.approx(1.0)
    sp.step(4)
    assert all(layer.parametrization.temperature == pytest.approx(1.0) for layer in sp.layers.values())
    from nmsparse.select import Rule

    bad = Sparsifier("learned_nm", "2:4", Selection(layers=("qkv",), rules=(Rule.parse("re:.*qkv=2:4,2:4,1:4"),)))
    with pytest.raises(MethodError, match="one n:m pattern per layer"):
        bad.prepare(tiny_vit)


def test_padded_im2col_groups_on_a_stem_conv(tmp_path):
    """'2:4@flat+pad': a 3x7x7 stem (147 columns per row) is padded to 148 instead of skipped."""
    from nmsparse.export import load_export, save_export

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 7, padding=3), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1))
    fresh = copy_of(model)
    plain = Sparsifier("learned_nm", "2:4@flat", Selection(keep_first_conv=False))
    plain.prepare(copy_of(model), total_steps=4)
    assert "0" not in plain.layers  # not a multiple of 4: skipped with the reason
    sp = Sparsifier("learned_nm", "2:4@flat+pad", Selection(keep_first_conv=False))
    sp.prepare(model, total_steps=4)
    assert "0" in sp.layers and str(sp.layers["0"].patterns[0]) == "2:4@flat+pad"
    pattern = parse_pattern("2:4@flat+pad")
    for _ in range(3):
        sample = sp.layers["0"].parametrization(torch.ones(8, 3, 7, 7))
        assert is_nm(sample, pattern)
    rows = sp.layers["0"].mask.reshape(8, -1)
    assert rows.shape[1] == 147 and int(rows[:, 144:].sum(1).max()) <= 2  # the last group spans the pad
    entries = sp.squash()
    out = save_export(model, tmp_path / "e", entries, {"source": "test", "options": {}})
    reloaded, manifest = load_export(out, model=fresh)
    assert {e["pattern"] for e in manifest["layers"]} == {"2:4@flat+pad"}


def copy_of(model):
    import copy

    return copy.deepcopy(model)


def test_init_masks_start_from_a_one_shot_export_and_bad_files_are_refused(tmp_path):
    """init_masks: every layer's argmax pattern at the start is the export's mask (its nonzeros), the
    weights stay the dense ones; a missing file, a missing layer or a shape mismatch is a MethodError."""
    from safetensors.torch import save_file

    model = nn.Sequential(nn.Linear(16, 8), nn.ReLU(), nn.Linear(8, 4))
    g = torch.Generator().manual_seed(0)
    exported = {}
    for name, layer in (("0", model[0]), ("2", model[2])):
        keep = nm_mask(torch.rand(layer.weight.shape, generator=g), NMPattern(2, 4))  # not the magnitude mask
        exported[f"{name}.weight"] = (layer.weight.detach() * keep).contiguous()
    (tmp_path / "export").mkdir()
    save_file(exported, str(tmp_path / "export" / "model.safetensors"))
    dense = [layer.weight.detach().clone() for layer in (model[0], model[2])]
    sp = Sparsifier("learned_nm", "2:4", Selection(keep_classifier=False),
                    method_options={"init_masks": str(tmp_path / "export")})
    sp.prepare(model)
    for fqn, layer in sp.layers.items():
        assert torch.equal(layer.parametrization.mask, exported[f"{fqn}.weight"] != 0), fqn
    assert torch.equal(model[0].parametrizations.weight.original, dense[0])
    with pytest.raises(MethodError, match="no .*none"):
        Sparsifier("learned_nm", "2:4", Selection(keep_classifier=False),
                   method_options={"init_masks": str(tmp_path / "none")}).prepare(nn.Sequential(nn.Linear(16, 8)))
    save_file({"0.weight": torch.zeros(8, 8)}, str(tmp_path / "wrong.safetensors"))
    with pytest.raises(MethodError, match="is \\(8, 8\\)"):
        Sparsifier("learned_nm", "2:4", Selection(keep_classifier=False),
                   method_options={"init_masks": str(tmp_path / "wrong.safetensors")}).prepare(
            nn.Sequential(nn.Linear(16, 8)))
    with pytest.raises(MethodError, match="has no 1.weight"):
        Sparsifier("learned_nm", "2:4", Selection(keep_classifier=False),
                   method_options={"init_masks": str(tmp_path / "wrong.safetensors")}).prepare(
            nn.Sequential(nn.ReLU(), nn.Linear(16, 8)))
