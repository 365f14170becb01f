import pytest
from torch import nn

from nmsparse.pattern import NMPattern, PatternError
from nmsparse.select import Rule, Selection, SelectionError, select_layers


def _by_fqn(choices):
    return {c.fqn: c for c in choices}


def test_defaults_keep_first_conv_classifier_and_depthwise(tiny_cnn):
    choices = _by_fqn(select_layers(tiny_cnn, Selection(), "2:4"))
    assert "first conv" in choices["conv1"].skip_reason
    assert "classifier" in choices["fc"].skip_reason
    assert "groups=16" in choices["dw"].skip_reason
    assert choices["conv2"].selected and choices["conv3"].selected
    assert choices["conv2"].patterns == (NMPattern(2, 4),)


def test_guards_are_overridable(tiny_cnn):
    sel = Selection(keep_first_conv=False, keep_classifier=False, keep_grouped_conv=False)
    choices = _by_fqn(select_layers(tiny_cnn, sel, "1:2"))
    assert choices["fc"].selected
    # a depthwise conv has one input channel per group: included, then skipped for its shape
    assert choices["dw"].skip_reason and "not a multiple" in choices["dw"].skip_reason
    assert _by_fqn(select_layers(tiny_cnn, sel, "1:2@out"))["dw"].selected
    # conv1 has 1 input channel: not a multiple of 2 -> skipped with the reason, never mangled
    assert "not a multiple of m=2" in choices["conv1"].skip_reason
    # an explicit rule also overrides a guard
    choices = _by_fqn(select_layers(tiny_cnn, Selection(rules=(Rule("fc", pattern="1:4"),)), "2:4"))
    assert choices["fc"].patterns == (NMPattern(1, 4),)


def test_rules_first_match_wins(tiny_vit):
    rules = (Rule("re:.*mlp\\.fc1", pattern="1:8"), Rule("re:.*mlp.*", skip=True), Rule("type:Linear", pattern="4:8"))
    choices = _by_fqn(select_layers(tiny_vit, Selection(rules=rules), "2:4"))
    assert choices["blocks.0.mlp.fc1"].patterns == (NMPattern(1, 8),)
    assert choices["blocks.0.mlp.fc2"].skip_reason.startswith("skipped by rule")
    assert choices["blocks.1.attn.proj"].patterns == (NMPattern(4, 8),)


def test_fused_qkv_gets_three_slices(tiny_vit):
    choices = _by_fqn(select_layers(tiny_vit, Selection(layers=("qkv",)), "2:4"))
    assert choices["blocks.0.attn.qkv"].patterns == (NMPattern(2, 4),) * 3
    assert not choices["blocks.0.mlp.fc1"].selected
    rules = (Rule("re:.*attn\\.qkv", slices=("2:4", "2:4", "4:8")),)
    choices = _by_fqn(select_layers(tiny_vit, Selection(rules=rules), "2:4"))
    assert choices["blocks.1.attn.qkv"].patterns == (NMPattern(2, 4), NMPattern(2, 4), NMPattern(4, 8))


@pytest.mark.parametrize(
    "sets,selected",
    [
        (("ff",), {"mlp.fc1", "mlp.fc2"}),
        (("qkv",), {"attn.qkv"}),
        (("attn-out",), {"attn.proj"}),
        (("attention",), {"attn.qkv", "attn.proj"}),
        (("ff", "qkv"), {"mlp.fc1", "mlp.fc2", "attn.qkv"}),
    ],
)
def test_layer_sets(tiny_vit, sets, selected):
    choices = select_layers(tiny_vit, Selection(layers=sets), "2:4")
    got = {c.fqn.split(".", 2)[2] for c in choices if c.selected}
    assert got == selected


def test_hf_bert_names():
    model = nn.Module()
    layer = nn.Module()
    layer.attention = nn.Module()
    layer.attention.self = nn.Module()
    for name in ("query", "key", "value"):
        setattr(layer.attention.self, name, nn.Linear(8, 8))
    layer.attention.output = nn.Module()
    layer.attention.output.dense = nn.Linear(8, 8)
    layer.intermediate = nn.Module()
    layer.intermediate.dense = nn.Linear(8, 32)
    layer.output = nn.Module()
    layer.output.dense = nn.Linear(32, 8)
    model.layer = layer
    ff = {c.fqn for c in select_layers(model, Selection(layers=("ff",), keep_classifier=False), "2:4") if c.selected}
    assert ff == {"layer.intermediate.dense", "layer.output.dense"}
    out = {
        c.fqn for c in select_layers(model, Selection(layers=("attn-out",), keep_classifier=False), "2:4") if c.selected
    }
    assert out == {"layer.attention.output.dense"}
    qkv = {c.fqn for c in select_layers(model, Selection(layers=("qkv",)), "2:4") if c.selected}
    assert qkv == {"layer.attention.self.query", "layer.attention.self.key", "layer.attention.self.value"}


def test_rule_parse_and_errors():
    assert Rule.parse("re:.*head=skip") == Rule("re:.*head", skip=True)
    assert Rule.parse("a.b=1:8") == Rule("a.b", pattern="1:8")
    assert Rule.parse("x.qkv=2:4,2:4,4:8").slices == ("2:4", "2:4", "4:8")
    with pytest.raises(SelectionError, match="expected MATCH=PATTERN"):
        Rule.parse("nothing")
    with pytest.raises(SelectionError, match="invalid regex"):
        Rule("re:(")
    with pytest.raises(PatternError):
        Rule.parse("a=9:4")
    with pytest.raises(SelectionError, match="unknown layer set"):
        Selection(layers=("fff",))
