import pytest
import torch

from nmsparse.oneshot.data import CalibrationError, builtin_text, image_batches, load_texts


def test_builtin_text_held_out_sentences_are_not_calibration_text():
    calibration, held_out = builtin_text()
    assert len(calibration) > 100_000 and len(held_out) >= 200
    assert sum(sentence in calibration for sentence in held_out) <= len(held_out) // 50  # only stock phrases repeat


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
