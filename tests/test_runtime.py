import copy

import numpy as np
import pytest
import torch
from torch import nn

from nmsparse.mask import compute_mask
from nmsparse.pattern import parse_pattern
from nmsparse.runtime import (
    FormatError,
    SparseConv2d,
    SparseLinear,
    convert,
    gemm_matrix,
    infer_pattern,
    load_compressed,
    pack_block,
    pack_nm,
    save_compressed,
    to_semi_structured,
)
from nmsparse.runtime.formats import pack_bits, unpack_bits

PATTERNS = ["2:4", "1:4", "2:8", "4:8", "1:8", "1x8:0.5", "1x16:0.25", "1x32:0.25"]


def _sparse(layer, spec):
    with torch.no_grad():
        layer.weight.mul_(compute_mask(layer.weight, parse_pattern(spec), absolute=True))
    return layer.eval()


def _rel(a, b):
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-12))


@pytest.mark.parametrize("spec", PATTERNS)
def test_pack_round_trip_is_exact(spec):
    pattern = parse_pattern(spec)
    for layer in (nn.Linear(64, 64), nn.Conv2d(32, 64, 3)):
        _sparse(layer, spec)
        if hasattr(pattern, "block"):
            matrix = gemm_matrix(layer.weight, "chw")
            packed = pack_block(matrix, pattern.block)
        else:
            matrix = gemm_matrix(layer.weight, "hwc")
            packed = pack_nm(matrix, pattern.n, pattern.m)
        assert torch.equal(packed.dense(), matrix.detach())
        assert packed.nbytes < matrix.numel() * 4 * (0.65 if pattern.density <= 0.5 else 1.0)


@pytest.mark.parametrize("spec", PATTERNS)
@pytest.mark.parametrize("batch", [1, 3, 8, 13])
def test_converted_layers_match_dense_with_zeros(spec, batch):
    torch.manual_seed(batch)
    layers = [nn.Linear(64, 64), nn.Conv2d(32, 64, 3, padding=1, stride=2), nn.Conv2d(32, 64, 1),
              nn.Conv2d(32, 64, 3, padding=2, dilation=2)]
    for layer in layers:
        dense = nn.Sequential(_sparse(layer, spec))
        sparse, rows = convert(copy.deepcopy(dense), {"0": spec})
        assert rows[0].converted and isinstance(sparse[0], (SparseLinear, SparseConv2d))
        if isinstance(layer, nn.Linear):
            x = torch.randn(batch, 5, 128)[:, :, ::2]  # non-contiguous, extra leading dim
        else:
            x = torch.randn(batch, 9, 9, 32).permute(0, 3, 1, 2)  # channels-last memory
        with torch.no_grad():
            assert _rel(sparse(x), dense(x)) < 1e-4


def test_infer_and_eligibility():
    model = nn.Sequential(_sparse(nn.Linear(64, 32), "1x16:0.25"), nn.ReLU(), _sparse(nn.Linear(32, 64), "2:8"),
                          nn.Conv2d(8, 8, 3, groups=2), nn.Linear(64, 64).to(torch.float64), nn.Linear(64, 64))
    assert str(infer_pattern(model[0].weight)) == "1x16:0.25"
    assert str(infer_pattern(model[2].weight)) == "2:8"
    assert infer_pattern(model[5].weight) is None
    _, rows = convert(model)
    by = {r.fqn: r for r in rows}
    assert by["0"].converted and by["2"].converted
    assert "grouped" in by["3"].reason and "dtype" in by["4"].reason and by["5"].reason == "dense (no pattern)"
    with pytest.raises(FormatError, match="more than 2 non-zeros"):
        pack_nm(torch.randn(4, 8), 2, 4)


def test_bit_packing_round_trip():
    rng = np.random.default_rng(0)
    for bits in (1, 2, 4, 8):
        values = rng.integers(0, 2**bits, size=1001).astype(np.uint8)
        assert np.array_equal(unpack_bits(pack_bits(values, bits), bits, values.size), values)


def test_compressed_export_is_small_and_loads_to_the_same_function(tmp_path):
    pytest.importorskip("timm")
    from nmsparse.cli.main import main
    from nmsparse.export import load_export

    assert main(["prune", "timm:resnet18", "--pattern", "2:4", "--out", str(tmp_path / "dense"), "--json"]) == 0
    report = save_compressed(tmp_path / "dense", tmp_path / "packed")
    assert report["ratio"] <= 0.60 and report["packed_layers"] > 0
    packed, manifest = load_compressed(tmp_path / "packed")
    dense, _ = load_export(tmp_path / "dense")
    assert manifest["layout"] == "compressed"
    assert sum(isinstance(m, SparseConv2d) for m in packed.modules()) == report["packed_layers"]
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert _rel(packed(x), dense.eval()(x)) < 1e-4


@pytest.mark.skipif(not torch.cuda.is_available(), reason="semi-structured 2:4 needs CUDA (cuSPARSELt/CUTLASS)")
def test_semi_structured_on_cuda():
    layer = _sparse(nn.Linear(128, 128), "2:4").half().cuda()
    model = nn.Sequential(layer)
    x = torch.randn(64, 128, dtype=torch.half, device="cuda")
    reference = model(x)
    assert to_semi_structured(model) == ["0"]
    assert _rel(model(x).float(), reference.float()) < 1e-2


def test_semi_structured_refuses_without_cuda():
    if torch.cuda.is_available():
        pytest.skip("CUDA present")
    with pytest.raises(RuntimeError, match="needs a CUDA GPU"):
        to_semi_structured(nn.Sequential(nn.Linear(4, 4)))


def test_bench_cli_writes_reports_and_rejects_bad_input(tmp_path, capsys):
    import json

    from nmsparse.cli.main import main

    assert main(["bench", "--batch", "x"]) == 2
    assert "--batch must be comma-separated integers" in capsys.readouterr().err
    assert main(["bench", "--pattern", "5:4"]) == 2
    code = main(["bench", "--case", "minilm ffn 1536->384", "--pattern", "1x16:0.25", "--batch", "3",
                 "--repeats", "3", "--out", str(tmp_path)])
    assert code == 0
    report = json.loads((tmp_path / "bench_layers.json").read_text())
    row = report["rows"][0]
    assert row["batch"] == 3 and row["max_rel_error"] < 1e-4 and row["speedup"] > 0
    assert row["weight_bytes_sparse"] < row["weight_bytes_dense"] / 2
    assert (tmp_path / "bench_layers.md").read_text().count("|") > 10 and (tmp_path / "bench_layers.png").stat().st_size > 0
