import pytest
import torch

from nmsparse.grad import SRSTE_DEFAULT_DECAY, apply_rule, masked, srste, ste


def _setup():
    w = torch.tensor([[4.0, -3.0, 2.0, 1.0], [-1.0, 2.0, -3.0, 4.0]], requires_grad=True)
    mask = torch.tensor([[True, True, False, False], [False, False, True, True]])
    g = torch.tensor([[0.1, 0.2, 0.3, 0.4], [0.5, 0.6, 0.7, 0.8]])
    return w, mask, g


def test_forward_is_hard_mask_at_d0_and_dense_at_d1():
    w, mask, _ = _setup()
    for rule in ("ste", "srste", "masked"):
        assert torch.equal(apply_rule(rule, w, mask, 0.0, 0.1), w * mask)
        assert torch.equal(apply_rule(rule, w, mask, 1.0, 0.1), w)
        half = apply_rule(rule, w, mask, 0.5, 0.1)
        assert torch.allclose(half, torch.where(mask, w, 0.5 * w))


def test_ste_passes_gradient_to_every_weight():
    w, mask, g = _setup()
    ste(w, mask).backward(g)
    assert torch.equal(w.grad, g)


def test_srste_by_hand():
    w, mask, g = _setup()
    srste(w, mask, decay=0.5).backward(g)
    expected = g + 0.5 * torch.where(mask, 0.0, w.detach())
    assert torch.allclose(w.grad, expected)
    # pruned entries by hand: (0, 2): 0.3 + 0.5 * 2 = 1.3 ; (1, 0): 0.5 + 0.5 * -1 = 0.0
    assert w.grad[0, 2].item() == pytest.approx(1.3)
    assert w.grad[1, 0].item() == pytest.approx(0.0)
    assert SRSTE_DEFAULT_DECAY == 2e-4


def test_srste_decay_ignores_dense_factor_in_backward():
    w, mask, g = _setup()
    srste(w, mask, dense_factor=0.3, decay=0.1).backward(g)
    assert torch.allclose(w.grad, g + 0.1 * torch.where(mask, 0.0, w.detach()))


def test_masked_blocks_pruned_gradients():
    w, mask, g = _setup()
    masked(w, mask).backward(g)
    assert torch.equal(w.grad, g * mask)


@pytest.mark.parametrize("rule", ["ste", "srste", "masked"])
def test_gradcheck_float64(rule):
    torch.manual_seed(0)
    w = torch.randn(4, 8, dtype=torch.float64, requires_grad=True)
    x = torch.randn(3, 8, dtype=torch.float64, requires_grad=True)
    mask = torch.rand(4, 8) > 0.5

    # gradcheck compares against finite differences of the forward; ste/srste deliberately
    # differ from that on pruned weights, so check them on x (and on w only for 'masked').
    def f_x(x_):
        return x_ @ apply_rule(rule, w.detach(), mask, 0.0, 0.01).t()

    assert torch.autograd.gradcheck(f_x, (x,))
    if rule == "masked":
        assert torch.autograd.gradcheck(lambda w_: x.detach() @ apply_rule(rule, w_, mask, 0.25).t(), (w,))
    else:
        # on kept weights the estimator equals the true gradient: check with an all-True mask
        full = torch.ones_like(mask)
        assert torch.autograd.gradcheck(lambda w_: x.detach() @ apply_rule(rule, w_, full, 0.0, 0.01).t(), (w,))


def test_unknown_rule():
    w, mask, _ = _setup()
    with pytest.raises(ValueError, match="expected one of ste, srste, masked"):
        apply_rule("sr-ste", w, mask)


def test_srste_fused_cpu_backward_matches_the_torch_formula():
    """The one-pass numba backward (contiguous float32 CPU) equals g + decay * (W - W*M)."""
    torch.manual_seed(0)
    w = torch.randn(64, 32, 3, 3, requires_grad=True)
    mask = torch.rand(64, 32, 3, 3) > 0.5
    g = torch.randn(64, 32, 3, 3)
    srste(w, mask, decay=0.25).backward(g)
    expected = g + 0.25 * (w.detach() - w.detach() * mask)
    assert torch.allclose(w.grad, expected, rtol=1e-6, atol=1e-7)
    w2 = w.detach().clone().requires_grad_()  # a non-contiguous gradient takes the torch path, same result
    srste(w2, mask, decay=0.25).backward(g.transpose(0, 1).contiguous().transpose(0, 1))
    assert torch.allclose(w2.grad, expected, rtol=1e-6, atol=1e-7)


def _srste_pair():
    """A prepared SR-STE model and the same weights under the functional rule (no hook)."""
    import copy

    from torch import nn

    from nmsparse import Selection, Sparsifier

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(4, 8, 1), nn.Conv2d(8, 8, 3), nn.Flatten(), nn.Linear(8 * 4 * 4, 16),
                          nn.Linear(16, 4))
    sparsifier = Sparsifier("srste", "2:4", Selection(layers=("all",)), method_options={"decay": 0.05})
    sparsifier.prepare(model)
    reference = copy.deepcopy(model)  # copies are unbound: their forward applies the full rule in the graph
    return model, reference, sparsifier


def test_sparsifier_srste_decay_hook_gives_the_functional_rule():
    model, reference, _ = _srste_pair()
    param = model[1].parametrizations.weight[0]
    assert param._decay_hook is not None and reference[1].parametrizations.weight[0]._decay_hook is None
    x = torch.randn(4, 4, 6, 6)
    for _ in range(2):  # gradient accumulation: the decay is added once per backward, as in the graph rule
        model(x).square().sum().backward()
        reference(x).square().sum().backward()
    for layer in (1, 3):
        got = model[layer].parametrizations.weight.original.grad
        want = reference[layer].parametrizations.weight.original.grad
        assert torch.allclose(got, want, rtol=1e-6, atol=1e-7)
        weight = model[layer].parametrizations.weight.original.detach()
        keep = model[layer].parametrizations.weight[0].keep
        assert (weight * (1 - keep)).abs().sum() > 0  # the decay term is really in play


def test_add_decay_in_place_every_path(monkeypatch):
    from nmsparse.grad import add_decay_

    grad, weight = torch.randn(6, 8), torch.randn(6, 8)
    keep = (torch.rand(6, 8) > 0.5).float()
    want = grad + 0.1 * (1 - keep) * weight
    fused = grad.clone()
    assert add_decay_(fused, weight, keep, 0.1) is fused
    assert torch.allclose(fused, want, atol=1e-7)
    strided = grad.clone().t().contiguous().t()  # not contiguous: the torch path
    add_decay_(strided, weight, keep, 0.1)
    assert torch.allclose(strided, want, atol=1e-6)
    from nmsparse import _topk_cpu

    if _topk_cpu.cpp_library() is not None and _topk_cpu.available():  # the numba kernel, as without a compiler
        monkeypatch.setenv("NMSPARSE_MASK_BACKEND", "numba")
        _topk_cpu.cpp_library.cache_clear()
        try:
            numba_path = grad.clone()
            add_decay_(numba_path, weight, keep, 0.1)
            assert torch.allclose(numba_path, want, atol=1e-7)
        finally:
            monkeypatch.delenv("NMSPARSE_MASK_BACKEND")
            _topk_cpu.cpp_library.cache_clear()


def test_squash_releases_the_decay_hook():
    model, _, sparsifier = _srste_pair()
    weight = model[1].parametrizations.weight.original
    assert weight._post_accumulate_grad_hooks
    sparsifier.squash()
    assert model[1].weight is weight and not weight._post_accumulate_grad_hooks
    x = torch.randn(2, 4, 6, 6)
    model(x).sum().backward()
    (plain,) = torch.autograd.grad(model(x).sum(), weight)  # never accumulates: no hook could run
    assert torch.equal(weight.grad, plain)
