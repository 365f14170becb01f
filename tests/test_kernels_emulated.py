"""The runtime's and the mask kernels built for ARM (NEON, 4 lanes) and run under an emulator, against torch.

On an x86 machine with an aarch64 cross compiler and qemu-user (Debian: ``g++-aarch64-linux-gnu``,
``qemu-user``; ``.ci/run`` installs them where it can), the kernel source is compiled for
``-march=armv8-a`` together with a small harness (``tests/native/kernel_harness.cpp``) that runs one
call per line on arrays read from files; the products must equal the dense products of the unpacked
weights, the 2:4 / 1:4 / 3:4 masks the tie rule of ``nmsparse.mask`` and the SR-STE decay its formula,
and the quantized batch-1 products their dequantized reference. Every batch-1 and batched path of
the n:m and 1xN products is covered: the
pair-window kernel (m = 2n), the generic gather kernel, bit widths 1-8, narrow last chunks, block
sizes 4-32, batch tails, bias and ReLU, two threads. (On an ARM machine the ordinary runtime tests
run the NEON build natively.)
"""

from __future__ import annotations

import platform
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch

from nmsparse import _topk_cpu
from nmsparse.runtime import _native
from nmsparse.runtime.formats import pack_block, pack_nm

CROSS = shutil.which("aarch64-linux-gnu-g++")
QEMU = shutil.which("qemu-aarch64") or shutil.which("qemu-aarch64-static")
SYSROOT = Path("/usr/aarch64-linux-gnu")

pytestmark = pytest.mark.skipif(
    platform.machine().lower().startswith(("arm", "aarch")) or not (CROSS and QEMU and SYSROOT.is_dir()),
    reason="needs an x86 host with an aarch64 cross compiler and qemu-user (apt-get install g++-aarch64-linux-gnu "
           "qemu-user); on ARM the runtime tests run the NEON build natively")

HARNESS = Path(__file__).with_name("native") / "kernel_harness.cpp"


@pytest.fixture(scope="module")
def arm_harness(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("arm") / "kernel_harness"
    flags = [f for f in _native._FLAGS if f not in ("-shared", "-fPIC")] + _native.VARIANTS["neon"]
    masks = Path(_topk_cpu.__file__).with_name("csrc") / "masks.cpp"
    proc = subprocess.run([CROSS, *flags, str(HARNESS), str(_native._SOURCE), str(masks), "-o", str(out)],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return out


def _sparse_matrix(out: int, columns: int, spec: tuple, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(out, columns, generator=g)
    if spec[0] == "nm":
        _, n, m = spec
        scores = torch.rand(out, columns // m, m, generator=g)
        keep = scores.argsort(-1, descending=True).argsort(-1) < n
        if n > 1:  # a few groups with fewer than n non-zeros (the packer pads them with zeros)
            keep[0, 0, :] = False
        return w * keep.reshape(out, columns)
    _, block = spec
    keep = torch.rand(out // block, 1, columns, generator=g) < 0.3
    return w * keep.expand(-1, block, -1).reshape(out, columns)


def _write(path: Path, array) -> str:
    np.ascontiguousarray(np.asarray(array)).tofile(path)
    return str(path)


def _run(harness: Path, tmp_path: Path, lines: list[str]) -> subprocess.CompletedProcess:
    """The harness run under qemu on a case file of ``lines``."""
    (tmp_path / "cases.txt").write_text("\n".join(lines) + "\n")
    return subprocess.run([QEMU, "-L", str(SYSROOT), str(harness), str(tmp_path / "cases.txt")],
                          capture_output=True, text=True, timeout=600)


def _read(path: Path) -> torch.Tensor:
    return torch.from_numpy(np.fromfile(path, dtype=np.float32))


CASES = [  # (out, columns, spec, batch, bias, relu)
    (64, 256, ("nm", 2, 4), 1, True, False),
    (48, 256, ("nm", 2, 4), 1, False, True),
    (40, 200, ("nm", 2, 4), 1, True, True),  # a narrower last chunk
    (64, 256, ("nm", 2, 4), 37, True, True),  # batch tails of the tiles
    (32, 256, ("nm", 1, 4), 1, False, False),  # generic kernel, 2-bit codes
    (32, 256, ("nm", 1, 4), 9, True, False),
    (32, 256, ("nm", 4, 8), 1, True, False),  # pair window, 4-bit codes
    (32, 256, ("nm", 4, 8), 5, False, True),
    (32, 256, ("nm", 1, 8), 1, False, False),
    (32, 256, ("nm", 2, 8), 3, True, False),
    (32, 512, ("nm", 8, 16), 1, True, False),
    (32, 512, ("nm", 1, 16), 17, False, True),
    (64, 192, ("block", 4), 1, True, False),
    (64, 192, ("block", 8), 1, False, True),
    (64, 300, ("block", 16), 1, True, True),
    (64, 300, ("block", 32), 1, False, False),
    (64, 300, ("block", 16), 7, True, False),
    (64, 300, ("block", 32), 40, True, True),
]


def test_neon_build_under_emulation_equals_the_dense_product(arm_harness, tmp_path):
    lines, expected = [], []
    for index, (out, columns, spec, batch, with_bias, relu) in enumerate(CASES):
        matrix = _sparse_matrix(out, columns, spec, seed=index)
        x = torch.randn(columns, batch, generator=torch.Generator().manual_seed(100 + index))
        bias = torch.randn(out) if with_bias else None
        ref = matrix.double() @ x.double() + (bias.double().unsqueeze(1) if with_bias else 0)
        expected.append(ref.clamp_min(0) if relu else ref)
        p = lambda name, i=index: tmp_path / f"{i}_{name}.bin"  # noqa: E731
        xt, bias_file = _write(p("x"), x.numpy()), _write(p("bias"), bias.numpy()) if with_bias else "-"
        if spec[0] == "nm":
            _, n, m = spec
            packed = pack_nm(matrix, n, m)
            arrays = _native.NMArrays(torch.from_numpy(packed.codes), torch.from_numpy(packed.vals), out, columns, n, m)
            sizes = " ".join(map(str, _native._nm_args(arrays)[2:]))  # rows J jc n m bits, as the runtime passes them
            lines.append(f"nm_mm {xt} {batch} {_write(p('codes'), packed.codes)} {_write(p('vals'), packed.vals)} "
                         f"{sizes} {batch} {p('out')} {batch} {bias_file} {int(relu)} 2")
        else:
            packed = pack_block(matrix, spec[1])
            arrays = _native.BlockArrays(*(torch.from_numpy(a) for a in (packed.cols, packed.kstart, packed.vals)))
            args = _native._block_args(arrays)  # cols kstart chunks vals rows kept block, as the runtime passes them
            lines.append(f"block_mm {xt} {batch} {_write(p('cols'), packed.cols)} {_write(p('kstart'), packed.kstart)} "
                         f"{args[2]} {_write(p('vals'), packed.vals)} {' '.join(map(str, args[4:]))} {batch} "
                         f"{p('out')} {batch} {bias_file} {int(relu)} 2")
    proc = _run(arm_harness, tmp_path, lines)
    assert proc.returncode == 0, proc.stderr[-2000:]
    for index, ref in enumerate(expected):
        got = _read(tmp_path / f"{index}_out.bin").reshape(ref.shape)
        torch.testing.assert_close(
            got.double(), ref, rtol=1e-4, atol=1e-4, msg=lambda m, i=index: f"case {CASES[i]}: {m}"
        )


def test_neon_quantized_products_under_emulation_equal_the_dequantized_reference(arm_harness, tmp_path):
    """The NEON build's quantized batch-1 products (n:m pair and gather kernels, 1xN, dense; int8 and
    int4; float and int8 activations) against A(x) @ dequantized(W)^T."""
    from nmsparse.runtime.modules import QuantLinear
    from nmsparse.runtime.quant import WeightScheme, quantize, quantize_activations

    cases = [(("nm", 2, 4), 40, 200), (("nm", 4, 8), 32, 256), (("nm", 1, 4), 32, 256), (("block", 16), 64, 300),
             (("block", 32), 64, 96), (("dense",), 24, 100)]
    lines, expected = [], []
    for index, ((spec, out, columns), bits, acts) in enumerate(
            [(c, b, a) for c in cases for b in (8, 4) for a in ("int8", "fp32")]):
        matrix = torch.randn(out, columns) if spec[0] == "dense" else _sparse_matrix(out, columns, spec, seed=index)
        layout = matrix if spec[0] == "dense" else (pack_nm(matrix, spec[1], spec[2]) if spec[0] == "nm"
                                                   else pack_block(matrix, spec[1]))
        module = QuantLinear(quantize(layout, WeightScheme(bits, 32)), None, None, acts)
        arrays = module._arrays()
        x = torch.randn(columns, generator=torch.Generator().manual_seed(200 + index))
        xa = quantize_activations(x, module.act_block) if module.act_block else x
        expected.append(module._packed.dense().double() @ xa.double())
        p = lambda name, i=index: tmp_path / f"q{i}_{name}.bin"  # noqa: E731
        pointers = {"index": arrays.index, "q": arrays.q, "scales": arrays.scales}
        files = {name: "@" + _write(p(name), t.numpy()) for name, t in pointers.items()}
        args = list(_native._q_args(arrays))
        names = {0: ["index", "q", "scales"], 1: ["index", "q", "scales"], 2: ["q", "scales"]}[arrays.kind]
        for position, name in enumerate(names):  # the addresses of the plan become the files' data
            args[position] = files[name]
        args += [0, 0]  # no bias, no ReLU
        lines.append(f"gemv {_write(p('x'), x.numpy())} {p('out')} {out} 2 {len(args)} {2 + arrays.kind} "
                     + " ".join(map(str, args)))
    proc = _run(arm_harness, tmp_path, lines)
    assert proc.returncode == 0, proc.stderr[-2000:]
    for index, ref in enumerate(expected):
        got = _read(tmp_path / f"q{index}_out.bin").double()
        assert float((got - ref).abs().max() / ref.abs().max()) < 3e-6, f"quantized case {index}"


def test_neon_batched_integer_products_under_emulation_equal_the_dequantized_reference(arm_harness, tmp_path):
    """The NEON build's W8A8 batched product (16-bit multiply-adds; 2:4 through its table shuffle, other
    n:m one value at a time, dense; int8 and int4; token-tile and row tails, bias, ReLU) against
    Q(x) @ dequantized(W)^T + bias."""
    from nmsparse.runtime.formats import nm_chunk, offset_bits
    from nmsparse.runtime.modules import QuantLinear
    from nmsparse.runtime.quant import WeightScheme, quantize, quantize_activations

    cases = [(("nm", 2, 4), 37, 204, 5), (("nm", 2, 4), 16, 256, 19), (("nm", 4, 8), 9, 256, 3),
             (("dense",), 24, 100, 11)]
    lines, expected = [], []
    for index, ((spec, out, columns, tokens), bits) in enumerate([(c, b) for c in cases for b in (8, 4)]):
        matrix = torch.randn(out, columns) if spec[0] == "dense" else _sparse_matrix(out, columns, spec, seed=index)
        layout = matrix if spec[0] == "dense" else pack_nm(matrix, spec[1], spec[2])
        module = QuantLinear(quantize(layout, WeightScheme(bits, 32)), None)
        w = module._arrays()
        g = torch.Generator().manual_seed(300 + index)
        x, bias, relu = torch.randn(tokens, columns, generator=g), torch.randn(out, generator=g), index % 2
        ref = quantize_activations(x, module.act_block).double() @ module._packed.dense().double().T + bias.double()
        expected.append(ref.clamp_min(0) if relu else ref)
        p = lambda name, i=index: tmp_path / f"g{i}_{name}.bin"  # noqa: E731
        nm = w.kind == 0
        jc, code_bits = (nm_chunk(columns, w.n, w.m), offset_bits(w.m)) if nm else (columns, 0)
        codes = _write(p("codes"), w.index.numpy()) if nm else "-"
        lines.append(f"q_gemm {w.kind} {codes} {_write(p('q'), w.q.numpy())} {_write(p('scales'), w.scales.numpy())} "
                     f"{out} {columns} {w.n} {w.m} {jc} {code_bits} {bits} {w.group} {_write(p('x'), x.numpy())} "
                     f"{tokens} {p('out')} {_write(p('bias'), bias.numpy())} {relu} 2")
    proc = _run(arm_harness, tmp_path, lines)
    assert proc.returncode == 0, (proc.returncode, proc.stderr[-2000:])
    for index, ref in enumerate(expected):
        got = _read(tmp_path / f"g{index}_out.bin").double().reshape(ref.shape)
        assert float((got - ref).abs().max() / ref.abs().max()) < 3e-6, f"batched case {index}"


def test_the_harness_reports_a_malformed_case(arm_harness, tmp_path):
    """A line the harness cannot read fails the run (so a format drift between this test and the
    harness cannot pass silently)."""
    assert _run(arm_harness, tmp_path, ["nm_mm only three fields"]).returncode != 0


def _topk4_reference(scores: torch.Tensor, k: int, absolute: bool) -> torch.Tensor:
    """nmsparse.mask's rule on [outer, width, inner] scores, groups of 4 along width: rank_i = #{j: s_j > s_i}
    + #{j < i: s_j == s_i}, kept when rank_i < k; NaN ranks lowest."""
    s = scores.abs() if absolute else scores
    s = torch.where(torch.isnan(s), torch.full_like(s, float("-inf")), s)
    outer, width, inner = s.shape
    g = s.reshape(outer, width // 4, 4, inner)
    a, b = g.unsqueeze(3), g.unsqueeze(2)  # a: s_i along dim 2, b: s_j along dim 3
    earlier = torch.tril(torch.ones(4, 4, dtype=torch.bool), diagonal=-1).reshape(1, 1, 4, 4, 1)  # j < i
    rank = ((b > a) | ((b == a) & earlier)).sum(3)
    return (rank < k).reshape(outer, width, inner)


def test_neon_mask_kernels_under_emulation_follow_the_tie_rule(arm_harness, tmp_path):
    lines, expected = [], []
    shapes = [(1, 64, 1), (3, 16, 7), (5, 12, 33), (2, 40, 16)]  # flat (inner 1), strided, tails of the vectors
    for index, ((outer, width, inner), k, absolute) in enumerate(
            [(s, k, a) for s in shapes for k in (1, 2, 3) for a in (False, True)]):
        scores = torch.randn(outer, width, inner, generator=torch.Generator().manual_seed(index))
        scores = (scores * 2).round() / 2  # many ties (and +-x pairs under absolute)
        scores.view(-1)[::11] = float("nan")
        expected.append(_topk4_reference(scores, k, absolute).float())
        src = _write(tmp_path / f"m{index}_src.bin", scores.numpy())
        lines.append(f"topk4 {src} {outer} {width} {inner} {k} {int(absolute)} {tmp_path / f'm{index}_out.bin'} 2")
    grad, weight = torch.randn(1000), torch.randn(1000)
    keep = (torch.rand(1000) < 0.5).float()
    lines.append(f"decay {_write(tmp_path / 'g.bin', grad.numpy())} {_write(tmp_path / 'w.bin', weight.numpy())} "
                 f"{_write(tmp_path / 'keep.bin', keep.numpy())} 0.0002 1000 {tmp_path / 'decayed.bin'} 2")
    proc = _run(arm_harness, tmp_path, lines)
    assert proc.returncode == 0, proc.stderr[-2000:]
    for index, ref in enumerate(expected):
        got = _read(tmp_path / f"m{index}_out.bin").reshape(ref.shape)
        assert torch.equal(got, ref), f"mask case {index}"
    decayed = _read(tmp_path / "decayed.bin")
    torch.testing.assert_close(decayed, grad + 0.0002 * (1 - keep) * weight)
