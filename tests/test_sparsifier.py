import copy

import pytest
import torch

from nmsparse._registry import RegistryError
from nmsparse.mask import is_nm, satisfies
from nmsparse.method import METHODS, CalibratedMethod, build_method, list_methods
from nmsparse.parametrize import is_attached
from nmsparse.pattern import NMPattern, parse_pattern
from nmsparse.schema import ConfigError
from nmsparse.select import Selection
from nmsparse.sparsifier import Sparsifier, SparsifierError

from .conftest import train_steps


def _train_steps(model, sparsifier, steps=3, lr=0.5):
    train_steps(model, sparsifier, steps, (4, 3, 8, 8), lr=lr)


SPARSIFIER_METHODS = [m for m in list_methods() if not issubclass(METHODS.get(m), CalibratedMethod)]


def test_every_method_is_covered_by_a_contract():
    """Each registered method is a training Method (run by the sparsifier contract below) or a
    CalibratedMethod (run by the one-shot contract in test_oneshot_calibrated); nothing else registers."""
    from nmsparse.method import Method

    from .test_oneshot_calibrated import ONE_SHOT

    for name in list_methods():
        cls = METHODS.get(name)
        if issubclass(cls, Method):
            assert name in SPARSIFIER_METHODS, name
        else:
            assert issubclass(cls, CalibratedMethod) and name in ONE_SHOT, name
    assert {"magnitude", "srste", "wanda", "sparsegpt"} <= set(list_methods())


# methods whose patterns or options differ from the plain "2:4" contract
CONTRACT = {
    "block_1xn": ("1x4:0.5", {"update_every_steps": 2}),  # full rate from the start, masks every 2 steps
}


@pytest.mark.parametrize("name", SPARSIFIER_METHODS)
def test_every_method_contract(name, tiny_vit):
    """Every Sparsifier method: prepare -> step -> state round trip -> squash gives valid patterns.

    Calibrated one-shot methods have their own contract in test_oneshot_calibrated.py.
    """
    pattern, options = CONTRACT.get(name, ("2:4", {}))
    horizon = {"total_steps": 12}
    model = tiny_vit
    sparsifier = Sparsifier(name, pattern, method_options=options)
    report = sparsifier.prepare(model, **horizon)
    assert sparsifier.layers, "no layer selected"
    assert all(r.verified for r in report if r.skip_reason is None)
    _train_steps(model, sparsifier)
    state = sparsifier.state_dict()
    other = Sparsifier(build_method(name, options), pattern)
    fresh = type(tiny_vit)()
    other.prepare(fresh, **horizon)
    fresh.load_state_dict(model.state_dict())  # model weights (and learned logits) travel with the model
    other.load_state_dict(state)
    for fqn, layer in sparsifier.layers.items():
        assert torch.equal(layer.mask, other.layers[fqn].mask)
    assert other.state_dict()["last_step"] == state["last_step"]
    entries = sparsifier.squash()
    assert not any(is_attached(layer.module) for layer in sparsifier.layers.values())
    modules = dict(model.named_modules())
    for entry in entries:
        assert satisfies(modules[entry["fqn"]].weight, parse_pattern(pattern))


def test_prepare_does_not_change_model_class_and_masks_forward(tiny_cnn):
    cls = type(tiny_cnn)
    x = torch.randn(2, 1, 8, 8)
    sparsifier = Sparsifier("magnitude", "2:4")
    sparsifier.prepare(tiny_cnn)
    assert type(tiny_cnn) is cls
    w = tiny_cnn.conv2.weight  # parametrized: effective weight
    assert is_nm(w, NMPattern(2, 4))
    assert "parametrizations.weight.original" in "".join(tiny_cnn.state_dict().keys())
    assert not any("mask" in k for k in tiny_cnn.state_dict())  # masks live in the sparsifier
    y = tiny_cnn(x)
    sparsifier.squash()
    assert torch.allclose(tiny_cnn(x), y)
    assert is_nm(tiny_cnn.conv2.weight, NMPattern(2, 4))


def test_magnitude_mask_is_fixed_and_pruned_weights_get_no_gradient(tiny_cnn):
    sparsifier = Sparsifier("magnitude", "2:4")
    sparsifier.prepare(tiny_cnn)
    before = sparsifier.layers["conv2"].mask.clone()
    _train_steps_cnn(tiny_cnn, sparsifier)
    assert torch.equal(before, sparsifier.layers["conv2"].mask)
    dense = tiny_cnn.conv2.parametrizations.weight.original
    assert dense.grad is not None and torch.all(dense.grad[~before] == 0)


def _train_steps_cnn(model, sparsifier, steps=3):
    train_steps(model, sparsifier, steps, (4, 1, 8, 8), lr=0.5)


def test_srste_recomputes_masks_each_step_and_applies_decay(tiny_cnn):
    sparsifier = Sparsifier("srste", "2:4", method_options={"decay": 0.1})
    sparsifier.prepare(tiny_cnn)
    layer = sparsifier.layers["conv2"]
    # push a pruned weight up: after step() it must win its group
    with torch.no_grad():
        pruned = (~layer.mask).nonzero()[0].tolist()
        layer.dense_weight[tuple(pruned)] = 100.0
    sparsifier.step(0)
    assert layer.mask[tuple(pruned)].item()
    # backward adds decay * W on pruned weights
    tiny_cnn.zero_grad()
    tiny_cnn.conv2.weight.sum().backward()
    g = layer.dense_weight.grad
    expected = torch.ones_like(g) + 0.1 * layer.dense_weight.detach() * (~layer.mask)
    assert torch.allclose(g, expected)


def test_report_and_state_errors(tiny_cnn):
    sparsifier = Sparsifier("srste", "2:4")
    with pytest.raises(SparsifierError, match="prepare"):
        sparsifier.step(0)
    report = sparsifier.prepare(tiny_cnn)
    rows = {r.fqn: r for r in report}
    assert rows["conv2"].density == pytest.approx(0.5) and rows["conv2"].verified
    assert rows["fc"].skip_reason and rows["fc"].pattern is None
    with pytest.raises(SparsifierError, match="not a sparsifier state"):
        sparsifier.load_state_dict({"layers": {}})
    with pytest.raises(SparsifierError, match="newer than this nmsparse"):
        sparsifier.load_state_dict({**sparsifier.state_dict(), "version": 99})
    state = sparsifier.state_dict()
    state["layers"].pop("conv2")
    with pytest.raises(SparsifierError, match="do not match"):
        sparsifier.load_state_dict(state)
    with pytest.raises(SparsifierError, match="already"):
        sparsifier.prepare(tiny_cnn)
    sparsifier.squash()
    with pytest.raises(SparsifierError, match="squashed"):
        sparsifier.step(1)


def test_allocation_overrides_default_pattern(tiny_cnn):
    sparsifier = Sparsifier("magnitude", "2:4", allocation={"conv3": "1:8"})
    sparsifier.prepare(tiny_cnn)
    assert sparsifier.layers["conv3"].patterns == (NMPattern(1, 8),)
    assert sparsifier.layers["conv2"].patterns == (NMPattern(2, 4),)
    with pytest.raises(SparsifierError, match="does not have"):
        Sparsifier("magnitude", "2:4", allocation={"nope": "1:8"}).prepare(copy.deepcopy(tiny_cnn))


def test_block_pattern_through_sparsifier(tiny_cnn):
    sparsifier = Sparsifier("magnitude", "1x8:0.25", Selection(keep_classifier=True))
    report = {r.fqn: r for r in sparsifier.prepare(tiny_cnn)}
    assert report["conv3"].verified and report["conv3"].density == pytest.approx(0.25)


def test_build_method_errors():
    with pytest.raises(RegistryError, match="did you mean 'srste'"):
        build_method("srstee")
    with pytest.raises(ConfigError, match="srste.decy: unknown key.*did you mean 'decay'"):
        build_method("srste", {"decy": 0.1})
    with pytest.raises(ConfigError, match="expected a number"):
        build_method("srste", {"decay": "big"})
    assert "magnitude" in METHODS and "srste" in METHODS
