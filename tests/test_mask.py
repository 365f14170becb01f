import itertools

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from nmsparse.mask import (
    block_mask,
    block_row_counts,
    block_scores,
    compute_mask,
    from_groups,
    group_counts,
    is_block_uniform,
    is_nm,
    nm_mask,
    sliced_mask,
    to_groups,
    topk_groups,
)
from nmsparse.pattern import BlockPattern, NMPattern, PatternError, parse_pattern

NM = [(1, 2), (2, 4), (1, 4), (3, 4), (4, 8), (2, 8), (1, 8), (7, 8), (8, 16), (16, 32), (3, 5), (2, 12)]


@pytest.mark.parametrize("n,m", NM)
@pytest.mark.parametrize("axis", ["in", "out", "flat"])
@pytest.mark.parametrize("shape", [(24, 48), (24, 48, 3, 3), (48, 24, 1, 1)])
def test_exactly_n_kept_per_group(n, m, axis, shape):
    pattern = NMPattern(n, m, axis)
    w = torch.randn(shape)
    try:
        pattern.check_shape(shape)
    except PatternError:
        with pytest.raises(PatternError):
            nm_mask(w.abs(), pattern)
        return
    mask = nm_mask(w.abs(), pattern)
    assert mask.shape == w.shape and mask.dtype == torch.bool
    counts = group_counts(w * mask, pattern)
    assert torch.all(counts == n)
    assert is_nm(w * mask, pattern)
    # the kept weights are the n largest of each group
    groups = to_groups(w.abs(), pattern)
    kept = to_groups(mask, pattern)
    smallest_kept = torch.where(kept, groups, torch.inf).min(1).values
    largest_pruned = torch.where(~kept, groups, -torch.inf).max(1).values
    assert torch.all(smallest_kept >= largest_pruned)


def test_conv_default_groups_run_along_input_channels():
    w = torch.zeros(1, 4, 2, 1)
    w[0, :, 0, 0] = torch.tensor([1.0, 4.0, 3.0, 2.0])  # position (kh=0): keep channels 1, 2
    w[0, :, 1, 0] = torch.tensor([5.0, 1.0, 1.0, 6.0])  # position (kh=1): keep channels 0, 3
    mask = nm_mask(w.abs(), NMPattern(2, 4))
    assert mask[0, :, 0, 0].tolist() == [False, True, True, False]
    assert mask[0, :, 1, 0].tolist() == [True, False, False, True]


def test_tie_rule_keeps_lower_index():
    scores = torch.tensor([[1.0, 1.0, 1.0, 1.0], [0.0, 2.0, 2.0, 2.0], [3.0, 3.0, 1.0, 3.0]])
    assert topk_groups(scores, 2).tolist() == [
        [True, True, False, False],
        [False, True, True, False],
        [True, True, False, False],
    ]
    long = torch.ones(2, 16)  # the argsort path (m > 8) follows the same rule
    assert topk_groups(long, 3)[0].nonzero().flatten().tolist() == [0, 1, 2]


def test_nan_scores_are_pruned_first():
    scores = torch.tensor([[float("nan"), 1.0, 2.0, 0.5]])
    assert topk_groups(scores, 2).tolist() == [[False, True, True, False]]


@settings(max_examples=60, deadline=None)
@given(
    n_m=st.sampled_from(NM),
    rows=st.integers(1, 6),
    groups=st.integers(1, 5),
    axis=st.sampled_from(["in", "out", "flat"]),
    conv=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_property_counts_and_round_trip(n_m, rows, groups, axis, conv, seed):
    n, m = n_m
    gen = torch.Generator().manual_seed(seed)
    if axis == "out":
        shape = (groups * m, rows, 3, 3) if conv else (groups * m, rows)
    else:
        shape = (rows, groups * m, 3, 3) if conv else (rows, groups * m)
    pattern = NMPattern(n, m, axis)
    # integer-valued scores produce many ties: the rule must still keep exactly n, deterministically
    w = torch.randint(-3, 4, shape, generator=gen).float()
    assert torch.equal(from_groups(to_groups(w, pattern), w.shape, pattern), w)
    mask = nm_mask(w.abs(), pattern)
    assert torch.all(to_groups(mask, pattern).sum(1) == n)
    assert torch.equal(mask, nm_mask(w.abs(), pattern))  # deterministic
    assert torch.equal(nm_mask(mask.float() * w.abs(), pattern) & mask, nm_mask(mask.float() * w.abs(), pattern))


def test_flat_equals_in_for_linear_and_1x1():
    w = torch.randn(8, 16, 1, 1)
    assert torch.equal(nm_mask(w.abs(), NMPattern(2, 4, "in")), nm_mask(w.abs(), NMPattern(2, 4, "flat")))
    w = torch.randn(8, 16)
    assert torch.equal(nm_mask(w.abs(), NMPattern(2, 4, "in")), nm_mask(w.abs(), NMPattern(2, 4, "flat")))


def test_is_nm_allows_extra_zeros_and_rejects_dense():
    w = torch.tensor([[1.0, 0.0, 0.0, 0.0, 1.0, 1.0, 0.0, 0.0]])
    assert is_nm(w, NMPattern(2, 4))
    assert not is_nm(torch.ones(1, 8), NMPattern(2, 4))
    assert not is_nm(torch.ones(1, 6), NMPattern(2, 4))  # width not a multiple of m


@pytest.mark.parametrize("block", [4, 8, 16])
@pytest.mark.parametrize("density", [0.25, 0.5, 0.75])
def test_block_mask_uniform_rows(block, density):
    w = torch.randn(32, 24, 3, 3)
    pattern = BlockPattern(block, density)
    mask = compute_mask(w.abs(), pattern)
    counts = block_row_counts(w * mask, block)
    assert torch.all(counts == pattern.kept_per_row(24))
    assert is_block_uniform(w * mask, pattern)
    # every block (block out-channels x 1 in-channel x kernel) is all kept or all pruned
    per_block = mask.reshape(32 // block, block, 24, 9).float().mean(dim=(1, 3))
    assert set(per_block.unique().tolist()) <= {0.0, 1.0}


def test_block_scores_by_hand():
    w = torch.arange(16, dtype=torch.float32).reshape(4, 4) - 8  # [out=4, in=4]
    l1 = block_scores(w, 2, "l1")
    assert l1.tolist() == [[12.0, 10.0, 8.0, 6.0], [4.0, 6.0, 8.0, 10.0]]
    l2 = block_scores(w, 2, "l2")
    assert l2[0, 0].item() == pytest.approx((64 + 16) ** 0.5)
    mask = block_mask(l1, BlockPattern(2, 0.5), w.shape)
    assert mask[:2].tolist() == [[True, True, False, False]] * 2
    assert mask[2:].tolist() == [[False, False, True, True]] * 2


def test_sliced_mask_per_slice_patterns():
    w = torch.randn(12, 8)
    patterns = (NMPattern(2, 4), NMPattern(1, 4), NMPattern(4, 4))
    mask = sliced_mask(w.abs(), patterns)
    assert mask[:4].sum().item() == 4 * 4
    assert mask[4:8].sum().item() == 4 * 2
    assert bool(mask[8:].all())


def test_all_patterns_of_small_groups_are_reachable():
    # every one of the C(4, 2) = 6 patterns of 2:4 comes out for a suitable score vector
    seen = set()
    for kept in itertools.combinations(range(4), 2):
        scores = torch.zeros(1, 4)
        scores[0, list(kept)] = 1.0
        seen.add(tuple(topk_groups(scores, 2)[0].tolist()))
    assert len(seen) == 6


@pytest.mark.parametrize("m", [2, 4, 5, 8, 16, 32])
@pytest.mark.parametrize("absolute", [False, True])
def test_cpu_kernel_matches_torch_reference(m, absolute):
    from nmsparse import _topk_cpu
    from nmsparse.mask import _topk_torch

    if not _topk_cpu.available():
        pytest.skip("numba not installed: the torch path is the only path")
    gen = torch.Generator().manual_seed(m)
    scores = torch.randint(-3, 4, (500, m), generator=gen).float()  # many ties, negative values
    scores[0, 0] = float("nan")
    for k in range(1, m):
        expected = _topk_torch(scores.abs() if absolute else scores, k)
        assert torch.equal(_topk_cpu.topk_rows(scores, k, absolute), expected)


def test_cpu_kernel_leaves_torch_thread_count_alone():
    from nmsparse import _topk_cpu

    if not _topk_cpu.available():
        pytest.skip("numba not installed")
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        nm_mask(torch.randn(64, 64), NMPattern(2, 4))
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize("m", [4, 8])
@pytest.mark.parametrize("shape, axis", [((8, 16, 3, 3), "in"), ((8, 16, 1, 1), "in"), ((16, 24), "in"),
                                         ((16, 8, 3, 3), "out"), ((8, 16, 3, 3), "flat")])
def test_mask_written_into_a_float_buffer_equals_the_reference(m, shape, axis):
    # the Sparsifier ranks straight into the forward's 0/1 buffer; it must hold the reference mask
    from nmsparse.mask import _topk_torch

    gen = torch.Generator().manual_seed(m)
    weight = torch.randint(-3, 4, shape, generator=gen).float()  # many ties, negative values
    weight.view(-1)[5] = float("nan")
    pattern = NMPattern(m // 2, m, axis)
    groups = to_groups(weight, pattern)
    expected = from_groups(_topk_torch(groups.abs(), m // 2), weight.shape, pattern)
    out = torch.full(shape, 7.0)  # stale values must all be overwritten
    returned = nm_mask(weight, pattern, absolute=True, out=out)
    assert returned is out
    assert set(out.unique().tolist()) <= {0.0, 1.0}
    assert torch.equal(out.bool(), expected)
    half = torch.full(shape, 7.0, dtype=torch.bfloat16)  # not the kernel's dtype: copied, same values
    assert torch.equal(nm_mask(weight, pattern, absolute=True, out=half).bool(), expected)


def test_sliced_mask_into_a_buffer_per_slice():
    weight = torch.randn(12, 8)
    patterns = (NMPattern(2, 4), NMPattern(4, 4), parse_pattern("1:4"))
    out = torch.full((12, 8), 7.0)
    sliced_mask(weight, patterns, absolute=True, out=out)
    assert torch.equal(out.bool(), sliced_mask(weight, patterns, absolute=True))
    with pytest.raises(ValueError, match="shape"):
        sliced_mask(weight, patterns, out=torch.zeros(12, 4))


def _reference_float_cases():
    """(scores, outer, width, inner, k, absolute, expected bool) for the conv and Linear layouts, with ties and NaN."""
    from nmsparse.mask import _topk_torch

    gen = torch.Generator().manual_seed(3)
    cases = []
    for shape in ((16, 12, 3, 3), (16, 12, 5, 5), (24, 40), (8, 8, 1, 1)):
        w = torch.randint(-3, 4, shape, generator=gen).float()
        w.view(-1)[7] = float("nan")
        inner = w[0, 0].numel() if w.dim() == 4 else 1
        for k in (1, 2, 3):
            for absolute in (True, False):
                pattern = NMPattern(k, 4)
                groups = to_groups(w, pattern)
                expected = from_groups(_topk_torch(groups.abs() if absolute else groups, k), w.shape, pattern)
                cases.append((w, shape[0], shape[1], inner, k, absolute, expected))
    return cases


@pytest.mark.parametrize("variant", ["native", "avx512", "avx2", "generic"])
def test_cpp_mask_kernels_of_every_instruction_set_equal_the_reference(variant, tmp_path):
    """masks.cpp built for each instruction set: those this CPU runs must give the reference masks
    (1.0 / 0.0, stale values overwritten); the others must at least compile."""
    from nmsparse import _cxx, _topk_cpu
    from nmsparse.runtime._native import runnable_variants

    if _cxx.compiler() is None:
        pytest.skip("no C++ compiler: the numba path serves")
    lib = _topk_cpu.cpp_library(variant) if variant in runnable_variants() else None
    if lib is None:  # compile only: this CPU cannot run it
        out = tmp_path / "masks.so"
        _cxx.build(_cxx.compiler(), _topk_cpu._MASKS_SOURCE, out, _cxx.BASE_FLAGS + _topk_cpu.MASK_VARIANTS[variant],
                   "mask kernels")
        assert out.stat().st_size > 5_000
        return
    for w, outer, width, inner, k, absolute, expected in _reference_float_cases():
        out = torch.full(w.shape, 7.0)
        lib.nms_mask_topk4(w.data_ptr(), out.data_ptr(), outer, width, inner, k, int(absolute), 2)
        assert set(out.unique().tolist()) <= {0.0, 1.0}
        assert torch.equal(out.bool(), expected), (variant, tuple(w.shape), k, absolute)


def test_float_buffer_path_without_a_compiler_uses_numba(monkeypatch):
    from nmsparse import _topk_cpu

    if not _topk_cpu.available():
        pytest.skip("numba not installed")
    monkeypatch.setenv("NMSPARSE_MASK_BACKEND", "numba")
    _topk_cpu.cpp_library.cache_clear()
    try:
        assert _topk_cpu.cpp_library() is None
        for w, _, _, _, k, absolute, expected in _reference_float_cases():
            out = torch.full(w.shape, 7.0)
            nm_mask(w, NMPattern(k, 4), absolute=absolute, out=out)
            assert torch.equal(out.bool(), expected)
    finally:
        monkeypatch.delenv("NMSPARSE_MASK_BACKEND")
        _topk_cpu.cpp_library.cache_clear()
