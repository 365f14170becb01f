import json

import pytest
import torch

import nmsparse.export.dense as dense_mod
from nmsparse.export import ExportError, load_export, read_manifest, save_export
from nmsparse.oneshot import PruneConfig, prune

from .conftest import TinyViT


def _pruned():
    model = TinyViT()
    result = prune(model, PruneConfig("2:4"))
    return model, result


def test_round_trip_reproduces_outputs(tmp_path):
    model, result = _pruned()
    x = torch.randn(3, 3, 8, 8)
    out = save_export(
        model, tmp_path / "exp", result.layers, {"source": "custom:TinyViT", "options": {}}, result.skipped
    )
    manifest = read_manifest(out)
    assert manifest["format_version"] == 1 and manifest["library_version"]
    assert {e["fqn"] for e in manifest["layers"]} == {e["fqn"] for e in result.layers}
    qkv = next(e for e in manifest["layers"] if e["fqn"].endswith("attn.qkv"))
    assert qkv["slices"] == 3 and qkv["pattern"] == "2:4" and qkv["axis"] == "in"
    loaded, _ = load_export(out, TinyViT())
    assert (loaded(x) - model(x)).abs().max().item() <= 1e-6


def test_refuses_weights_that_break_the_pattern(tmp_path):
    model, result = _pruned()
    out = save_export(model, tmp_path / "exp", result.layers, {"source": "custom:TinyViT"})
    # a consumer edits the weights: the zeros are gone
    from safetensors.torch import load_file, save_file

    state = load_file(out / "model.safetensors")
    state["blocks.0.mlp.fc1.weight"] = torch.ones_like(state["blocks.0.mlp.fc1.weight"])
    save_file(state, out / "model.safetensors")
    with pytest.raises(ExportError, match=r"blocks\.0\.mlp\.fc1 \(2:4\)"):
        load_export(out, TinyViT())


def test_refuses_to_write_a_broken_model(tmp_path):
    model, result = _pruned()
    with torch.no_grad():
        model.blocks[0].mlp.fc2.weight.fill_(1.0)
    with pytest.raises(ExportError, match="refusing to export"):
        save_export(model, tmp_path / "exp", result.layers, {"source": "custom:TinyViT"})
    assert not (tmp_path / "exp").exists()


@pytest.mark.parametrize(
    "corrupt,needle",
    [
        (lambda d: (d / "manifest.json").unlink(), "no manifest.json"),
        (lambda d: (d / "manifest.json").write_text("{not json"), "invalid JSON"),
        (lambda d: (d / "manifest.json").write_text(json.dumps({"format": "other"})), "not an nmsparse manifest"),
        (lambda d: (d / "model.safetensors").write_bytes(b"\x00garbage"), "corrupt"),
    ],
)
def test_refuses_missing_or_corrupt_files(tmp_path, corrupt, needle):
    model, result = _pruned()
    out = save_export(model, tmp_path / "exp", result.layers, {"source": "custom:TinyViT"})
    corrupt(out)
    with pytest.raises(ExportError, match=needle):
        load_export(out, TinyViT())


def test_future_format_version_refused(tmp_path):
    model, result = _pruned()
    out = save_export(model, tmp_path / "exp", result.layers, {"source": "custom:TinyViT"})
    manifest = json.loads((out / "manifest.json").read_text())
    manifest["format_version"] = 99
    (out / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ExportError, match="format_version 99"):
        load_export(out, TinyViT())


def test_crash_mid_write_keeps_previous_export(tmp_path, monkeypatch):
    model, result = _pruned()
    out = save_export(model, tmp_path / "exp", result.layers, {"source": "custom:TinyViT"})
    before = (out / "model.safetensors").read_bytes()

    def crash(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(dense_mod, "save_model", crash)
    with pytest.raises(OSError, match="disk full"):
        save_export(model, out, result.layers, {"source": "custom:TinyViT"})
    assert (out / "model.safetensors").read_bytes() == before
    assert read_manifest(out)
    assert [p.name for p in tmp_path.iterdir()] == ["exp"]  # no temp directories left behind


def test_never_overwrites_an_unrelated_directory(tmp_path):
    model, result = _pruned()
    target = tmp_path / "mine"
    target.mkdir()
    (target / "notes.txt").write_text("precious")
    with pytest.raises(ExportError, match="not an nmsparse output"):
        save_export(model, target, result.layers, {"source": "custom:TinyViT"})
    assert (target / "notes.txt").read_text() == "precious"
