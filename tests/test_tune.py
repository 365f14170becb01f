"""Scale tuning after one-shot pruning (nmsparse.oneshot.tune): the scales fold into the weights exactly,
weights and masks are held, the norms and scales lower the distillation loss, and the pipeline, config and
CLI run it and report it."""

import copy

import pytest
import torch
from torch import nn

from nmsparse.cli.main import main
from nmsparse.mask import is_nm
from nmsparse.method import MethodError
from nmsparse.oneshot import PruneConfig, prune
from nmsparse.oneshot.best import BEST
from nmsparse.oneshot.config import ConfigError
from nmsparse.oneshot.recover import kl_logits
from nmsparse.oneshot.tune import Tuning, _Scales, tunable_norms, tune_scales
from nmsparse.pattern import NMPattern

transformers = pytest.importorskip("transformers")


def _llama(tie=True):
    config = transformers.LlamaConfig(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                      tie_word_embeddings=tie)
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(config).eval()


def _batches(count=4, seed=1):
    gen = torch.Generator().manual_seed(seed)
    return [{"input_ids": torch.randint(0, 96, (2, 24), generator=gen)} for _ in range(count)]


def _kl(student, teacher, batches):
    with torch.no_grad():
        return sum(float(kl_logits(student(**b).logits, teacher(**b).logits)) for b in batches) / len(batches)


def test_folding_the_scales_gives_the_outputs_the_hooks_gave():
    """W <- diag(s_out) W diag(s_in), b <- s_out * b reproduces the hooked layer (Linear: both scales;
    Conv2d: output channels), and the hooks are gone afterwards."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 6), nn.ReLU(), nn.Unflatten(1, (6, 1, 1)), nn.Conv2d(6, 4, 1))
    scales = _Scales(model, ["0", "3"])
    for p in scales.parameters():
        with torch.no_grad():
            p.copy_(torch.rand_like(p) + 0.5)
    x = torch.randn(5, 8)
    hooked = model(x)
    plain = copy.deepcopy(model)
    for m in plain.modules():
        m._forward_hooks.clear()
        m._forward_pre_hooks.clear()
    assert not torch.allclose(plain(x), hooked)  # the scales do act
    scales.fold()
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())
    torch.testing.assert_close(model(x), hooked, rtol=1e-5, atol=1e-5)
    assert [p.numel() for p in scales.parameters()] == [6, 8, 4]  # s_out, s_in of the Linear; s_out of the conv


def test_scale_tuning_holds_weights_and_masks_and_lowers_the_distillation_loss():
    teacher = _llama()
    model = copy.deepcopy(teacher)
    result = prune(model, PruneConfig("2:4", "sparsegpt"), calibration=_batches(), progress="none")
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    train = _batches(8, seed=2)
    loss_before = _kl(model, teacher, train)
    stats = tune_scales(model, teacher, result.layers, train, steps=40, lr=1e-2, progress="none")
    assert _kl(model, teacher, train) < 0.8 * loss_before
    pruned = {e["fqn"] + ".weight" for e in result.layers}
    norms = {n for n, _ in model.named_parameters() if "norm" in n}
    for name, p in model.named_parameters():
        if name in pruned:  # scaled rows and columns: the same zeros, the same signs, the pattern held
            assert torch.equal(p == 0, before[name] == 0) and torch.equal(p.sign(), before[name].sign()), name
            assert is_nm(p.detach(), NMPattern(2, 4)) and not torch.equal(p, before[name]), name
        elif name not in norms:  # the embedding (tied head) and every other parameter untouched
            assert torch.equal(p, before[name]), name
        assert p.requires_grad, name  # restored
    assert any(not torch.equal(model.get_parameter(n), before[n]) for n in norms)
    layers = [model.get_submodule(e["fqn"]) for e in result.layers]  # (transformers hooks blocks of its own)
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in layers)
    expected = sum(m.weight.numel() for m in tunable_norms(model)) + sum(
        sum(model.get_submodule(e["fqn"]).weight.shape) for e in result.layers)
    assert stats["params"] == expected and stats["steps"] == 40 and stats["objective"] == "causal"
    assert stats["what"] == f"5 norms, {len(result.layers)} pruned layers' channel scales"


def test_prune_with_tuning_measures_before_and_after_and_reports_it():
    from nmsparse.oneshot.report import plot_data, report_markdown

    model = _llama()
    ids = torch.randint(0, 96, (200,), generator=torch.Generator().manual_seed(3))
    result = prune(model, PruneConfig("2:4", "sparsegpt", tune_steps=25, tune_lr=1e-2), calibration=_batches(),
                   heldout=ids, progress="none", tune=None)
    fidelity = result.fidelity
    assert list(fidelity) == ["measure", "dense", "before_tuning", "one_shot"]
    assert fidelity["one_shot"]["perplexity"] < fidelity["before_tuning"]["perplexity"]
    assert result.tuning["steps"] == 25 and result.tuning["lr"] == 1e-2 and "tuning" in result.seconds
    report = result.as_dict()
    assert plot_data(report)["tuning_loss.png"]["step"] == list(range(1, 26))
    assert plot_data(report)["fidelity.png"]["stage"] == ["dense", "before_tuning", "one_shot"]
    assert "## Scale tuning" in report_markdown(report) and "numbers trained" in report_markdown(report)


def test_the_tuning_budget_of_best_and_of_the_run():
    assert BEST["causal_lm"].tune_minutes == 6.0 and BEST["encoder"].tune_minutes == 3.0
    assert not BEST["classifier"].tune_minutes
    assert PruneConfig("2:4", "best").tune_budget(4.0) == (None, 4.0)
    assert PruneConfig("2:4", "best", tune_minutes=0).tune_budget(4.0) == (None, None)  # off
    assert PruneConfig("2:4", "best", tune_steps=5).tune_budget(4.0) == (5, None)  # the run's own replaces best's
    assert PruneConfig("2:4", "sparsegpt").tune_budget(4.0) == (None, None)
    assert PruneConfig("2:4", "sparsegpt", tune_minutes=1.5).tune_budget(None) == (None, 1.5)
    with pytest.raises(ConfigError, match="tune_minutes must be at least 0"):
        PruneConfig(tune_minutes=-1)
    with pytest.raises(ConfigError, match="stream cannot be combined with recovery, tuning"):
        PruneConfig(stream=True, tune_steps=3)
    with pytest.raises(ValueError, match="needs a step or time budget"):
        Tuning(_batches())


def test_tuning_without_data_or_on_a_layer_it_cannot_scale_is_refused():
    model = _llama()
    with pytest.raises(MethodError, match="scale tuning needs training batches"):
        prune(model, PruneConfig("2:4", "magnitude", tune_steps=2), progress="none")
    with pytest.raises(MethodError, match="model.embed_tokens is a Embedding"):
        tune_scales(model, _llama(), [{"fqn": "model.embed_tokens"}], _batches(), steps=1, progress="none")
    assert all(p.requires_grad for p in model.parameters())


def test_cli_tuning_flags_and_their_errors(capsys, tmp_path):
    assert main(["prune", "gguf:none", "--tune-minutes", "-1", "--out", str(tmp_path / "x")]) == 2
    assert "--tune-minutes must be at least 0" in capsys.readouterr().err
    assert main(["prune", "gguf:none", "--stream", "--tune-steps", "2", "--out", str(tmp_path / "x")]) == 2
    assert "--stream cannot be combined with recovery, tuning" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()
