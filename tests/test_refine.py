"""Mask refinement (nmsparse.refine): the output error never rises, the pattern holds, swaps help."""

import pytest
import torch

from nmsparse.mask import compute_mask, is_block_uniform, is_nm
from nmsparse.pattern import BlockPattern, NMPattern, parse_pattern
from nmsparse.refine import layer_error, refinable, refine_mask


def _layer(rows=24, cols=64, tokens=256, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, cols, generator=g)
    # correlated inputs with uneven scales: the magnitude mask is far from the best one
    mix = torch.randn(cols, cols, generator=g) * 0.3 + torch.eye(cols)
    x = (torch.randn(tokens, cols, generator=g) @ mix) * torch.rand(cols, generator=g).mul(3).add(0.1)
    return w, x.t() @ x


@pytest.mark.parametrize("pattern", ["2:4", "1:4", "4:8", "2:8"])
@pytest.mark.parametrize("batch", [1, 16])
def test_nm_refinement_never_raises_the_error_and_keeps_the_pattern(pattern, batch):
    w, gram = _layer()
    pat = parse_pattern(pattern)
    mask = compute_mask(w.abs(), pat)
    res = refine_mask(w, mask, gram, pat, batch=batch)
    assert is_nm(res.mask.float(), pat) and res.mask.sum() == mask.sum()
    before = layer_error(w, w * mask, gram)
    after = layer_error(w, w * res.mask, gram)
    assert torch.all(after <= before * (1 + 1e-5) + 1e-6)  # per row, not only in total
    assert res.error_before == pytest.approx(float(before.sum()), rel=1e-4)
    assert res.error_after == pytest.approx(float(after.sum()), rel=1e-4)
    assert res.swaps > 0 and res.error_after < 0.9 * res.error_before  # correlated inputs: swaps pay


def test_refinement_reaches_a_swap_optimum():
    """After refinement no single swap inside a group lowers a row's error (checked by brute force)."""
    w, gram = _layer(rows=4, cols=16)
    pat = NMPattern(2, 4)
    res = refine_mask(w, compute_mask(w.abs(), pat), gram, pat, max_rounds=1000)
    base = layer_error(w, w * res.mask, gram)
    for r in range(4):
        for grp in range(4):
            cols = range(grp * 4, grp * 4 + 4)
            for i in cols:
                for j in cols:
                    if res.mask[r, i] and not res.mask[r, j]:
                        m2 = res.mask.clone()
                        m2[r, i], m2[r, j] = False, True
                        assert layer_error(w, w * m2, gram)[r] >= base[r] - 1e-4 * base[r]


def test_block_refinement_keeps_blocks_uniform_and_lowers_the_error():
    w, gram = _layer(rows=32, cols=48)
    pat = BlockPattern(8, 0.25)
    mask = compute_mask(w.abs(), pat)
    res = refine_mask(w, mask, gram, pat)
    assert is_block_uniform(res.mask.float(), pat) and res.mask.sum() == mask.sum()
    before, after = layer_error(w, w * mask, gram), layer_error(w, w * res.mask, gram)
    assert after.sum() <= before.sum() and res.error_after < 0.95 * res.error_before
    for b in range(4):  # every block row's error, not only the total
        assert after[b * 8:(b + 1) * 8].sum() <= before[b * 8:(b + 1) * 8].sum() * (1 + 1e-5)


def test_identity_gram_keeps_the_magnitude_mask():
    """With X^T X = I the error is the pruned weights' squared sum: magnitude is already optimal."""
    w = torch.randn(8, 32, generator=torch.Generator().manual_seed(3))
    pat = NMPattern(2, 4)
    mask = compute_mask(w.abs(), pat)
    res = refine_mask(w, mask, torch.eye(32), pat)
    assert res.swaps == 0 and torch.equal(res.mask, mask)


def test_refusals_name_the_problem():
    w, gram = _layer(rows=8, cols=18)
    assert "multiple of m" in refinable((8, 18), (NMPattern(2, 4),))
    assert "2-D" in refinable((8, 4, 3, 3), (NMPattern(2, 4),))
    assert "input axis" in refinable((8, 16), (NMPattern(2, 4, "out"),))
    with pytest.raises(ValueError, match="multiple of m"):
        refine_mask(w, torch.ones_like(w, dtype=torch.bool), gram, NMPattern(2, 4))
    w, gram = _layer(rows=8, cols=16)
    with pytest.raises(ValueError, match="shapes do not match"):
        refine_mask(w, torch.ones(8, 8, dtype=torch.bool), gram, NMPattern(2, 4))


# ---------------------------------------------------------------- in the one-shot pipeline

def _correlated(n=256, cols=32, seed=0):
    gen = torch.Generator().manual_seed(seed)
    mix = torch.eye(cols) + 0.4 * torch.randn(cols, cols, generator=gen)
    return (torch.randn(n, cols, generator=gen) * torch.linspace(0.1, 3.0, cols)) @ mix


def _model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(32, 32), torch.nn.Tanh(), torch.nn.Linear(32, 16))


@pytest.mark.parametrize("method", ["magnitude", "wanda", "sparsegpt"])
def test_prune_with_refine_lowers_every_layers_error_and_keeps_the_pattern(method):
    from nmsparse.oneshot import PruneConfig, prune
    from nmsparse.select import Selection

    x = _correlated()
    batches = [x[:128], x[128:]]
    plain, refined = _model(), _model()
    sel = Selection(keep_classifier=False)
    base = prune(plain, PruneConfig("2:4", method, sel), calibration=batches, progress="none")
    res = prune(refined, PruneConfig("2:4", method, sel, refine=True), calibration=batches, progress="none")
    before = {r.fqn: r.reconstruction_error for r in base.sparse_rows}
    for row in res.sparse_rows:
        assert row.verified and row.refinement is not None and "swaps" in row.refinement
        assert row.reconstruction_error <= before[row.fqn] * (1 + 1e-4) + 1e-7
        assert row.as_dict()["refinement"] == row.refinement
    for layer in (refined[0], refined[2]):
        assert is_nm(layer.weight.detach(), NMPattern(2, 4))
    if method != "sparsegpt":  # refinement of a mask without weight updates on correlated inputs pays
        assert sum(r.reconstruction_error for r in res.sparse_rows) < 0.95 * sum(before.values())


def test_sparsegpt_fixed_mask_resolve_beats_plain_masking():
    """The re-solve for a given mask (sparsegpt's OBS pass with the mask fixed) keeps that mask and
    has a lower error than the mask alone."""
    from nmsparse.method import LayerStats, build_method

    x = _correlated(cols=32)
    w = torch.randn(16, 32, generator=torch.Generator().manual_seed(1))
    stats = LayerStats(32, hessian=True)
    stats.add(x)
    pat = NMPattern(2, 4)
    mask = compute_mask(w.abs(), pat)
    resolved = build_method("sparsegpt").reweigh(w, mask, (pat,), stats)
    assert torch.equal(resolved != 0, mask)
    gram = stats.gram()
    assert layer_error(w, resolved, gram).sum() < 0.9 * layer_error(w, w * mask, gram).sum()


def test_refine_without_calibration_and_on_convs_is_refused_or_reported():
    from nmsparse.method import MethodError
    from nmsparse.oneshot import PruneConfig, prune

    from .conftest import TinyCNN

    with pytest.raises(MethodError, match="refinement needs calibration"):
        prune(_model(), PruneConfig("2:4", "magnitude", refine=True), progress="none")
    model = TinyCNN()
    res = prune(model, PruneConfig("2:4", "wanda", refine=True), calibration=[torch.randn(4, 1, 8, 8)], progress="none")
    convs = [r for r in res.sparse_rows if len(r.shape) == 4]
    assert convs and all("2-D" in r.refinement["skipped"] for r in convs)


def test_ria_score_by_hand_and_as_a_method():
    from nmsparse.method import LayerStats, build_method
    from nmsparse.score import relative_importance

    w = torch.tensor([[1.0, -2.0, 3.0, 0.5], [4.0, 0.0, -1.0, 1.0]])
    norms = torch.tensor([4.0, 1.0, 0.25, 1.0])
    got = relative_importance(w, norms)
    a = w.abs()
    want = (a / a.sum(1, keepdim=True) + a / a.sum(0, keepdim=True)) * norms.sqrt()
    assert torch.allclose(got, want)
    assert torch.isclose(got[0, 0], torch.tensor((1 / 6.5 + 1 / 5) * 2.0))
    stats = LayerStats(4, hessian=False)
    stats.add(torch.diag(norms))  # one row per input: ||X_j|| = norms[j]
    new_w, mask = build_method("ria").prune_weight(w, (NMPattern(2, 4),), stats)
    assert torch.equal(mask, compute_mask(want, NMPattern(2, 4)))
    assert torch.equal(new_w, w * mask)


def test_method_best_runs_the_measured_pipeline_and_names_it(monkeypatch):
    from nmsparse.method import MethodError
    from nmsparse.oneshot import PruneConfig, prune
    from nmsparse.oneshot.prune import BEST, BestPipeline
    from nmsparse.select import Selection

    x = _correlated()
    model = _model()
    res = prune(model, PruneConfig("2:4", "best", Selection(keep_classifier=False)), calibration=[x], progress="none")
    assert res.method == "best: sparsegpt" and BEST["classifier"] == BestPipeline("sparsegpt")
    assert all(r.refinement is None for r in res.sparse_rows) and not res.permutation
    assert is_nm(model[0].weight.detach(), NMPattern(2, 4))
    monkeypatch.setitem(BEST, "classifier", BestPipeline("wanda", True))  # the table decides what runs
    res = prune(_model(), PruneConfig("2:4", "best", Selection(keep_classifier=False)), calibration=[x],
                progress="none")
    assert res.method == "best: wanda + refine" and all(r.refinement for r in res.sparse_rows)
    with pytest.raises(MethodError, match="needs calibration data"):
        prune(_model(), PruneConfig("2:4", "best"), progress="none")


def test_method_best_for_a_causal_lm_permutes_decoder_channels_then_runs_sparsegpt():
    transformers = pytest.importorskip("transformers")
    from nmsparse.oneshot import PruneConfig, prune

    config = transformers.LlamaConfig(vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                      num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=32)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config).eval()
    batch = {"input_ids": torch.randint(0, 100, (2, 16))}
    reference = model(**batch).logits
    res = prune(model, PruneConfig("2:4", "best", tune_steps=2), calibration=[batch], progress="none")
    assert res.method == "best: sparsegpt + permute (1 sweep) + sequential + scale tuning"
    assert res.calibration["sequential"] and res.tuning["steps"] == 2  # the run's own budget replaces best's
    folded = {r["fqn"] for r in res.permutation if r["folded_into"]}
    assert "model.layers.0.mlp.down_proj" in folded
    assert is_nm(model.model.layers[0].mlp.down_proj.weight.detach(), NMPattern(2, 4))
    assert not torch.allclose(model(**batch).logits, reference)  # pruned
