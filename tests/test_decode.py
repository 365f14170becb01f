"""The fused decode step of a converted Llama model against the model's own module path."""

import copy

import pytest
import torch

transformers = pytest.importorskip("transformers")

from nmsparse.runtime import _native, convert  # noqa: E402
from nmsparse.runtime.decode import DecodeCache, DecodeUnavailable, LlamaDecoder, attach, detach  # noqa: E402

pytestmark = pytest.mark.skipif(
    not _native.available(), reason=f"C++ kernels unavailable: {_native.status()['reason']}"
)


def _tiny_llama(seed=0, **overrides):
    config = dict(vocab_size=300, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=512, tie_word_embeddings=False, bos_token_id=1,
                  eos_token_id=2, pad_token_id=0)
    config.update(overrides)
    torch.manual_seed(seed)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**config)).eval()
    with torch.no_grad():  # 2:4 on every decoder projection, larger weights so that tokens are well separated
        for name, module in model.named_modules():
            if isinstance(module, torch.nn.Linear) and "layers" in name:
                w = module.weight.view(module.out_features, -1, 4) * 8
                keep = torch.zeros_like(w, dtype=torch.bool).scatter_(-1, w.abs().topk(2, -1).indices, True)
                module.weight.copy_((w * keep).view_as(module.weight))
    return model


def _generate(model, prompt, new):
    config = transformers.GenerationConfig(max_new_tokens=new, min_new_tokens=new, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        return model.generate(input_ids=prompt, attention_mask=torch.ones_like(prompt), generation_config=config)


def _module_path(model, prompt, new):
    detach(model)
    try:
        return _generate(model, prompt, new)
    finally:
        attach(model)


PROMPT = torch.randint(3, 300, (1, 12), generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("weights,activations", [("fp32", "int8"), ("int8", "fp32"), ("int4", "fp32")])
def test_fused_generation_equals_the_module_path(weights, activations):
    """Float inputs to every product: the fused step computes the module path's function up to float32
    summation order, so greedy generation gives the same tokens and the logits agree closely."""
    model, report = convert(_tiny_llama(), weights=weights, activations=activations)
    assert report.decode == "fused" and "_nms_decoder" in model.__dict__
    fused = _generate(model, PROMPT, 24)
    assert torch.equal(fused, _module_path(model, PROMPT, 24))
    decoder = model.__dict__["_nms_decoder"]
    cache = DecodeCache(decoder, 64)
    with torch.no_grad():
        model(PROMPT, cache=cache)
        step = model(fused[:, 12:13], cache=cache).logits[0, -1]
        detach(model)
        ref_cache = model(PROMPT, use_cache=True).cache
        ref = model(fused[:, 12:13], cache=ref_cache).logits[0, -1]
        attach(model)
    assert float((step - ref).abs().max()) < 1e-4 * float(ref.abs().max())


@pytest.mark.parametrize("hidden,heads,kv_heads,prompt", [(128, 2, 1, 70), (48, 4, 2, 37), (96, 3, 3, 5)])
def test_attention_over_long_prompts_and_other_head_sizes(hidden, heads, kv_heads, prompt):
    """The step's attention (keys stored transposed, scored a run of positions at a time; the output
    in registers when the head size is a whole number of vectors, else the general loop) against the
    module path: head sizes 64, 12 and 32, prompts across several vectors of positions and a cache
    that grows past its first capacity."""
    model, _ = convert(_tiny_llama(2, hidden_size=hidden, num_attention_heads=heads, num_key_value_heads=kv_heads),
                       weights="fp32")
    decoder = model.__dict__["_nms_decoder"]
    ids = torch.randint(3, 300, (1, prompt), generator=torch.Generator().manual_seed(prompt))
    nxt = torch.randint(3, 300, (1, 20), generator=torch.Generator().manual_seed(1))
    cache = DecodeCache(decoder, prompt + 2)
    plain = type(model).forward  # the module path, past the fused step's override of model.forward
    with torch.no_grad():
        model(ids, cache=cache)
        ref_cache = plain(model, ids, use_cache=True).cache
        for i in range(nxt.shape[1]):
            step = model(nxt[:, i: i + 1], cache=cache).logits[0, -1]
            ref = plain(model, nxt[:, i: i + 1], cache=ref_cache).logits[0, -1]
            assert float((step - ref).abs().max()) < 1e-4 * float(ref.abs().max()), i
    assert cache.get_seq_length() == prompt + 20 and True


def test_two_caches_decoded_in_turn_each_keep_their_own_sequence():
    """One decoder, two caches stepped alternately (and one of them growing): each step reads the
    cache it is given, so each sequence's logits equal that sequence decoded alone."""
    model, _ = convert(_tiny_llama(3), weights="fp32")
    decoder = model.__dict__["_nms_decoder"]
    a_ids, b_ids = PROMPT, torch.randint(3, 300, (1, 20), generator=torch.Generator().manual_seed(9))
    with torch.no_grad():
        alone = []
        for ids, cap in ((a_ids, 13), (b_ids, 64)):
            cache = DecodeCache(decoder, cap)
            model(ids, cache=cache)
            alone.append([model(torch.tensor([[t]]), cache=cache).logits for t in range(5, 25)])
        caches = [DecodeCache(decoder, 13), DecodeCache(decoder, 64)]
        model(a_ids, cache=caches[0])
        model(b_ids, cache=caches[1])
        for i, t in enumerate(range(5, 25)):
            for which in (0, 1):
                assert torch.equal(model(torch.tensor([[t]]), cache=caches[which]).logits, alone[which][i]), (which, i)


def test_the_layer_choice_of_a_llama_model_times_the_fused_decode_step(monkeypatch):
    """At a one-token input a Llama model's groups are timed in the fused decode step (what generate()
    runs), each form bound into its own step, not through the module path's Python; the step timer
    runs a real step (the logits of the bound layers) and is absent for other inputs or models."""
    from nmsparse.runtime import choice, timing

    model = _tiny_llama(4)
    one = {"input_ids": torch.tensor([[7]])}
    assert choice.decode_step_timer(model, {"input_ids": torch.tensor([[7, 8]])}) is None
    assert choice.decode_step_timer(torch.nn.Linear(4, 4), torch.randn(1, 1)) is None
    assert choice.decode_step_timer(model.model, one) is None  # the bare decoder: no LM head, no fused step
    step = choice.decode_step_timer(model, one)()
    with torch.no_grad():
        expected = model(torch.tensor([[7]])).logits[0, -1]
    assert torch.allclose(step(0), expected, atol=1e-4) and torch.allclose(step(1), expected, atol=1e-4)
    timed = []
    real_best_ms = choice.best_ms

    def best_ms(fns, repeats):
        timed.append([getattr(f, "__qualname__", "") for f in fns])
        return real_best_ms(fns, repeats)

    monkeypatch.setattr(choice, "best_ms", best_ms)
    monkeypatch.setattr(timing, "last_level_cache_bytes", lambda: 4096)  # "larger than the cache"
    def steps():
        return [names for names in timed if names and all(n.endswith("bind.<locals>.step") for n in names)]

    _, report = convert(copy.deepcopy(model), weights="int4", example_inputs=one, repeats=2, decode=False)
    assert report.cold_cache and timed and not steps()  # no fused step asked for: the model's own call is timed
    timed.clear()
    _, report = convert(model, weights="int4", example_inputs=one, repeats=2)
    assert report.cold_cache and len(steps()) >= 2  # the repeated groups, each dense and sparse in the step


def test_int8_activations_agree_with_the_module_path_token_by_token():
    """With int8 activations a float32 summation difference can flip one input's rounding: the fused
    step's top token still equals the module path's at (nearly) every teacher-forced step."""
    model, _ = convert(_tiny_llama(1), weights="int8")
    decoder = model.__dict__["_nms_decoder"]
    tokens = _module_path(model, PROMPT, 32)[0, 12:]
    cache = DecodeCache(decoder, 8)  # smaller than the prompt: the cache grows on the way
    agree = 0
    with torch.no_grad():
        logits = model(PROMPT, cache=cache).logits[0, -1]
        agree += int(logits.argmax()) == int(tokens[0])
        for i in range(1, len(tokens)):
            logits = model(tokens[i - 1].view(1, 1), cache=cache).logits[0, -1]
            agree += int(logits.argmax()) == int(tokens[i])
    assert agree >= 30
    assert cache.get_seq_length() == 12 + 31 and cache.layers[0].k.shape[2] >= 43


def test_the_step_profile_splits_a_token_into_its_parts_and_leaves_the_logits_alone():
    """The step's own clock: every part measured (products > 0), none negative, and a profiled step
    returns the same logits as an unprofiled one."""
    model, _ = convert(_tiny_llama(5), weights="int8")
    decoder = model.__dict__["_nms_decoder"]
    parts = decoder.profile(model, PROMPT, tokens=6)
    assert set(parts) == {"products", "head", "attention", "rest", "python"}
    assert parts["products"] > 0 and parts["head"] > 0 and parts["attention"] > 0
    assert all(v >= 0 for v in parts.values())
    clock = torch.zeros(4, dtype=torch.float64)
    caches = [DecodeCache(decoder, 32), DecodeCache(decoder, 32)]
    with torch.no_grad():
        for cache in caches:
            model(PROMPT, cache=cache)
        plain, timed = decoder.step(7, caches[0]), decoder.step(7, caches[1], clock)
    assert torch.equal(plain, timed) and float(clock.sum()) > 0


def test_calls_the_step_does_not_take_run_the_module_path():
    """A batch of two, a padded mask, a user's own cache, hidden states asked for: the model's forward."""
    model, _ = convert(_tiny_llama(2), weights="int8", activations="fp32")
    two = torch.cat([PROMPT, PROMPT.flip(1)])
    fused = _generate(model, two, 6)
    assert torch.equal(fused, _module_path(model, two, 6))
    with torch.no_grad():
        out = model(PROMPT, output_hidden_states=True)
    assert out.hidden_states is not None and len(out.hidden_states) == 3
    cache = transformers.DynamicCache()
    with torch.no_grad():
        model(PROMPT, cache=cache)
        logits = model(PROMPT[:, :1], cache=cache).logits
    assert logits.shape == (1, 1, 300) and cache.get_seq_length() == 13


def test_a_replaced_layer_is_bound_again_at_the_next_generate():
    model, _ = convert(_tiny_llama(3), weights="fp32")
    layer = model.model.layers[1].mlp.down_proj
    replacement = torch.nn.Linear(layer.in_features, layer.out_features, bias=False)
    with torch.no_grad():
        replacement.weight.copy_(torch.randn_like(replacement.weight))
    model.model.layers[1].mlp.down_proj = replacement
    assert torch.equal(_generate(model, PROMPT, 10), _module_path(model, PROMPT, 10))


def test_other_architectures_keep_their_module_path_and_the_report_says_why():
    config = transformers.MistralConfig(vocab_size=300, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                                        num_attention_heads=4, num_key_value_heads=2, sliding_window=None)
    mistral = transformers.MistralForCausalLM(config).eval()
    _, report = convert(mistral, weights="int8")
    assert report.decode.startswith("module path") and "mistral" in report.decode
    with pytest.raises(DecodeUnavailable, match="gelu"):
        LlamaDecoder(_tiny_llama(hidden_act="gelu"))
    _, report = convert(_tiny_llama(), weights="int8", decode=False)
    assert report.decode == ""


def test_deepcopy_of_a_fused_model_decodes_on_its_own_weights():
    model, _ = convert(_tiny_llama(4), weights="int8", activations="fp32")
    twin = copy.deepcopy(model)
    assert torch.equal(_generate(twin, PROMPT, 8), _generate(model, PROMPT, 8))
    decoder = twin.__dict__["_nms_decoder"]
    assert isinstance(decoder, LlamaDecoder) and decoder is not model.__dict__["_nms_decoder"]
    with torch.no_grad():  # the copy's plans read the copy: changing it changes its tokens only
        twin.lm_head.scales.mul_(-1)
    assert not torch.equal(_generate(twin, PROMPT, 8), _generate(model, PROMPT, 8))


def test_plain_greedy_generate_runs_its_own_loop_and_equals_hf_generate(monkeypatch):
    """Plain greedy calls (the common generate(ids, max_new_tokens=...)) run a loop of fused steps
    without generate()'s per-token Python; it gives Hugging Face's tokens, honours end-of-sequence
    and min_new_tokens as generate() does, and anything else (a streamer, scores, processors) goes
    to generate() itself."""
    from nmsparse.runtime import decode as decode_module

    model, _ = convert(_tiny_llama(), weights="fp32")
    loops = []
    real = decode_module._greedy
    monkeypatch.setattr(decode_module, "_greedy", lambda *a: loops.append(1) or real(*a))

    def hf(**kw):  # generate() itself (with the fused step), forced by asking for its dict output
        with torch.no_grad():
            return model.generate(PROMPT, do_sample=False, return_dict_in_generate=True, **kw).sequences

    with torch.no_grad():
        ours = model.generate(PROMPT, max_new_tokens=20, do_sample=False)
    assert loops == [1] and torch.equal(ours, hf(max_new_tokens=20))
    assert torch.equal(ours, _module_path(model, PROMPT, 20)[:, :ours.shape[1]])
    stop = int(ours[0, 12 + 5])  # make the 6th new token an end-of-sequence token: both stop after it
    lengths = []
    for kw in ({"eos_token_id": stop}, {"eos_token_id": [299, stop], "min_new_tokens": 8}, {"min_length": 19}):
        with torch.no_grad():
            got = model.generate(PROMPT, max_new_tokens=20, do_sample=False, pad_token_id=0, **{"eos_token_id": stop,
                                                                                                  **kw})
        want = hf(max_new_tokens=20, pad_token_id=0, **{"eos_token_id": stop, **kw})
        assert torch.equal(got, want), kw
        lengths.append(got.shape[1])
    assert lengths[0] == 12 + 6 and lengths[1] >= 12 + 8 and lengths[2] >= 19 and len(loops) == 4
    with torch.no_grad():
        model.generate(PROMPT, max_new_tokens=4, do_sample=False, repetition_penalty=1.3)
        model.generate(PROMPT, max_new_tokens=4, do_sample=False, output_scores=True, return_dict_in_generate=True)
    assert len(loops) == 4  # processors and score outputs: generate() itself


def test_greedy_argmax_is_torch_argmax():
    """The greedy loop's argmax (NumPy, on the calling thread) picks what torch.argmax picks: the first of
    tied maxima, a NaN over any number, -inf rows, and non-float32 logits through torch itself."""
    from nmsparse.runtime.decode import _argmax

    nan, inf = float("nan"), float("inf")
    rows = [[1.0, 3.0, 3.0, 2.0], [1.0, nan, 3.0, nan], [-inf, -inf, -inf], [5.0, inf, inf], [-1.0, -0.0, 0.0]]
    g = torch.Generator().manual_seed(0)
    for _ in range(50):  # small integers: many ties; some rows with NaNs
        row = torch.randint(-3, 3, (1000,), generator=g).float()
        if _ % 2:
            row[torch.randint(0, 1000, (3,), generator=g)] = nan
        rows.append(row.tolist())
    for row in rows:
        t = torch.tensor(row).view(1, 1, -1)
        assert _argmax(t) == int(t.argmax()), row[:8]
    half = torch.tensor([0.5, 2.0, 2.0, -1.0], dtype=torch.bfloat16)
    assert _argmax(half) == 1
