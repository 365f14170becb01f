"""Quantized runtime weights (int8 / int4 kept values and dense layers): layouts, kernels on every
instruction set this CPU runs, activations, the operator under PyTorch's tools, and convert."""

import copy
import importlib
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from nmsparse.quantgrid import INT4_CLIPS, dequantize_groups, fp16_up
from nmsparse.runtime import _native, convert
from nmsparse.runtime.formats import FormatError, pack_block, pack_nm
from nmsparse.runtime.modules import QuantLinear
from nmsparse.runtime.quant import (
    QuantError,
    WeightScheme,
    activation_block,
    parse_weights,
    quantize,
    quantize_activations,
    quantize_groups,
)

pytestmark = pytest.mark.skipif(
    not _native.available(), reason=f"C++ kernels unavailable: {_native.status()['reason']}"
)


def _nm(out, cols, n, m, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(out, cols // m, m, generator=g)
    keep = torch.zeros_like(w, dtype=torch.bool).scatter_(-1, w.abs().topk(n, -1).indices, True)
    return (w * keep).reshape(out, cols)


def _block(out, cols, block, density, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(out, cols, generator=g)
    kept = int(cols * density)
    for r in range(out // block):
        drop = torch.randperm(cols, generator=g)[kept:]
        w[r * block:(r + 1) * block, drop] = 0
    return w


def _layouts():
    """(name, float32 layout or dense matrix): n:m pair and general, narrow last chunks, 1xN, dense."""
    return [("2:4 576", pack_nm(_nm(40, 576, 2, 4), 2, 4)), ("2:4 204", pack_nm(_nm(33, 204, 2, 4, 1), 2, 4)),
            ("1:2", pack_nm(_nm(16, 256, 1, 2, 2), 1, 2)), ("4:8", pack_nm(_nm(24, 320, 4, 8, 3), 4, 8)),
            ("8:16", pack_nm(_nm(8, 512, 8, 16, 4), 8, 16)), ("1:4", pack_nm(_nm(20, 96, 1, 4, 5), 1, 4)),
            ("3:8", pack_nm(_nm(12, 96, 3, 8, 6), 3, 8)), ("1x16", pack_block(_block(64, 200, 16, 0.25), 16)),
            ("1x32", pack_block(_block(64, 96, 32, 0.5, 1), 32)), ("1x8", pack_block(_block(32, 64, 8, 0.5, 2), 8)),
            # odd kept counts and block heights past one 16-row piece (the int4 block kernel's lane order)
            ("1x16 odd", pack_block(_block(48, 100, 16, 0.25, 8), 16)),
            ("1x32 odd", pack_block(_block(64, 106, 32, 0.5, 9), 32)),
            ("dense 576", _nm(48, 576, 4, 4, 7)), ("dense 100", torch.randn(37, 100))]


LAYOUTS = _layouts()


def test_group_quantization_is_symmetric_on_a_float16_grid_and_idempotent():
    v = torch.tensor([[0.5, -1.0, 0.25, 0.0], [0.0, 0.0, 0.0, 0.0]])
    q, s = quantize_groups(v, 8, 2)
    assert s.shape == (2, 2) and s[1].tolist() == [1.0, 1.0]  # all-zero groups: scale 1, values 0
    assert torch.equal(s.half().float(), s)  # exactly a float16 value
    # the scale is rounded up to float16 (>= 1/127), so 0.5 / scale falls just under 63.5
    assert s[0, 0] >= 1.0 / 127 and q[0, :2].tolist() == [63, -127]
    back = q.float() * s.repeat_interleave(2, dim=1)
    q2, s2 = quantize_groups(back, 8, 2)
    assert torch.equal(q2, q) and torch.equal(s2, s)  # values on the grid come back exactly
    # int4: 16 levels, the largest magnitude on -8 with a signed scale (Q4_0's rule)
    q4, s4 = quantize_groups(torch.tensor([[7.0, -3.5, 1.0, 0.1]]), 4, 4)
    assert q4.tolist() == [[-8, 4, -1, 0]] and float(s4) == -0.875


def test_int4_grid_uses_sixteen_levels_picks_the_clip_of_least_error_and_is_idempotent():
    g = torch.Generator().manual_seed(5)
    v = torch.randn(64, 256, generator=g)
    q, s = quantize_groups(v, 4, 32)
    assert int(q.min()) == -8 and int(q.max()) == 7
    back = dequantize_groups(q, s, 32)
    plain_q, plain_s = quantize_groups(v, 4, 32, scales=fp16_up(
        v.view(64, 8, 32).gather(-1, v.view(64, 8, 32).abs().argmax(-1, keepdim=True)).squeeze(-1) / -8))
    plain = dequantize_groups(plain_q, plain_s, 32)
    err = ((back - v) ** 2).view(64, 8, 32).sum(-1)
    plain_err = ((plain - v) ** 2).view(64, 8, 32).sum(-1)
    assert bool((err <= plain_err).all()) and float(err.sum()) < 0.97 * float(plain_err.sum())
    assert float((s.abs() / plain_s.abs()).min()) >= INT4_CLIPS[-1] - 1e-3
    for exact in (False, True):  # values on the grid come back exactly
        q2, s2 = quantize_groups(back, 4, 32, exact_grid=exact)
        assert torch.equal(dequantize_groups(q2, s2, 32), back)
    # a group whose largest value shrank below its grid's maximum is found again with exact_grid
    shrunk = back.clone()
    shrunk[0, :32] = torch.where(q[0, :32].abs() >= 7, torch.zeros(32), shrunk[0, :32])
    q3, s3 = quantize_groups(shrunk, 4, 32, exact_grid=True)
    assert torch.equal(dequantize_groups(q3, s3, 32), shrunk)


@pytest.mark.parametrize("name,layout", LAYOUTS, ids=[n for n, _ in LAYOUTS])
@pytest.mark.parametrize("bits", [8, 4])
def test_quantized_layouts_unpack_to_their_grid(name, layout, bits):
    """Dequantizing a QPacked gives q * scale on the original positions; the error to the float32
    weight is at most half a step (int8) or the clip ratio's clamp (int4)."""
    dense = layout if isinstance(layout, torch.Tensor) else layout.dense()
    qp = quantize(layout, WeightScheme(bits, 32))
    back = qp.dense()
    assert back.shape == dense.shape
    assert torch.equal(back == 0, dense == 0) or bool(((back == 0) | (dense != 0)).all())
    amax = float(dense.abs().max())
    # int8: half a step; int4: the clamp of the clip ratio at the far end, 1 - 7 * clip / 8 of the maximum
    bound = amax / 127 * 0.5 if bits == 8 else amax * (1 - 7 * INT4_CLIPS[-1] / 8)
    assert float((back - dense).abs().max()) <= bound * 1.01
    assert qp.nbytes < (dense.ne(0).sum() * 4 if name[0] != "d" else dense.numel() * 4)


def _module(qp, acts):
    return QuantLinear(qp, None, None, acts)


@pytest.mark.parametrize("name,layout", LAYOUTS, ids=[n for n, _ in LAYOUTS])
@pytest.mark.parametrize("variant", _native.runnable_variants())
def test_batch1_kernels_equal_the_dequantized_reference_on_every_isa(name, layout, variant):
    """Every build this CPU runs (native, AVX-512 with and without VNNI, AVX2, SSE2) computes
    A(x) @ dequantized(W)^T to float32 rounding, for int8 and int4, groups 16-128, float or int8
    activations (the VNNI build multiplies integers, the others floats: one function)."""
    lib = _native.library(variant)
    if lib is None:
        pytest.skip(f"{variant} build unavailable")
    g = torch.Generator().manual_seed(1)
    for bits in (8, 4):
        for group in (16, 32, 64, 128):
            try:
                qp = quantize(layout, WeightScheme(bits, group))
            except FormatError:
                assert bits == 4  # int4 refuses odd segment lengths only
                continue
            for acts in ("int8", "fp32"):
                mod = _module(qp, acts)
                x = torch.randn(qp.shape[1], generator=g)
                xa = quantize_activations(x, mod.act_block) if mod.act_block else x
                ref = (qp.dense().double() @ xa.double()).float()
                for threads in (1, 2):
                    y = _native.q_gemv(x, mod._arrays(), threads=threads, lib=lib)
                    err = float((y - ref).abs().max() / ref.abs().max())
                    assert err < 3e-6, (name, variant, bits, group, acts, threads, err)


@pytest.mark.parametrize("variant", _native.runnable_variants())
def test_float16_scales_read_exactly_by_every_build_subnormal_ones_included(variant):
    """The layouts hold their scales as float16 bits; every build converts them to the same floats
    (the SSE2 build in software), tiny weights whose scales are float16 subnormals included."""
    lib = _native.library(variant)
    if lib is None:
        pytest.skip(f"{variant} build unavailable")
    w = _nm(64, 256, 2, 4) * 1e-4  # int8 scales ~1e-6: below float16's smallest normal (6.1e-5)
    for bits in (8, 4):
        qp = quantize(pack_nm(w, 2, 4), WeightScheme(bits, 32))
        assert qp.scales.dtype == np.float16 and (np.abs(qp.scales) < 6.1e-5).all()
        mod = _module(qp, "fp32")
        x = torch.randn(256, generator=torch.Generator().manual_seed(5))
        ref = (qp.dense().double() @ x.double()).float()
        y = _native.q_gemv(x, mod._arrays(), lib=lib)
        assert float((y - ref).abs().max() / ref.abs().max()) < 3e-6, (variant, bits)
    with pytest.raises(QuantError, match="float16 values"):  # a scale float16 cannot hold is refused, not rounded
        quantize(w, WeightScheme(8, 32), scales=torch.full((64, 8), 0.1))


def _has_vnni(variant: str) -> bool:
    return variant == "avx512vnni" or (
        variant == "native" and {"avx512_vnni", "avx512vbmi", "avx512bw"} <= _native._cpu_flags())


@pytest.mark.parametrize("variant", _native.runnable_variants())
def test_batched_integer_products_equal_the_dequantized_reference(variant):
    """More rows with int8 activations: every build multiplies integers (VNNI: vpdpbusd for n:m with
    m = 2n and dense; every build: 16-bit multiply-adds for the other n:m layouts whose weight groups are
    whole groups of m columns), int8 and int4, groups 16-128, tails of a token tile (2, 5, 33, 70 rows)
    and of the weight's rows included, bias and ReLU applied; Q(x) @ dequantized(W)^T + bias to float32
    rounding. 1xN layouts and n:m groups that cut a group of m columns decline (None): the caller then
    dequantizes."""
    lib = _native.library(variant)
    if lib is None:
        pytest.skip(f"{variant} build unavailable")
    g = torch.Generator().manual_seed(3)
    ran = 0
    for name, layout in LAYOUTS:
        for bits in (8, 4):
            for group in (16, 32, 64, 128):
                try:
                    qp = quantize(layout, WeightScheme(bits, group))
                except FormatError:
                    continue
                mod = _module(qp, "int8")
                arrays = mod._arrays()
                gm = min(group, qp.index.chunk) if qp.kind == "nm" else group
                takes = mod.act_block > 0 and (qp.kind == "dense" or gm % arrays.n == 0)
                for rows in (2, 5, 33, 70):
                    x = torch.randn(rows, qp.shape[1], generator=g)
                    bias = torch.randn(qp.shape[0], generator=g)
                    y = _native.q_gemm(x, arrays, bias, relu=rows == 5, threads=1 + rows % 2, lib=lib)
                    if not takes:
                        assert y is None, (name, bits, group)
                        break
                    xa = quantize_activations(x, mod.act_block)
                    ref = (xa.double() @ qp.dense().double().T + bias.double()).float()
                    if rows == 5:
                        ref = ref.clamp_min(0)
                    err = float((y - ref).abs().max() / ref.abs().max())
                    assert err < 3e-6, (name, variant, bits, group, rows, err)
                    ran += 1
    assert ran > 100, ran


@pytest.mark.parametrize(
    "name,layout", LAYOUTS[:2] + LAYOUTS[7:8] + LAYOUTS[10:], ids=lambda v: v if isinstance(v, str) else ""
)
def test_batched_products_and_the_module_path_agree_with_batch1(name, layout):
    """More rows run the batched product (integers with VNNI, else the weight dequantized and the float32
    product) on the quantized activations: the same function as the batch-1 kernel, row by row; ReLU
    and bias applied."""
    qp = quantize(layout, WeightScheme(8, 32))
    bias = torch.randn(qp.shape[0])
    mod = QuantLinear(qp, bias)
    x = torch.randn(2, 5, qp.shape[1])
    y = mod(x)
    assert y.shape == (2, 5, qp.shape[0])
    xa = quantize_activations(x, mod.act_block) if mod.act_block else x
    ref = xa @ qp.dense().T + bias
    assert float((y - ref).abs().max() / ref.abs().max()) < 3e-6
    one = torch.stack([mod(x[0, i]) for i in range(5)])
    assert float((one - y[0]).abs().max() / y.abs().max()) < 3e-6
    mod.activation = "relu"
    assert float(mod(x).min()) >= 0.0 and float(mod(x[0, 0]).min()) >= 0.0


def test_activation_quantization_reference_matches_the_kernels_bit_for_bit():
    """quantize_activations rounds exactly as the kernels' quant_x: a dense int8 layer whose weight is
    the identity returns the quantized input itself (scale 1 rows of 127 give q * s exactly)."""
    cols = 96
    eye = torch.eye(cols) * 1.0
    qp = quantize(eye, WeightScheme(8, 32))
    mod = QuantLinear(qp, None)
    g = torch.Generator().manual_seed(3)
    for _ in range(20):
        x = torch.randn(cols, generator=g) * torch.rand(1, generator=g) * 10
        expected = quantize_activations(x, 32)
        out = mod(x)
        # dequantized identity = 127 * (1/127): within one float32 rounding of each quantized input
        assert torch.allclose(out, expected * float(qp.scales[0]) * 127, rtol=1e-6, atol=0)
    assert activation_block(qp) == 32
    block = quantize(pack_block(_block(32, 64, 16, 0.5), 16), WeightScheme(8, 32))
    assert activation_block(block) is None and QuantLinear(block, None).act_block == 0


def test_weight_schemes_and_bad_values():
    assert parse_weights("fp32") is None and parse_weights(None) is None
    assert parse_weights("int4", 128) == WeightScheme(4, 128)
    for bad in ("int2", "fp16", "INT8"):
        with pytest.raises(QuantError, match="not one of"):
            parse_weights(bad)
    for group in (8, 24, 0, -32, 1024, True):
        with pytest.raises(QuantError, match="group size"):
            parse_weights("int8", group)
    with pytest.raises(FormatError, match="even"):
        quantize(torch.randn(4, 7), WeightScheme(4, 16))


@pytest.mark.parametrize("weights", ["int8", "int4"])
def test_compile_export_and_trace_of_quantized_layers_equal_eager(weights):
    model = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 64), nn.Linear(64, 10)).eval()
    with torch.no_grad():
        for layer in (model[0], model[2]):
            layer.weight.copy_(_nm(layer.out_features, layer.in_features, 2, 4, seed=layer.out_features))
    q, report = convert(model, weights=weights)
    assert [type(m) for m in (q[0], q[2], q[3])] == [QuantLinear] * 3  # the dense classifier quantized too
    assert [r.weights for r in report] == [weights, weights, "int8"] and report.weights == weights  # dense: int8
    assert [r.converted for r in report] == [True, True, False]
    x = torch.randn(5, 64)
    eager = q(x)
    compiled = torch.compile(q, fullgraph=True)(x)
    exported = torch.export.export(q, (x,)).module()(x)
    traced = torch.jit.trace(q, (x,))(x)
    for out in (compiled, exported, traced):
        assert torch.allclose(out, eager, rtol=1e-6, atol=1e-6)


def test_convert_int4_falls_back_to_int8_where_it_cannot_store_a_layer_and_says_so():
    model = nn.Sequential(nn.Linear(96, 16), nn.Linear(16, 7)).eval()
    with torch.no_grad():
        model[0].weight.copy_(_nm(16, 96, 1, 4))  # 1:4 of 96: 24 kept per row, but the 7-row dense layer
    q, report = convert(model, weights="int4", group_size=16)
    assert q[0].bits == 4 and report[0].weights == "int4"
    model2 = nn.Sequential(nn.Linear(36, 8)).eval()
    with torch.no_grad():
        model2[0].weight.copy_(_nm(8, 36, 1, 4))  # 9 kept values per row: odd
    q2, report2 = convert(model2, weights="int4", group_size=16)
    assert q2[0].bits == 8 and report2[0].weights == "int8" and "int8 instead of int4" in report2[0].reason
    with pytest.raises(QuantError):
        convert(copy.deepcopy(model), weights="int3")
    with pytest.raises(QuantError):
        convert(copy.deepcopy(model), weights="int8", activations="fp16")


def test_layer_choice_compares_the_quantized_sparse_form_with_the_quantized_dense_form(monkeypatch):
    """With weights='int8' a layer that measures slower sparse stays in its dense *int8* form."""
    model = nn.Sequential(nn.Linear(128, 128), nn.Linear(128, 128)).eval()
    with torch.no_grad():
        for layer in model:
            layer.weight.copy_(_nm(128, 128, 2, 4))
    timed = []

    def fake_best(fns, repeats):
        timed.append(fns)
        return [1.0, 2.0] if len(fns) == 2 else [1.0]  # sparse twice as slow as its dense form

    monkeypatch.setattr(importlib.import_module("nmsparse.runtime.choice"), "best_ms", fake_best)
    q, report = convert(model, weights="int8", example_inputs=torch.randn(1, 128))
    assert all(isinstance(m, QuantLinear) and m.kind == "dense" for m in q)
    assert all(not r.converted and r.weights == "int8" and "kept dense" in r.reason for r in report)


def test_convert_checks_each_quantized_layer_and_keeps_float32_when_a_kernel_disagrees(monkeypatch):
    model = nn.Sequential(nn.Linear(64, 32)).eval()
    with torch.no_grad():
        model[0].weight.copy_(_nm(32, 64, 2, 4))
    real = QuantLinear.forward
    monkeypatch.setattr(QuantLinear, "forward", lambda self, x: real(self, x) * 1.01)
    q, report = convert(model, weights="int8")
    assert type(q[0]) is nn.Linear and not report[0].converted
    assert "disagreed with its dequantized reference" in report[0].reason


def test_quantized_bytes_against_float32():
    """A 2:4 layer's int8 / int4 layout (values, offsets and float16 scales of 64) against its fp32
    dense weight: what the runtime reads per token."""
    w = _nm(512, 1024, 2, 4)
    dense = w.numel() * 4
    q8 = quantize(pack_nm(w, 2, 4), WeightScheme(8, 64))
    q4 = quantize(pack_nm(w, 2, 4), WeightScheme(4, 64))
    assert q8.nbytes / dense == pytest.approx((0.5 + 0.125 + 2 / 128) / 4, rel=1e-3)
    assert q4.nbytes / dense == pytest.approx((0.25 + 0.125 + 2 / 128) / 4, rel=1e-3)
    assert q4.scales.dtype == np.float16 and q4.scales.size == 512 * 512 // 64
    assert np.isclose(q8.int_values().numel(), 512 * 512)


def _vm_flags(address: int) -> str:
    """The VmFlags of the mapping of this process that holds ``address`` (Linux /proc/self/smaps)."""
    inside = False
    for line in Path("/proc/self/smaps").read_text().splitlines():
        head = line.split()[0]
        if "-" in head and ":" not in head:
            lo, hi = (int(v, 16) for v in head.split("-"))
            inside = lo <= address < hi
        elif inside and line.startswith("VmFlags:"):
            return line
    return ""


@pytest.mark.skipif(not Path("/sys/kernel/mm/transparent_hugepage").exists(), reason="no transparent huge pages here")
def test_packed_weights_live_in_memory_advised_for_huge_pages(monkeypatch):
    """The packed layers' arrays are copied once into memory madvise'd MADV_HUGEPAGE ("hg" in the
    mapping's VmFlags), with the same values; NMSPARSE_HUGE_PAGES=0 leaves arrays where they are."""
    small = np.arange(1000, dtype=np.float32)
    placed = _native.huge_pages(small)
    assert placed is not small and np.array_equal(placed, small) and placed.ctypes.data % 64 == 0
    assert " hg" in _vm_flags(placed.ctypes.data)
    w = _nm(64, 256, 2, 4)
    layer = QuantLinear(quantize(pack_nm(w, 2, 4), WeightScheme(8, 64)), None)
    for buf in (layer.qweight, layer.scales, layer.index):
        assert " hg" in _vm_flags(buf.data_ptr())
    assert layer._packed.q.ctypes.data == layer.qweight.data_ptr()  # one copy: the layout views the buffer
    monkeypatch.setenv("NMSPARSE_HUGE_PAGES", "0")
    assert _native.huge_pages(small) is small
    plain = QuantLinear(quantize(pack_nm(w, 2, 4), WeightScheme(8, 64)), None)
    assert " hg" not in _vm_flags(plain.qweight.data_ptr())
    for x in (torch.randn(256), torch.randn(3, 256)):  # the batch-1 kernel and the batched path
        assert torch.equal(layer(x), plain(x))


@pytest.mark.skipif(not Path("/sys/kernel/mm/transparent_hugepage").exists(), reason="no transparent huge pages here")
def test_layer_choice_timing_copies_keep_their_weights_on_huge_pages():
    """The layer choice times each layer cycling through deep copies of it (runtime.timing.cold_copies).
    A packed layer's deepcopy keeps its weights in huge-page memory, as the model's packed layers hold
    theirs (a plain deepcopy would give ordinary memory), with the same values and the same results, for
    the quantized and the float32 packed modules alike, and inside a copied model."""
    from nmsparse.runtime.modules import SparseLinear
    from nmsparse.runtime.timing import cold_copies

    w = _nm(64, 256, 2, 4)
    layer = QuantLinear(quantize(pack_nm(w, 2, 4), WeightScheme(8, 64)), None)
    model = copy.deepcopy(nn.Sequential(layer))
    assert " hg" in _vm_flags(model[0].qweight.data_ptr()) and model[0].qweight.data_ptr() != layer.qweight.data_ptr()
    copies = cold_copies(layer, layer.weight_nbytes, cache_bytes=3 * layer.weight_nbytes)
    assert len(copies) == 6 and copies[0] is layer
    x = torch.randn(256)
    for c in copies[1:]:
        for buf in (c.qweight, c.scales, c.index):
            assert " hg" in _vm_flags(buf.data_ptr())
        assert c.qweight.data_ptr() != layer.qweight.data_ptr()
        assert torch.equal(c(x), layer(x)) and torch.equal(c.qweight, layer.qweight)
    fp32 = SparseLinear(pack_nm(w, 2, 4), None)
    other = cold_copies(fp32, 1, cache_bytes=1)
    assert len(other) == 2 and " hg" in _vm_flags(other[1].vals.data_ptr())
    assert torch.equal(other[1](x), fp32(x))
