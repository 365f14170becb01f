import pytest
import torch
from torch import nn

from nmsparse.pattern import NMPattern
from nmsparse.permute import kept_magnitude, permute_channels, search_permutation
from nmsparse.select import Selection


class Chain(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(4, 16, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(16)
        self.conv2 = nn.Conv2d(16, 16, 3, padding=1)
        self.bn2 = nn.BatchNorm2d(16)
        self.conv3 = nn.Conv2d(16, 16, 1)  # its input also feeds the residual: not foldable
        self.fc = nn.Linear(16, 8)

    def forward(self, x):
        x = torch.relu(self.bn1(self.conv1(x)))
        y = torch.relu(self.bn2(self.conv2(x)))
        y = self.conv3(y) + y
        return self.fc(y.mean((2, 3)))


def _randomise_bn(model):
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.5, 0.5)
                m.running_mean.uniform_(-0.2, 0.2)
                m.running_var.uniform_(0.5, 2.0)


def test_search_never_lowers_and_finds_a_known_better_grouping():
    # channels 0,1 strong / 2,3 weak in every row: identity groups (0,1,2,3) keep the strong pair only once
    w = torch.tensor([[5.0, 5.0, 0.1, 0.1, 5.0, 5.0, 0.1, 0.1]]).repeat(3, 1)
    result = search_permutation(w, NMPattern(2, 4))
    assert result.after >= result.before
    ideal = kept_magnitude(w, NMPattern(2, 4))
    assert result.after == pytest.approx(ideal)  # already optimal: nothing to gain
    w2 = torch.tensor([[5.0, 5.0, 5.0, 0.1, 0.1, 0.1, 5.0, 0.1]]).repeat(3, 1)
    result2 = search_permutation(w2, NMPattern(2, 4))
    assert result2.before == pytest.approx(3 * (10 + 5.1))
    assert result2.after == pytest.approx(3 * (10 + 10))
    assert sorted(result2.perm.tolist()) == list(range(8))
    for seed in range(5):
        g = torch.Generator().manual_seed(seed)
        w3 = torch.randn(16, 32, 3, 3, generator=g) * torch.rand(1, 32, 1, 1, generator=g)
        r = search_permutation(w3, NMPattern(2, 4), max_sweeps=2)
        assert r.after >= r.before and r.gain >= 0
        assert r.after == pytest.approx(kept_magnitude(w3, NMPattern(2, 4), r.perm), rel=1e-5)


def test_folded_permutation_keeps_the_function_and_raises_kept_magnitude():
    torch.manual_seed(0)
    model = Chain().eval()
    _randomise_bn(model)
    with torch.no_grad():  # uneven channel scales so that grouping matters
        model.conv2.weight.mul_(torch.linspace(0.1, 3.0, 16).view(1, 16, 1, 1)[:, torch.randperm(16)])
    x = torch.randn(3, 4, 8, 8)
    reference = model(x)
    before = model.conv2.weight.detach().clone()
    rows = {r.fqn: r for r in permute_channels(model, "2:4", Selection(keep_first_conv=False))}
    assert rows["conv2"].folded_into == "conv1" and rows["conv2"].gain > 0
    assert rows["conv3"].folded_into is None and "used elsewhere" in rows["conv3"].reason
    assert not torch.equal(model.conv2.weight, before)
    assert torch.allclose(model(x), reference, atol=1e-5, rtol=1e-5)
    assert kept_magnitude(model.conv2.weight, NMPattern(2, 4)) == pytest.approx(rows["conv2"].kept_after, rel=1e-5)


def test_prune_cli_reports_permutation(tmp_path, capsys):
    pytest.importorskip("timm")
    import json

    from nmsparse.cli.main import main

    code = main(["prune", "timm:test_resnet", "--permute", "--permute-sweeps", "1", "--out", str(tmp_path / "e"),
                 "--json"])
    assert code == 0
    report = json.loads(capsys.readouterr().out)
    rows = report["permutation"]
    assert rows and all(r["kept_after"] >= r["kept_before"] for r in rows)
    assert any(r["folded_into"] for r in rows)


def test_unfoldable_layers_get_an_input_map_that_travels_through_export_and_runtime(tmp_path):
    from nmsparse.export import load_export, save_export
    from nmsparse.oneshot import PruneConfig, prune
    from nmsparse.parametrize import input_map
    from nmsparse.runtime import SparseConv2d, convert

    torch.manual_seed(0)
    model = Chain().eval()
    _randomise_bn(model)
    with torch.no_grad():
        model.conv3.weight.mul_(torch.linspace(0.1, 3.0, 16).view(1, 16, 1, 1)[:, torch.randperm(16)])
    fresh = Chain()
    fresh.load_state_dict(model.state_dict())
    x = torch.randn(3, 4, 8, 8)
    reference = model(x)
    rows = {r.fqn: r for r in permute_channels(model, "2:4", Selection(keep_first_conv=False))}
    assert rows["conv3"].input_map and rows["conv3"].gain > 0 and input_map(model.conv3) is not None
    assert torch.allclose(model(x), reference, atol=1e-5)
    skipped = Chain()
    skipped.load_state_dict(fresh.state_dict())
    assert not {r.fqn: r for r in permute_channels(skipped, "2:4", Selection(keep_first_conv=False),
                                                   unfoldable="skip")}["conv3"].input_map
    result = prune(model, PruneConfig("2:4", "magnitude", Selection(keep_first_conv=False)))
    entry = next(e for e in result.layers if e["fqn"] == "conv3")
    assert entry["input_permutation"] == input_map(model.conv3)
    pruned_out = model(x)
    out = save_export(model, tmp_path / "e", result.layers, {"source": "test", "options": {}})
    reloaded, _ = load_export(out, model=Chain())
    assert torch.allclose(reloaded(x), pruned_out, atol=1e-6)
    runtime, conv_rows = convert(reloaded)
    assert isinstance(runtime.conv3, SparseConv2d) and runtime.conv3.input_perm is not None
    with torch.no_grad():
        assert torch.allclose(runtime(x), pruned_out, atol=1e-4, rtol=1e-4)


def test_decoder_blocks_fold_their_permutations_into_gate_up_and_value_rows():
    """A causal LM (not traceable by torch.fx): down_proj's input channels permute with gate/up rows,
    o_proj's within each head with v_proj rows (grouped-query: one permutation per KV head); the model
    computes the same logits, kept magnitude rises, and nothing needs an input map."""
    transformers = pytest.importorskip("transformers")
    from nmsparse.parametrize import input_map
    from nmsparse.permute import decoder_pairs

    config = transformers.LlamaConfig(vocab_size=200, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                      attention_bias=True)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config).eval()
    with torch.no_grad():  # channels of unequal importance, so that some grouping is better than another
        for name, module in model.named_modules():
            if name.endswith(("down_proj", "o_proj")):
                module.weight.mul_(torch.rand(module.in_features) * 3)
    pairs = decoder_pairs(model)
    assert pairs["model.layers.0.mlp.down_proj"].producers == ("model.layers.0.mlp.gate_proj",
                                                               "model.layers.0.mlp.up_proj")
    attn = pairs["model.layers.1.self_attn.o_proj"]
    assert attn.producers == ("model.layers.1.self_attn.v_proj",) and (attn.head_dim, attn.per_kv) == (16, 2)
    ids = torch.randint(0, 200, (2, 12))
    reference = model(ids).logits
    rows = {r.fqn: r for r in permute_channels(model, "2:4", max_sweeps=20)}
    for fqn in pairs:
        assert rows[fqn].gain > 0 and rows[fqn].folded_into and not rows[fqn].input_map, rows[fqn]
    assert all(input_map(m) is None for m in model.modules())
    assert torch.allclose(model(ids).logits, reference, atol=1e-4)
    # untraceable layers that are no decoder pair say why they kept their order
    assert "torch.fx" in rows["model.layers.0.self_attn.q_proj"].reason


def test_balanced_order_deals_strong_channels_apart_and_the_search_only_improves_on_it():
    from nmsparse.pattern import parse_pattern
    from nmsparse.permute import balanced_order

    torch.manual_seed(1)
    w = torch.randn(32, 64) * torch.rand(64) * 3
    pattern = parse_pattern("2:4")
    order = balanced_order(w, pattern)
    assert sorted(order.tolist()) == list(range(64))
    strongest = set(w.abs().sum(0).argsort(descending=True)[:16].tolist())
    assert all(len(strongest & set(order[g * 4:(g + 1) * 4].tolist())) == 1 for g in range(16))
    start = kept_magnitude(w, pattern, order)
    assert start > kept_magnitude(w, pattern)
    result = search_permutation(w, pattern, 3, start=order)
    assert result.after >= start and sorted(result.perm.tolist()) == list(range(64))
