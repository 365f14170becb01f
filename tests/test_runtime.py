import copy
import itertools

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


def _runnable() -> list[str]:
    from nmsparse.runtime import _native

    return _native.runnable_variants()


RUNNABLE = _runnable()


def _sparse(layer, spec):
    with torch.no_grad():
        layer.weight.mul_(compute_mask(layer.weight, parse_pattern(spec), absolute=True))
    return layer.eval()


def _rel(a, b):
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-12))


@pytest.mark.parametrize("spec", ["1x16:0.25", "2:4"])
def test_convs_run_without_im2col(monkeypatch, spec):
    """Convolutions go through the implicit GEMM (no im2col buffer), strided ones through phase
    planes; 1xN and n:m, with the bias, any batch, odd sizes."""
    from nmsparse.runtime import _native

    if not _native.available():
        pytest.skip(f"C++ kernels unavailable here: {_native.status()['reason']}")

    def no_im2col(*args, **kwargs):
        raise AssertionError("im2col called for a convolution the implicit GEMM handles")

    monkeypatch.setattr(_native, "im2col", no_im2col)
    torch.manual_seed(0)
    for layer, size in [(nn.Conv2d(16, 32, 3, padding=1), (7, 7)), (nn.Conv2d(16, 32, 5, padding=1), (6, 9)),
                        (nn.Conv2d(16, 32, 3, padding=2, dilation=2, bias=False), (8, 5)),
                        (nn.Conv2d(16, 32, 3, stride=2, padding=1), (9, 8)),
                        (nn.Conv2d(16, 32, (3, 5), stride=(2, 3), padding=(1, 2)), (11, 13)),
                        (nn.Conv2d(16, 32, 3, stride=2, padding=2, dilation=2), (10, 7)),
                        (nn.Conv2d(16, 32, 2, stride=2), (8, 8))]:
        dense = nn.Sequential(_sparse(layer, spec))
        sparse, _ = convert(copy.deepcopy(dense), {"0": spec})
        for batch in (1, 2):
            x = torch.randn(batch, 16, *size)
            with torch.no_grad():
                y = sparse(x)
                assert y.is_contiguous() and y.shape == dense(x).shape
                assert _rel(y, dense(x)) < 1e-5


@pytest.mark.parametrize("variant", RUNNABLE)
def test_implicit_gemm_convolution_matches_conv2d_in_both_builds(variant):
    """_native.implicit_conv (phase planes + offsets) against F.conv2d, 1xN and n:m, with bias and ReLU."""
    from nmsparse.runtime import _native

    if _native.library(variant) is None:
        pytest.skip(f"C++ kernels unavailable here: {_native.status()['reason']}")
    torch.manual_seed(3)
    geometries = [(3, (1, 1), (1, 1), (1, 1), (6, 7)), (3, (2, 2), (1, 1), (1, 1), (9, 8)),
                  (5, (2, 1), (2, 0), (1, 2), (10, 11))]
    layouts = [("1x16:0.25", "chw"), ("2:4", "hwc"), ("1:8", "hwc"), ("2:4", "chw")]
    for (k, stride, padding, dilation, size), (spec, order) in itertools.product(geometries, layouts):
        conv = _sparse(nn.Conv2d(16, 32, k, stride, padding, dilation), spec)
        matrix = gemm_matrix(conv.weight.detach(), order)
        pattern = parse_pattern(spec)
        if hasattr(pattern, "block"):
            packed = pack_block(matrix, pattern.block)
        else:
            if order == "chw":  # n:m along the flattened columns: prune that matrix itself
                matrix = matrix * compute_mask(matrix, pattern, absolute=True)
                conv.weight.data.copy_(matrix.view_as(conv.weight))
            packed = pack_nm(matrix, pattern.n, pattern.m)
        for batch in (1, 3):
            x = torch.randn(batch, 16, *size)
            y = _native.implicit_conv(x, _native.arrays_of(packed), (k, k), stride, padding, dilation, order,
                                      conv.bias.detach(), True, lib=_native.library(variant))
            with torch.no_grad():
                ref = torch.relu(conv(x))
            assert _rel(y.transpose(0, 1), ref) < 1e-5, (k, stride, spec, order, batch)


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
              nn.Conv2d(32, 64, 3, padding=2, dilation=2), nn.Conv2d(32, 64, 3, padding=1),
              nn.Conv2d(32, 64, (3, 5), padding=(0, 2))]
    for layer in layers:
        dense = nn.Sequential(_sparse(layer, spec))
        sparse, rows = convert(copy.deepcopy(dense), {"0": spec})
        assert rows[0].converted and isinstance(sparse[0], (SparseLinear, SparseConv2d))
        if isinstance(layer, nn.Linear):
            x = torch.randn(batch, 5, 128)[:, :, ::2]  # non-contiguous, extra leading dim
        else:
            x = torch.randn(batch, 9, 11, 32).permute(0, 3, 1, 2)  # channels-last memory
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
    (tmp_path / "afile").write_text("x")
    assert main(["bench", "--out", str(tmp_path / "afile")]) == 2
    assert "is a file; give a directory" in capsys.readouterr().err
    code = main(["bench", "--case", "minilm ffn 1536->384", "--pattern", "1x16:0.25", "--batch", "3",
                 "--repeats", "3", "--out", str(tmp_path)])
    assert code == 0
    report = json.loads((tmp_path / "bench_layers.json").read_text())
    row = report["rows"][0]
    assert row["batch"] == 3 and row["max_rel_error"] < 1e-4 and row["speedup"] > 0
    assert row["weight_bytes_sparse"] < row["weight_bytes_dense"] / 2
    assert (tmp_path / "bench_layers.md").read_text().count("|") > 10 and (
        tmp_path / "bench_layers.png"
    ).stat().st_size > 0


def test_bench_timing_alternates_blocks_and_skips_each_blocks_first_call():
    from nmsparse.runtime.timing import time_interleaved as _time_interleaved

    log: list[str] = []
    times = _time_interleaved([lambda i: log.append("a"), lambda i: log.append("b")], warmup=1, repeats=12, block=5)
    assert [len(t) for t in times] == [12, 12]
    # warm-up (a, b), then rounds of 1 untimed + up to 5 timed calls: a-block, b-block, b-block, a-block, ...
    assert log[:2] == ["a", "b"]
    runs = "".join(log[2:])
    assert runs == "a" * 6 + "b" * 6 + "b" * 6 + "a" * 6 + "a" * 3 + "b" * 3


def test_bench_folds_batch_norm_for_the_dense_baseline():
    from nmsparse.bench import _dense_folded

    net = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU()).eval()
    net[1].running_mean.uniform_(-1, 1)
    net[1].running_var.uniform_(0.5, 2)
    folded = _dense_folded(net)
    assert folded is not None and not any(isinstance(m, nn.BatchNorm2d) for m in folded.modules())
    x = torch.randn(2, 3, 9, 9)
    with torch.no_grad():
        assert _rel(folded(x), net(x)) < 1e-5
    assert _dense_folded(nn.Sequential(nn.Linear(4, 4))) is None  # nothing to fold: no baseline


# ---------------------------------------------------------------- C++ kernels and the numba fallback
def _random_packed(kind, out, columns, seed):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(out, columns, generator=g)
    if kind[0] == "block":
        block, keep = kind[1], torch.rand(out // kind[1], 1, columns, generator=g) < 0.3
        w = (w.view(out // block, block, columns) * keep).view(out, columns)
        return w, pack_block(w, block)
    n, m = kind[1], kind[2]
    order = torch.rand(out, columns // m, m, generator=g).argsort(-1)[..., :n]
    w = (w.view(out, -1, m) * torch.zeros(out, columns // m, m).scatter(-1, order, 1)).view(out, columns)
    return w, pack_nm(w, n, m)


KERNEL_CASES = [("block", 8), ("block", 16), ("block", 32), ("nm", 2, 4), ("nm", 1, 4), ("nm", 2, 8), ("nm", 4, 8),
                ("nm", 1, 8), ("nm", 3, 8), ("nm", 1, 16), ("nm", 4, 16), ("nm", 1, 2)]


@pytest.mark.parametrize("variant", RUNNABLE)
@pytest.mark.parametrize("kind", KERNEL_CASES, ids=lambda k: "x".join(map(str, k)))
def test_cpp_kernels_match_dense_for_every_layout(variant, kind):
    """Every build of the C++ library this CPU runs (native, and the AVX2 / SSE2 / AVX-512 builds of the
    same source where the CPU has them) against a dense product:
    shapes with partial chunks, batches that are not a multiple of the vector or tile width, a
    strided input (a column slice), and the batch-1 paths (whose threads split their rows into
    several streams: row counts that do not divide evenly leave rows over)."""
    from nmsparse.runtime import _native

    if _native.library(variant) is None:
        pytest.skip(f"C++ kernels unavailable here: {_native.status()['reason']}")
    for out, columns in [(64, 128), (32, 576), (96, 48), (16, 1040), (22, 96), (176, 64)]:
        if columns % (kind[2] if kind[0] == "nm" else 1) or out % (kind[1] if kind[0] == "block" else 1):
            continue
        w, packed = _random_packed(kind, out, columns, seed=out + columns)
        assert torch.equal(packed.dense(), w)
        for batch in (1, 3, 17, 64, 70):
            x = torch.randn(columns, batch + 5)[:, 2: 2 + batch]  # row stride != batch
            run = _native.block_mm if kind[0] == "block" else _native.nm_mm
            y = run(x, _native.arrays_of(packed), lib=_native.library(variant))
            assert _rel(y, w @ x) < 1e-5, (out, columns, batch)


@pytest.mark.parametrize("spec", ["1x16:0.25", "2:4"])
def test_loading_another_state_dict_refreshes_what_the_kernels_derive(spec):
    """A converted model loading another converted model's state dict (same shapes, another mask)
    computes with the new mask: chunk starts, offsets and caches are rebuilt."""
    torch.manual_seed(0)
    layers = [nn.Conv2d(32, 64, 3, padding=1), nn.Linear(256, 64)]
    a = [convert(nn.Sequential(_sparse(copy.deepcopy(m), spec)), {"0": spec})[0] for m in layers]
    b_dense = []
    for m in layers:  # the same shapes, new weights and so another mask
        other = copy.deepcopy(m)
        with torch.no_grad():
            other.weight.copy_(torch.randn_like(other.weight))
        b_dense.append(nn.Sequential(_sparse(other, spec)))
    b = [convert(copy.deepcopy(d), {"0": spec})[0] for d in b_dense]
    for sparse_a, sparse_b, dense, x in zip(a, b, b_dense, [torch.randn(2, 32, 9, 9), torch.randn(40, 256)]):
        with torch.no_grad():
            sparse_a(x)  # fill the caches with the old mask first
            sparse_a.load_state_dict(sparse_b.state_dict())
            assert _rel(sparse_a(x), dense(x)) < 1e-4


@pytest.mark.parametrize("variant", RUNNABLE)
def test_linear_inputs_are_transposed_exactly_into_padded_rows(variant):
    """A linear layer's [tokens, in] input becomes [in, tokens] with rows padded to 16 floats (C++ tiles
    for a row-major input, PyTorch's copy for other strides)."""
    from nmsparse.runtime import _native

    lib = _native.library(variant)
    if lib is None:
        pytest.skip(f"C++ kernels unavailable here: {_native.status()['reason']}")
    for tokens, features in [(197, 384), (16, 32), (5, 33), (33, 17), (2, 1)]:
        x = torch.randn(tokens, features)
        for source in (x, torch.randn(tokens, 2 * features)[:, ::2]):
            xt = _native._rows(source.t(), lib)
            assert torch.equal(xt, source.t()) and xt.stride(1) == 1 and xt.stride(0) % 16 == 0


def test_without_kernels_layers_stay_dense_with_the_reason_and_the_fix(monkeypatch, tmp_path):
    """No compiler on PATH: convert leaves every layer dense (rows say why and how to fix it), the
    model still runs and gives the same outputs; constructing a sparse module raises the typed error."""
    from nmsparse.runtime import _native

    monkeypatch.setenv("PATH", str(tmp_path))  # no g++/c++/clang++ here
    monkeypatch.delenv("CXX", raising=False)
    monkeypatch.setattr(_native, "_LOADED", None)
    _native._load.cache_clear()
    try:
        assert _native.status()["backend"] is None and "apt-get install g++" in _native.status()["reason"]
        dense = nn.Sequential(_sparse(nn.Linear(64, 32), "2:4"))
        x = torch.randn(3, 64)
        model, rows = convert(copy.deepcopy(dense), {"0": "2:4"})
        assert isinstance(model[0], nn.Linear) and not rows[0].converted
        assert "no C++ compiler" in rows[0].reason and "\n" not in rows[0].reason
        assert torch.equal(model(x), dense(x))
        w, packed = _random_packed(("nm", 2, 4), 32, 64, seed=1)
        with pytest.raises(_native.KernelsUnavailable, match="no C\\+\\+ compiler"):
            SparseLinear(packed, None)
    finally:
        monkeypatch.undo()
        _native._load.cache_clear()


def test_kernel_build_failure_is_reported_not_raised(monkeypatch, tmp_path):
    """A compiler that fails leaves the runtime without kernels, with the compiler's first line as the reason."""
    from nmsparse.runtime import _native

    bad = tmp_path / "badcxx"
    bad.write_text("#!/bin/sh\necho 'badcxx: error: no such target' >&2\nexit 1\n")
    bad.chmod(0o755)
    monkeypatch.setenv("CXX", str(bad))
    monkeypatch.setenv("NMSPARSE_CACHE", str(tmp_path / "cache"))
    _native._load.cache_clear()
    try:
        info = _native.status()
        assert info["backend"] is None and "no such target" in info["reason"], info
        assert not list((tmp_path / "cache").rglob("*.so"))  # nothing half-written left behind
    finally:
        monkeypatch.undo()
        _native._load.cache_clear()


@pytest.mark.parametrize("variant", RUNNABLE)
def test_cpp_im2col_matches_unfold_in_both_orders(variant):
    from nmsparse.runtime import _native

    if _native.library(variant) is None:
        pytest.skip(f"C++ kernels unavailable here: {_native.status()['reason']}")
    x = torch.randn(2, 5, 9, 11)
    for kernel, stride, padding, dilation in [((3, 3), (1, 1), (1, 1), (1, 1)), ((3, 3), (2, 2), (1, 1), (1, 1)),
                                              ((7, 7), (2, 2), (3, 3), (1, 1)), ((3, 2), (1, 2), (0, 1), (2, 1)),
                                              ((1, 1), (2, 2), (0, 0), (1, 1)), ((5, 5), (1, 1), (4, 4), (1, 1))]:
        ref = nn.functional.unfold(x, kernel, dilation, padding, stride)  # [N, C*k, L]
        expect_chw = ref.transpose(0, 1).reshape(ref.shape[1], -1)
        lib = _native.library(variant)
        got = _native.im2col(x, kernel, stride, padding, dilation, "chw", lib)
        assert torch.equal(got, expect_chw), (kernel, stride, padding, dilation)
        k = kernel[0] * kernel[1]
        hwc = ref.view(2, 5, k, -1).transpose(1, 2).reshape(2, 5 * k, -1).transpose(0, 1).reshape(5 * k, -1)
        assert torch.equal(_native.im2col(x, kernel, stride, padding, dilation, "hwc", lib), hwc)


def test_an_in_model_ratio_too_close_to_one_leaves_the_choice_to_the_layers_alone(monkeypatch):
    """Where the whole model timed with a group sparse and dense differs by less than the resolution
    (SmolLM2's one-token module path: 0.98-1.00x for every group, against 2x for its layers alone), the
    layers alone decide: a group 2x faster alone runs sparse, a group 0.5x alone stays dense and its
    reason says the model was too close to tell; a clear in-model verdict (0.5x) still overrules."""
    from types import SimpleNamespace

    from nmsparse.runtime import choice

    model = nn.Sequential(*[nn.Linear(4, 4) for _ in range(2)], *[nn.Linear(4, 8), nn.Linear(8, 4)] * 2)
    candidates = [(f"{i}", model[i], nn.Linear(*model[i].weight.shape[::-1])) for i in range(6)]
    alone = {"0": 2.0, "1": 2.0, "2": 0.5, "3": 0.5, "4": 0.5, "5": 0.5}
    in_model = {(4, 4): (1.0, 1.01), (8, 4): (1.0, 0.99), (4, 8): (1.0, 2.0)}  # whole model: dense ms, sparse ms
    rows = {fqn: SimpleNamespace(fqn=fqn, speedup=alone[fqn], input_shape=[1, 4], pattern="2:4") for fqn in alone}

    def fake_best_ms(fns, repeats):
        key = fns[0].__defaults__[0]
        return list(in_model[key[1]])

    monkeypatch.setattr(choice, "best_ms", fake_best_ms)
    dense = choice.decide(model, torch.randn(1, 4), candidates, rows, cold=True, dense_ms=1.0, min_speedup=1.05,
                          repeats=2)
    assert set(dense) == {"2", "4", "3", "5"}
    assert "too close to tell" in dense["2"] and "0.5" in dense["2"]  # 0.99x in the model: the layers' 0.50x decided
    assert "the model ran 0.50x as fast" in dense["3"]  # a clear in-model verdict
    assert choice.resolved(0.96) and not choice.resolved(0.99) and not choice.resolved(1.02)


def test_in_model_choice_times_a_group_again_where_it_contradicts_the_layers_alone(monkeypatch):
    """A group whose in-model verdict disagrees with its layers timed alone is timed again with three
    times the calls, and the second verdict stands; an agreeing group is timed once."""
    from nmsparse.runtime import choice

    model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4), nn.Linear(4, 8), nn.Linear(8, 8))
    sparse = {f"{i}": nn.Linear(*model[i].weight.shape[::-1]) for i in range(4)}
    candidates = [(f"{i}", model[i], sparse[f"{i}"]) for i in range(4)]
    groups = {"a": candidates[:2], "b": candidates[2:]}
    timings = iter([("a", 1.0, 1.1), ("a", 1.2, 1.0), ("b", 1.0, 1.1)])  # (group, dense ms, sparse ms) in order
    calls = []

    def fake_best_ms(fns, repeats):
        key, dense_ms, sparse_ms = next(timings)
        calls.append((key, repeats))
        return [dense_ms, sparse_ms]

    monkeypatch.setattr(choice, "best_ms", fake_best_ms)
    ratios = choice._time_groups_in_model(model, torch.randn(1, 4), candidates, groups, ["a", "b"], 6,
                                          {"a": 1.5, "b": 0.5})
    assert calls == [("a", 6), ("a", 18), ("b", 6)]  # a contradicted its 1.5x alone: timed again, 3x the calls
    assert ratios["a"] == pytest.approx(1.2) and ratios["b"] == pytest.approx(1.0 / 1.1)
    assert all(model[i] is candidates[i][1] for i in range(4))  # left dense; the caller applies the choice
