import pytest
from hypothesis import given
from hypothesis import strategies as st

from nmsparse.pattern import BlockPattern, NMPattern, PatternError, parse_pattern


@pytest.mark.parametrize(
    "text,n,m,axis",
    [
        ("2:4", 2, 4, "in"),
        ("1:8", 1, 8, "in"),
        ("16:32", 16, 32, "in"),
        (" 4 : 8 ", 4, 8, "in"),
        ("2:4@out", 2, 4, "out"),
        ("1:4@flat", 1, 4, "flat"),
    ],
)
def test_parse_nm(text, n, m, axis):
    p = parse_pattern(text)
    assert (p.n, p.m, p.axis) == (n, m, axis)
    assert p.density == n / m
    assert parse_pattern(str(p)) == p


def test_parse_block():
    p = parse_pattern("1x16:0.25")
    assert isinstance(p, BlockPattern) and p.block == 16 and p.density == 0.25
    assert p.kept_per_row(64) == 16
    assert parse_pattern(str(p)) == p


@pytest.mark.parametrize(
    "text,needle",
    [
        ("5:4", "1 <= n <= m"),
        ("0:4", "1 <= n <= m"),
        ("2:0", "m must be >= 1"),
        ("two:four", "cannot parse"),
        ("2/4", "cannot parse"),
        ("", "cannot parse"),
        ("1x16:1.5", "(0, 1]"),
        ("1x0:0.5", "positive"),
        ("2:4@diag", "axis"),
    ],
)
def test_invalid_specs_say_what_is_valid(text, needle):
    with pytest.raises(PatternError, match=needle.replace("(", r"\(").replace(")", r"\)").replace("[", r"\[")):
        parse_pattern(text)


def test_block_size_must_divide_out_channels():
    with pytest.raises(PatternError, match="does not divide the 24 output channels"):
        BlockPattern(16, 0.5).check_shape((24, 8, 3, 3))
    BlockPattern(8, 0.5).check_shape((24, 8, 3, 3))


def test_width_check_names_axis():
    with pytest.raises(PatternError, match="not a multiple of m=4"):
        NMPattern(2, 4).check_shape((8, 6))
    NMPattern(2, 4, "out").check_shape((8, 6))
    with pytest.raises(PatternError, match="grouped width 18"):
        NMPattern(2, 4, "flat").check_shape((8, 2, 3, 3))
    NMPattern(2, 4, "flat").check_shape((8, 4, 3, 3))


@given(st.integers(1, 64), st.integers(1, 64))
def test_nm_valid_iff_n_le_m(n, m):
    if n <= m:
        assert NMPattern(n, m).sparsity == pytest.approx(1 - n / m)
    else:
        with pytest.raises(PatternError):
            NMPattern(n, m)
