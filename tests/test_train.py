"""End-to-end training: tiny runs on the real scikit-learn digits (seconds each)."""

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from nmsparse.cli.main import main
from nmsparse.config.load import load_config
from nmsparse.export import load_export
from nmsparse.mask import is_nm
from nmsparse.pattern import NMPattern
from nmsparse.train.loop import run_training

pytest.importorskip("timm")

TINY = [
    "model.name=timm:test_resnet", "data.name=digits", "data.image_size=16", "data.batch_size=32",
    "train.epochs=2", "lr.warmup_epochs=0", "optim.lr=0.05", "logging.progress=lines", "logging.tensorboard=false",
    "run.threads=1",
]


def _metrics(run_dir):
    with open(Path(run_dir) / "metrics.csv") as handle:
        return list(csv.DictReader(handle))


def test_tiny_run_trains_exports_and_verifies(tmp_path):
    config = load_config(None, TINY + [f"run.out_dir={tmp_path}", "logging.tensorboard=true"])
    summary = run_training(config)
    run_dir = Path(summary["run_dir"])
    rows = _metrics(run_dir)
    assert len(rows) == 2 and float(rows[-1]["top1"]) > 50.0  # learns the digits well above chance (10%)
    assert float(rows[-1]["val_loss"]) < float(rows[0]["val_loss"]) * 1.5
    for name in ("config.yaml", "env.json", "summary.json", "train_log.csv", "loss_curves.png", "density.png",
                 "checkpoints/last.pt", "checkpoints/best.pt", "export/manifest.json"):
        assert (run_dir / name).exists(), name
    assert list((run_dir / "tensorboard").iterdir())
    model, manifest = load_export(run_dir / "export")
    assert manifest["layers"] and all(
        is_nm(dict(model.named_modules())[e["fqn"]].weight, NMPattern(2, 4)) for e in manifest["layers"]
    )
    assert summary["export"]["reload_max_abs_diff"] <= 1e-6
    # a second run with the same name never overwrites the first
    again = run_training(
        load_config(None, TINY + [f"run.out_dir={tmp_path}", "train.max_steps=3", "train.export=false"])
    )
    assert Path(again["run_dir"]).name == "default-2"


def test_dense_baseline_and_ema(tmp_path):
    config = load_config(None, TINY + [f"run.out_dir={tmp_path}", "sparsity.enabled=false", "train.ema_decay=0.9",
                                       "train.max_steps=20"])
    summary = run_training(config)
    assert "ema_top1" in summary["final"]
    assert summary["export"]["sparse_layers"] == 0


def _train_cmd(args, cwd):
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return [sys.executable, "-m", "nmsparse", "train", *args], env


@pytest.mark.slow
def test_sigkill_mid_epoch_then_resume_matches_uninterrupted(tmp_path):
    common = TINY + ["train.epochs=3", "train.checkpoint_every_steps=5", "train.export=false", "logging.plots=false"]
    straight = run_training(load_config(None, common + [f"run.out_dir={tmp_path / 'a'}"]))
    cmd, env = _train_cmd(common + [f"run.out_dir={tmp_path / 'b'}"], tmp_path)
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    run_dir = tmp_path / "b" / "default"
    ckpt = run_dir / "checkpoints" / "last.pt"
    deadline = time.time() + 120
    killed_at = None
    # kill once a mid-epoch checkpoint of epoch 2 exists (44 steps per epoch; step 50 is mid-epoch)
    for line in proc.stdout:
        if line.startswith("step 60/") and ckpt.exists():
            proc.send_signal(signal.SIGKILL)
            killed_at = line
            break
        if time.time() > deadline:
            break
    proc.wait(timeout=30)
    assert killed_at, "the run finished before it could be killed"
    assert proc.returncode == -signal.SIGKILL
    assert main(["train", "--resume", str(run_dir)]) == 0
    resumed, reference = _metrics(run_dir), _metrics(straight["run_dir"])
    assert [r["epoch"] for r in resumed] == ["1", "2", "3"]
    for a, b in zip(resumed, reference):
        for key in ("step", "train_loss", "val_loss", "top1", "top5"):
            assert a[key] == b[key], (key, a, b)


def test_nan_loss_stops_with_clear_message_and_keeps_checkpoint(tmp_path, capsys):
    code = main(["train", *TINY, f"run.out_dir={tmp_path}", "optim.lr=1e30", "train.checkpoint_every_steps=1"])
    err = capsys.readouterr().err
    assert code == 1
    assert "loss became nan" in err or "loss became inf" in err
    assert "last good checkpoint" in err and "Traceback" not in err


def test_bad_config_exits_2_listing_all_errors(tmp_path, capsys):
    code = main(["train", "optim.lrr=1", "data.batchsize=2", f"run.out_dir={tmp_path}"])
    err = capsys.readouterr().err
    assert code == 2
    assert "optim.lrr: unknown key (did you mean 'lr'?)" in err
    assert "data.batchsize: unknown key (did you mean 'batch_size'?)" in err
    assert len(err.strip().splitlines()) == 1


def test_missing_data_path_is_a_clear_error(tmp_path, capsys):
    code = main(["train", "data.name=cifar10", f"data.root={tmp_path / 'none'}", f"run.out_dir={tmp_path}"])
    assert code == 2
    assert "expected data_batch_1..5 and test_batch" in capsys.readouterr().err


def test_resume_refuses_foreign_checkpoint(tmp_path, capsys):
    summary = run_training(
        load_config(None, TINY + [f"run.out_dir={tmp_path}", "train.max_steps=2", "train.export=false"])
    )
    run_dir = Path(summary["run_dir"])
    torch.save({"format": "something-else"}, run_dir / "checkpoints" / "last.pt")
    assert main(["train", "--resume", str(run_dir)]) == 2
    assert "not an nmsparse training checkpoint" in capsys.readouterr().err
    (run_dir / "checkpoints" / "last.pt").write_bytes(b"garbage")
    assert main(["train", "--resume", str(run_dir)]) == 2
    assert "cannot read checkpoint" in capsys.readouterr().err


def test_eval_command_on_export_and_run(tmp_path, capsys):
    summary = run_training(load_config(None, TINY + [f"run.out_dir={tmp_path}", "train.max_steps=30"]))
    capsys.readouterr()
    assert main(["eval", summary["export"]["dir"], "--data", "digits", "--image-size", "16", "--json"]) == 0
    from_export = json.loads(capsys.readouterr().out)
    assert main(["eval", summary["run_dir"], "--json"]) == 0
    from_run = json.loads(capsys.readouterr().out)
    assert from_export["samples"] == from_run["samples"] == 180
    assert from_export["top1"] == pytest.approx(summary["final"]["top1"], abs=1e-3)
    assert main(["eval", summary["export"]["dir"]]) == 2
    assert "pass --data" in capsys.readouterr().err


@pytest.mark.slow
def test_ddp_two_processes_identical_masks(tmp_path):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29533",
           "-m", "nmsparse", "train", *TINY, f"run.out_dir={tmp_path}", "train.max_steps=12", "logging.plots=false"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    summary = json.loads((tmp_path / "default" / "summary.json").read_text())
    digests = summary["mask_digest_per_rank"]
    assert len(digests) == 2 and digests[0] == digests[1]
    assert summary["export"]["sparse_layers"] > 0
    # only rank 0 wrote: one run directory
    assert [p.name for p in tmp_path.iterdir()] == ["default"]


def test_usd_run_writes_a_scheme_that_trains_back_as_an_allocation(tmp_path):
    usd = TINY + [f"run.out_dir={tmp_path}", "run.name=usd", "sparsity.method=usd", "sparsity.pattern=8:8",
                  "sparsity.options.target_sparsity=0.6", "sparsity.options.check_every_steps=2",
                  "sparsity.options.penalty_every_steps=1", "sparsity.options.penalty_strength=1.0",
                  "sparsity.options.finetune_steps=20", "logging.plots=false"]
    summary = run_training(load_config(None, usd))
    method = summary["method"]
    assert method["target_reached"] and method["achieved_sparsity"] >= 0.6 - 1e-3
    scheme = json.loads((Path(summary["run_dir"]) / "scheme.json").read_text())
    assert scheme == method["scheme"] and all(p.endswith(":8") for p in scheme.values())
    fixed = TINY + [f"run.out_dir={tmp_path}", "run.name=fixed", "sparsity.method=srste",
                    f"sparsity.allocation_file={Path(summary['run_dir']) / 'scheme.json'}", "train.max_steps=4",
                    "logging.plots=false"]
    again = run_training(load_config(None, fixed))
    manifest = json.loads((Path(again["export"]["dir"]) / "manifest.json").read_text())
    assert {e["fqn"]: e["pattern"] for e in manifest["layers"]} == scheme


def test_progressive_run_records_its_schedule(tmp_path):
    cfg = TINY + [f"run.out_dir={tmp_path}", "sparsity.method=progressive", "sparsity.pattern=2:8",
                  "sparsity.options.stages=stepwise", "sparsity.options.decay=step",
                  "sparsity.options.dense_fraction=0.25", "sparsity.options.finetune_fraction=0.25",
                  "logging.plots=false"]
    summary = run_training(load_config(None, cfg))
    total = summary["final"]["step"]
    assert summary["method"]["sparse_start_step"] == total // 4
    assert summary["method"]["finetune_start_step"] == total - total // 4
    manifest = json.loads((Path(summary["export"]["dir"]) / "manifest.json").read_text())
    assert {e["pattern"] for e in manifest["layers"]} == {"2:8"}


def test_training_with_channel_permutation_records_it_and_resumes(tmp_path):
    cfg = TINY + [f"run.out_dir={tmp_path}", "sparsity.permute=true", "sparsity.method=srste",
                  "train.checkpoint_every_steps=10", "logging.plots=false", "train.epochs=1"]
    summary = run_training(load_config(None, cfg))
    run_dir = Path(summary["run_dir"])
    rows = json.loads((run_dir / "permutation.json").read_text())
    maps = json.loads((run_dir / "input_maps.json").read_text())
    assert rows and all(r["kept_after"] >= r["kept_before"] for r in rows)
    assert set(maps) == {r["fqn"] for r in rows if r["input_map"]}
    manifest = json.loads((Path(summary["export"]["dir"]) / "manifest.json").read_text())
    mapped = {e["fqn"] for e in manifest["layers"] if e.get("input_permutation")}
    assert mapped == set(maps)
    assert main(["train", "--resume", str(run_dir)]) == 0  # re-attaches the maps; the export still verifies
