"""Model sources: the registry of spec kinds and the typed accessors of ModelSource."""

from pathlib import Path

import pytest
from torch import nn

from nmsparse import models
from nmsparse.models import ModelError, ModelSource


def test_every_registered_kind_parses_and_the_error_names_each_form():
    assert set(models.SOURCES.names()) == {"timm", "torchvision", "hf", "gguf"}
    for kind in models.SOURCES.names():
        assert models.parse_model_spec(f"{kind}:x") == (kind, "x")
    with pytest.raises(ModelError) as err:
        models.parse_model_spec("resnet18")
    for kind in models.SOURCES.names():
        assert models.SOURCES.get(kind).form in str(err.value)


def test_a_new_source_is_one_registered_builder():
    calls = []

    @models.register_source("toy", "toy:WIDTH")
    def _toy(name, options, pretrained):
        calls.append((name, options, pretrained))
        return nn.Linear(int(name), 2), ModelSource(f"toy:{name}", options)

    try:
        model, source = models.build_model("toy:3", num_classes=5, options={"bias": True})
        assert isinstance(model, nn.Linear) and model.in_features == 3 and not model.training
        assert (source.kind, source.name, source.is_text) == ("toy", "3", False)
        assert calls == [("3", {"bias": True, "num_classes": 5}, False)]
        with pytest.raises(ModelError, match="toy:WIDTH"):
            models.parse_model_spec("nope:x")
        with pytest.raises(ValueError, match="registered twice"):
            models.register_source("toy", "toy:AGAIN")(_toy)
    finally:
        models.SOURCES._entries.pop("toy")


def test_model_source_accessors_and_hf_directories(tmp_path):
    hf = ModelSource(f"hf:{tmp_path}")
    assert hf.is_text and hf.kind == "hf" and hf.hf_dir == Path(tmp_path)
    vision = ModelSource("timm:resnet18", {"num_classes": 10})
    assert (vision.kind, vision.name, vision.is_text) == ("timm", "resnet18", False)
    with pytest.raises(ModelError, match="not a Hugging Face model"):
        _ = vision.hf_dir
    assert models.resolve_hf_dir(f"hf:{tmp_path}") == Path(tmp_path)
    with pytest.raises(ModelError, match="hf:DIR or gguf:FILE"):
        models.resolve_hf_dir("torchvision:resnet18")
    with pytest.raises(ModelError, match="does not exist"):
        models.resolve_hf_dir(f"gguf:{tmp_path / 'missing.gguf'}")
    with pytest.raises(ModelError, match="does not exist"):
        models.build_model(f"hf:{tmp_path / 'missing'}")


def test_torchvision_in_chans_replaces_the_first_convolution():
    pytest.importorskip("torchvision")
    model, source = models.build_model("torchvision:resnet18", num_classes=4, in_chans=1)
    assert model.conv1.in_channels == 1 and model.fc.out_features == 4
    assert source.as_dict() == {"source": "torchvision:resnet18", "options": {"num_classes": 4, "in_chans": 1}}
