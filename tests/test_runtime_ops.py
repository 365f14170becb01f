"""The runtime's PyTorch operators (compile, export, trace, fake shapes), every ISA build of the
kernel source, and convert's measured layer choice."""

import copy
import shutil
import warnings

import pytest
import torch
from torch import nn

from nmsparse.mask import compute_mask
from nmsparse.pattern import parse_pattern
from nmsparse.runtime import SparseConv2d, SparseLinear, _native, convert, load_compressed, save_compressed

pytestmark = pytest.mark.skipif(not _native.available(), reason="no C++ compiler builds the kernels here")


def _sparse(layer, spec):
    with torch.no_grad():
        layer.weight.mul_(compute_mask(layer.weight, parse_pattern(spec), absolute=True))
    return layer.eval()


class _Net(nn.Module):
    """conv (stride 2, padded) -> BN -> ReLU -> 1x1 conv -> pool -> linear -> ReLU -> linear."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(16, 32, 3, stride=2, padding=1)
        self.bn = nn.BatchNorm2d(32)
        self.conv2 = nn.Conv2d(32, 64, 1)
        self.fc1 = nn.Linear(64, 64)
        self.fc2 = nn.Linear(64, 32)

    def forward(self, x):
        x = torch.relu(self.bn(self.conv1(x)))
        x = self.conv2(x).mean((2, 3))
        return self.fc2(torch.relu(self.fc1(x)))


def _converted(spec, seed=0):
    torch.manual_seed(seed)
    net = _Net().eval()
    for m in (net.conv1, net.conv2, net.fc1, net.fc2):
        _sparse(m, spec)
    with torch.no_grad():
        net.bn.running_mean.uniform_(-0.5, 0.5)
        net.bn.running_var.uniform_(0.5, 2.0)
    dense = copy.deepcopy(net)
    sparse, rows = convert(net, {f: spec for f in ("conv1", "conv2", "fc1", "fc2")})
    assert all(r.converted for r in rows)
    return dense, sparse


SPECS = ["2:4", "1x16:0.25", "1:8"]


@pytest.mark.parametrize("spec", SPECS)
def test_compile_fullgraph_and_export_equal_eager(spec):
    dense, sparse = _converted(spec)
    x = torch.randn(2, 16, 9, 9)
    with torch.no_grad():
        eager, ref = sparse(x), dense(x)
        assert (eager - ref).abs().max() < 1e-4
        compiled = torch.compile(sparse, fullgraph=True, backend="inductor")
        assert (compiled(x) - eager).abs().max() < 1e-5
        x3 = torch.randn(3, 16, 9, 9)  # another batch size through the compiled model
        assert (compiled(x3) - sparse(x3)).abs().max() < 1e-5
    program = torch.export.export(sparse, (x,))
    targets = {str(n.target) for n in program.graph.nodes if n.op == "call_function"}
    assert any("nmsparse" in t for t in targets), targets  # the kernels are operators of the program
    with torch.no_grad():
        assert (program.module()(x) - eager).abs().max() < 1e-5


def test_jit_trace_records_the_operators_and_gives_equal_outputs():
    dense, sparse = _converted("2:4")
    x = torch.randn(2, 16, 9, 9)
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")  # torch.jit.trace's deprecation notice
        traced = torch.jit.trace(sparse, (x,))
        assert "nmsparse::" in str(traced.inlined_graph)
        x2 = torch.randn(2, 16, 9, 9)  # new data, same shape: the trace recomputes, it does not replay
        assert (traced(x2) - sparse(x2)).abs().max() < 1e-5


@pytest.mark.parametrize("spec", SPECS)
def test_fake_implementations_give_the_real_shapes_and_strides(spec):
    from torch._subclasses.fake_tensor import FakeTensorMode

    _, sparse = _converted(spec)
    x = torch.randn(3, 16, 11, 10)
    with torch.no_grad():
        real = {name: m(x if isinstance(m, SparseConv2d) else torch.randn(5, m.in_features))
                for name, m in sparse.named_modules() if isinstance(m, (SparseConv2d, SparseLinear))}
    with FakeTensorMode(allow_non_fake_inputs=True) as mode:
        for name, m in sparse.named_modules():
            if not isinstance(m, (SparseConv2d, SparseLinear)):
                continue
            fx = mode.from_tensor(x if isinstance(m, SparseConv2d) else torch.randn(5, m.in_features))
            y = m(fx)
            assert y.shape == real[name].shape and y.stride() == real[name].stride(), name


def test_variants_of_other_instruction_sets_compile(tmp_path, monkeypatch):
    """The one kernel source builds for AVX-512, AVX2 and SSE2 on any x86 machine (the tests run those
    this CPU supports, test_runtime.py); NEON where an aarch64 cross compiler is given in
    NMSPARSE_CROSS_CXX (or natively on ARM)."""
    import platform

    arm = platform.machine().lower().startswith(("arm", "aarch"))
    variants = ["neon"] if arm else ["avx512", "avx2", "generic"]
    cross = shutil.which("aarch64-linux-gnu-g++")
    if not arm and cross:
        variants.append("neon")
    for variant in variants:
        if variant == "neon" and not arm:
            monkeypatch.setenv("NMSPARSE_CROSS_CXX", cross)
        path = _native.compile_only(variant, tmp_path)
        assert path.stat().st_size > 10_000, variant


def test_layer_choice_keeps_a_layer_dense_where_it_measured_slower(monkeypatch):
    """With example inputs every eligible layer is timed; one forced slower stays dense with the ratio in
    its row, the others convert; the whole model is timed before and after."""
    import time as _time

    dense, _ = _converted("1x16:0.25")
    net = copy.deepcopy(dense)
    slow_forward = SparseLinear.forward

    def slowed(self, x):  # the fc1 layer's sparse kernel made 5 ms slower
        if self.out_features == 64 and self.in_features == 64:
            _time.sleep(0.005)
        return slow_forward(self, x)

    monkeypatch.setattr(SparseLinear, "forward", slowed)
    x = torch.randn(2, 16, 9, 9)
    model, report = convert(net, {f: "1x16:0.25" for f in ("conv1", "conv2", "fc1", "fc2")}, example_inputs=x,
                            repeats=5)
    rows = {r.fqn: r for r in report}
    assert not rows["fc1"].converted and isinstance(model.fc1, nn.Linear)
    assert rows["fc1"].speedup < 1.0 and "kept dense" in rows["fc1"].reason and rows["fc1"].input_shape == [2, 64]
    assert all(r.speedup is not None for r in report)
    assert report.dense_ms > 0 and report.sparse_ms > 0 and report.speedup == report.dense_ms / report.sparse_ms
    assert report.isa == _native.status()["isa"]
    with torch.no_grad():
        assert (model(x) - dense(x)).abs().max() < 1e-4
    # min_speedup 0 keeps every layer sparse whatever it measured
    _, report = convert(copy.deepcopy(dense), {f: "1x16:0.25" for f in ("fc1",)}, example_inputs=x, repeats=2,
                        min_speedup=0.0)
    assert {r.fqn: r.converted for r in report}["fc1"]


def test_layer_choice_round_trips_through_the_compressed_export(tmp_path):
    """Layers kept dense by the measured choice are stored dense (with the reason in the manifest) and
    stay dense on reload; the rest load packed; outputs equal the export's."""
    pytest.importorskip("timm")
    from nmsparse.cli.main import main
    from nmsparse.export import load_export

    assert main(["prune", "timm:test_resnet", "--pattern", "2:4", "--out", str(tmp_path / "dense"), "--json"]) == 0
    dense, manifest = load_export(tmp_path / "dense")
    fqns = [e["fqn"] for e in manifest["layers"]]
    keep = {fqns[0]: "kept dense: sparse measured 0.50x of dense at input [1, 24, 40, 40] (below 1x)"}
    report = save_compressed(tmp_path / "dense", tmp_path / "packed", keep_dense=keep)
    assert report["kept_dense"] == keep and report["packed_layers"] == len(fqns) - 1
    model, saved = load_compressed(tmp_path / "packed")
    assert saved["kept_dense"] == keep
    assert isinstance(model.get_submodule(fqns[0]), nn.Conv2d)
    assert all(isinstance(model.get_submodule(f), (SparseConv2d, SparseLinear)) for f in fqns[1:])
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert (model(x) - dense.eval()(x)).abs().max() / dense(x).abs().max() < 1e-4
    # measured choice: with example inputs every layer gets a ratio, and the report lists what stayed dense
    report = save_compressed(tmp_path / "dense", tmp_path / "timed", example_inputs=torch.randn(1, 3, 64, 64),
                             min_speedup=1e9)  # nothing can reach this: every layer stays dense
    assert report["packed_layers"] == 0 and set(report["kept_dense"]) == set(fqns)
    assert all("kept dense" in r for r in report["kept_dense"].values())


def test_compressed_export_loads_dense_without_kernels(tmp_path, monkeypatch):
    """No compiler where the compressed export is loaded: packed layers are unpacked into their dense
    modules, with a warning; the outputs are the same."""
    pytest.importorskip("timm")
    from nmsparse.cli.main import main
    from nmsparse.export import load_export

    assert main(["prune", "timm:test_resnet", "--pattern", "1x8:0.5", "--out", str(tmp_path / "dense"),
                 "--json"]) == 0
    save_compressed(tmp_path / "dense", tmp_path / "packed")
    monkeypatch.setenv("NMSPARSE_RUNTIME_BACKEND", "dense")
    monkeypatch.setattr(_native, "_LOADED", None)
    _native._load.cache_clear()
    try:
        with pytest.warns(RuntimeWarning, match="NMSPARSE_RUNTIME_BACKEND"):
            model, _ = load_compressed(tmp_path / "packed")
        assert not any(isinstance(m, (SparseConv2d, SparseLinear)) for m in model.modules())
        dense, _ = load_export(tmp_path / "dense")
        x = torch.randn(2, 3, 64, 64)
        with torch.no_grad():
            assert (model(x) - dense.eval()(x)).abs().max() / dense(x).abs().max() < 1e-5
    finally:
        monkeypatch.undo()
        _native._load.cache_clear()


def test_models_suite_reports_both_batches_throughput_and_the_isa(tmp_path):
    pytest.importorskip("timm")
    from nmsparse.bench import machine_meta, run_model_suite, write_report

    rows = run_model_suite(["1x16:0.25"], ["test_resnet"], repeats=2, progress="none", batches=(1, 2))
    assert [r["batch"] for r in rows] == [1, 2]
    for r in rows:
        assert r["dense_items_per_s"] == pytest.approx(1e3 * r["batch"] / r["dense"]["median_ms"])
        assert r["sparse_items_per_s"] == pytest.approx(1e3 * r["batch"] / r["sparse"]["median_ms"])
        assert r["layer_choice"] and r["converted_layers"] + r["kept_dense_by_choice"] <= r["sparse_layers"]
        assert r["weight_bytes_sparse"] <= r["weight_bytes_dense"]
    meta = machine_meta(2, "test")
    assert meta["isa"] == _native.status()["isa"]
    paths = write_report(rows, tmp_path, "models", meta)
    header = paths["md"].read_text().splitlines()[0]
    assert header.startswith(f"kernels {meta['isa']}") and "items/s" in paths["md"].read_text()


def test_compress_command_with_layer_choice_and_bad_input(tmp_path, capsys):
    pytest.importorskip("timm")
    import json

    from nmsparse.cli.main import main

    assert main(["prune", "timm:test_resnet", "--pattern", "1x8:0.5", "--out", str(tmp_path / "dense"), "--json"]) == 0
    capsys.readouterr()
    assert main(["compress", str(tmp_path / "dense"), "--out", str(tmp_path / "c"), "--choose-batch", "0"]) == 2
    assert "--choose-batch must be >= 1" in capsys.readouterr().err
    assert main(["compress", str(tmp_path / "nothing"), "--out", str(tmp_path / "c")]) == 2
    assert main(["compress", str(tmp_path / "dense"), "--out", str(tmp_path / "c"), "--choose-batch", "1",
                 "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    manifest = json.loads((tmp_path / "c" / "manifest.json").read_text())
    assert manifest["kept_dense"] == report["kept_dense"]
    assert report["packed_layers"] + len(report["kept_dense"]) == len(manifest["layers"])
    model, _ = load_compressed(tmp_path / "c")
    assert sum(isinstance(m, SparseConv2d) for m in model.modules()) == report["packed_layers"]


def test_env_reports_the_isa_path_the_kernels_run(capsys):
    from nmsparse.cli.main import main

    assert main(["env"]) == 0
    lines = capsys.readouterr().out.splitlines()
    line = next(x for x in lines if "cpu_sparse_runtime" in x)
    assert f"{_native.status()['isa']} path" in line
    from nmsparse import _topk_cpu

    masks = next(x for x in lines if "mask_kernels" in x)
    lib = _topk_cpu.cpp_library()
    assert (f"C++, {lib.nms_mask_lanes()} floats per vector" in masks) if lib is not None else ("numba" in masks)


def test_a_converted_model_slower_as_a_whole_is_put_back(monkeypatch):
    """Every layer measured faster alone, but the model as a whole slower (here: a slow forward of the
    sparse modules only when called inside the model): convert puts every module back, fusion included."""
    import sys

    conv = sys.modules["nmsparse.runtime.convert"]  # the module (the package exports the function by that name)
    dense, _ = _converted("1x16:0.25")
    net = copy.deepcopy(dense)
    calls = iter([[1.0], [2.0, 1.0], [2.0, 1.0], [2.0, 1.0], [2.0, 1.0], [3.0]])  # model, 4 layers, model
    monkeypatch.setattr(conv, "_best_ms", lambda fns, repeats, before=None: next(calls))
    x = torch.randn(2, 16, 9, 9)
    model, report = convert(net, {f: "1x16:0.25" for f in ("conv1", "conv2", "fc1", "fc2")}, example_inputs=x)
    assert report.reverted and report.speedup == pytest.approx(1 / 3)
    assert all(not r.converted and "as a whole" in r.reason for r in report if r.pattern)
    assert not any(isinstance(m, (SparseConv2d, SparseLinear)) for m in model.modules())
    assert isinstance(model.bn, nn.BatchNorm2d)  # the folded batch norm is back too
    with torch.no_grad():
        assert torch.equal(model(x), dense(x))


def test_layers_of_a_model_larger_than_the_cache_are_timed_cold(monkeypatch):
    """A model larger than the last-level cache runs each layer from memory: every timed layer call
    follows a cache flush (untimed); a model that fits is timed back to back."""
    from nmsparse.runtime import timing

    dense, _ = _converted("1x16:0.25")
    x = torch.randn(2, 16, 9, 9)
    patterns = {f: "1x16:0.25" for f in ("conv1", "conv2", "fc1", "fc2")}
    flushes = []
    monkeypatch.setattr(timing.CacheFlush, "__call__", lambda self: flushes.append(self.buffer.numel()))
    monkeypatch.setattr(timing, "last_level_cache_bytes", lambda: 1 << 30)  # 1 GiB: the model fits
    _, report = convert(copy.deepcopy(dense), patterns, example_inputs=x, repeats=3)
    assert not report.cold_cache and not flushes
    monkeypatch.setattr(timing, "last_level_cache_bytes", lambda: 4096)
    model, report = convert(copy.deepcopy(dense), patterns, example_inputs=x, repeats=3)
    assert report.cold_cache
    assert len(flushes) == 4 * 2 * 3  # every timed call of 4 layers, dense and sparse, 3 repeats each
    assert flushes[0] == int(1.5 * 4096) // 4  # 1.5x the cache, in floats
    with torch.no_grad():
        assert (model(x) - dense(x)).abs().max() < 1e-4


def test_time_interleaved_runs_before_untimed_before_every_timed_call():
    from nmsparse.runtime.timing import time_interleaved

    log = []
    times = time_interleaved([lambda i: log.append("a"), lambda i: log.append("b")], warmup=1, repeats=3,
                             before=lambda: log.append("flush"))
    assert [len(t) for t in times] == [3, 3]
    timed = [log[k + 1] for k, entry in enumerate(log) if entry == "flush"]
    assert sorted(timed) == ["a"] * 3 + ["b"] * 3  # each flush is followed by one timed call
