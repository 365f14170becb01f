"""Folding batch norm and ReLU into sparse layers (nmsparse.runtime.fuse)."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from nmsparse.mask import compute_mask
from nmsparse.pattern import parse_pattern
from nmsparse.runtime import convert, fuse
from nmsparse.runtime.formats import pack_block, pack_nm
from nmsparse.runtime.fuse import scale_rows
from nmsparse.runtime.modules import SparseConv2d, SparseLinear


def _rel(a, b):
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-12))


def _randomise_bn(model: nn.Module, seed: int = 0) -> None:
    gen = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.copy_(torch.randn(m.num_features, generator=gen) * 0.3)
            m.running_var.copy_(torch.rand(m.num_features, generator=gen) + 0.5)
            if m.weight is not None:
                m.weight.data.copy_(torch.randn(m.num_features, generator=gen))
                m.bias.data.copy_(torch.randn(m.num_features, generator=gen) * 0.2)


def _prune(model: nn.Module, spec: str) -> dict[str, str]:
    patterns = {}
    with torch.no_grad():
        for name, m in model.named_modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)) and m.weight.shape[1] >= 16:
                m.weight.mul_(compute_mask(m.weight, parse_pattern(spec), absolute=True))
                patterns[name] = spec
    return patterns


class Net(nn.Module):
    """conv-bn-relu, conv-(identity)-bn, conv-relu, a conv read twice, a ReLU module used twice."""

    def __init__(self) -> None:
        super().__init__()
        self.c1, self.b1, self.a1 = nn.Conv2d(16, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(inplace=True)
        self.c2, self.gap, self.b2 = nn.Conv2d(32, 32, 3, padding=1, bias=False), nn.Identity(), nn.BatchNorm2d(32)
        self.c3, self.a3 = nn.Conv2d(32, 32, 1), nn.ReLU()
        self.c4, self.b4 = nn.Conv2d(32, 32, 1), nn.BatchNorm2d(32)
        self.shared = nn.ReLU()
        self.c5 = nn.Conv2d(32, 32, 1)
        self.fc, self.fa = nn.Linear(32, 16), nn.ReLU()

    def forward(self, x):
        x = self.a1(self.b1(self.c1(x)))
        x = self.b2(self.gap(self.c2(x)))
        x = self.a3(self.c3(x))
        y = self.c4(x)
        x = self.b4(y) + y  # c4's output is read twice: nothing may be folded into it
        x = self.shared(x)
        x = self.shared(self.c5(x))  # a module called twice is never absorbed
        return self.fa(self.fc(x.mean((2, 3))))


@pytest.mark.parametrize("spec", ["1x16:0.25", "2:4", "1x8:0.5"])
@pytest.mark.parametrize("batch", [1, 3])
def test_fused_model_matches_the_dense_model(spec, batch):
    torch.manual_seed(batch)
    dense = Net().eval()
    _randomise_bn(dense)
    patterns = _prune(dense, spec)
    sparse, rows = convert(copy.deepcopy(dense), patterns)
    fused = {r.fqn: r.fused for r in rows}
    assert fused["c1"] == ["b1", "a1"] and fused["c2"] == ["b2"] and fused["c3"] == ["a3"]
    assert fused["fc"] == ["fa"] and fused["c4"] == [] and fused["c5"] == []
    for name in ("b1", "a1", "b2", "a3", "fa"):
        assert isinstance(sparse.get_submodule(name), nn.Identity), name
    for name in ("b4", "shared"):
        assert not isinstance(sparse.get_submodule(name), nn.Identity), name
    assert sparse.c1.activation == "relu" and sparse.c2.activation is None and sparse.fc.activation == "relu"
    x = torch.randn(batch, 16, 9, 7)
    with torch.no_grad():
        assert _rel(sparse(x), dense(x)) < 1e-4


def test_fusion_can_be_turned_off_and_keeps_the_state_dict():
    dense = Net().eval()
    patterns = _prune(dense, "1x16:0.25")
    sparse, rows = convert(copy.deepcopy(dense), patterns, fuse=False)
    assert all(not r.fused for r in rows)
    assert isinstance(sparse.b1, nn.BatchNorm2d) and sparse.c1.activation is None
    assert "b1.running_mean" in sparse.state_dict()


def test_scale_rows_scales_each_output_row_of_both_layouts():
    torch.manual_seed(0)
    for spec in ("1x16:0.25", "2:4", "1:8"):
        pattern = parse_pattern(spec)
        w = torch.randn(48, 272)
        w.mul_(compute_mask(w, pattern, absolute=True))
        packed = pack_block(w, pattern.block) if hasattr(pattern, "block") else pack_nm(w, pattern.n, pattern.m)
        scale = torch.rand(48) + 0.5
        scale_rows(packed, scale.numpy())
        assert torch.allclose(packed.dense(), w * scale[:, None], rtol=1e-6, atol=0)


def test_untraceable_models_are_left_alone_with_a_reason():
    class Dynamic(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv, self.bn = nn.Conv2d(16, 32, 1), nn.BatchNorm2d(32)

        def forward(self, x):
            if x.sum() > 0:  # data-dependent branch: torch.fx cannot trace it
                return self.bn(self.conv(x))
            return self.bn(self.conv(-x))

    model = Dynamic().eval()
    _randomise_bn(model)
    patterns = _prune(model, "1x16:0.25")
    sparse, _ = convert(copy.deepcopy(model), patterns, fuse=False)
    result = fuse(sparse)
    assert not result.fused and "torch.fx" in result.reason
    assert isinstance(sparse.bn, nn.BatchNorm2d)
    x = torch.randn(2, 16, 5, 5)
    with torch.no_grad():
        assert _rel(sparse(x), model(x)) < 1e-4


def test_timm_resnet_folds_its_batch_norms_and_keeps_its_outputs():
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    dense = timm.create_model("resnet18", pretrained=False, num_classes=16).eval()
    _randomise_bn(dense)
    patterns = {k: v for k, v in _prune(dense, "1x16:0.25").items() if k not in ("conv1", "fc")}
    sparse, rows = convert(copy.deepcopy(dense), patterns, infer=False)
    converted = [r for r in rows if r.converted]
    assert converted and all(r.fused and r.fused[0].endswith(("bn1", "bn2", ".1")) for r in converted), \
        [(r.fqn, r.fused) for r in converted]
    # every batch norm after a converted conv is gone; the stem's (dense conv) stays
    remaining = [n for n, m in sparse.named_modules() if isinstance(m, nn.BatchNorm2d)]
    assert remaining == ["bn1"]
    assert sum(isinstance(m, (SparseConv2d, SparseLinear)) and m.activation == "relu" for m in sparse.modules()) == 8
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        assert _rel(sparse(x), dense(x)) < 1e-4
