"""The runtime's PyTorch operators (compile, export, trace, fake shapes), every ISA build of the
kernel source, and convert's measured layer choice."""

import copy
import importlib
import shutil
import warnings

import pytest
import torch
from torch import nn

from nmsparse.mask import compute_mask
from nmsparse.pattern import parse_pattern
from nmsparse.runtime import SparseConv2d, SparseLinear, _native, convert, load_compressed, save_compressed

convert_module = importlib.import_module("nmsparse.runtime.convert")  # the package's `convert` is the function
choice_module = importlib.import_module("nmsparse.runtime.choice")

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
    variants = ["neon"] if arm else ["avx512", "avx512vnni", "avx2", "generic"]
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

    def slowed(self, x):  # the fc1 layer's sparse kernel made 30 ms slower (a margin over a loaded machine's jitter)
        if self.out_features == 64 and self.in_features == 64:
            _time.sleep(0.03)
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


@pytest.mark.parametrize("slowed_layers,converted", [({"1"}, True), ({"0", "2"}, False)])
def test_layers_of_one_shape_are_chosen_together_by_their_median(monkeypatch, slowed_layers, converted):
    """Three layers of one shape and input share one decision, from the median of their ratios: one
    slow outlier does not keep its layer dense, two slow of three keep all three dense (with the
    group's ratio in each reason); a layer of another shape is decided on its own."""
    torch.manual_seed(0)
    net = nn.Sequential(*[_sparse(nn.Linear(64, 64), "1x16:0.25") for _ in range(3)],
                        _sparse(nn.Linear(64, 32), "1x16:0.25"))
    slowed = {id(net[int(i)]) for i in slowed_layers}

    def best_ms(fns, repeats):  # a layer's dense form 1 ms; its sparse form 0.5 ms, or 2 ms if slowed
        if len(fns) == 1:
            return [1.0]  # the whole model
        dense_layer = fns[0].__defaults__[0][0]
        return [1.0, 2.0 if id(dense_layer) in slowed else 0.5]

    monkeypatch.setattr(choice_module, "best_ms", best_ms)
    x = torch.randn(4, 64)
    model, report = convert(net, {str(i): "1x16:0.25" for i in range(4)}, example_inputs=x, repeats=3, fuse=False)
    rows = {r.fqn: r for r in report}
    assert [rows[str(i)].converted for i in range(3)] == [converted] * 3
    assert rows["3"].converted  # its own group
    if not converted:
        assert all("the 3 layers of this shape measured" in rows[str(i)].reason for i in range(3))
    assert [rows[str(i)].speedup for i in range(3)] == [0.5 if str(i) in slowed_layers else 2.0 for i in range(3)]


@pytest.mark.parametrize("model_ms", [1.0, 100_000.0])
def test_repeated_layers_of_a_model_larger_than_the_cache_are_chosen_in_the_model(monkeypatch, model_ms):
    """In a model larger than the cache, a group of repeated layers is decided by timing the whole
    model with the group sparse and dense: a group faster alone but slower in the model stays dense
    (the reason says so; a verdict against the layers alone is timed a second time), a layer without
    repeats by its own ratio. Where timing the model per group
    would take over the budget (a slow model call), the median of the layers decides."""
    from nmsparse.runtime import timing

    torch.manual_seed(0)
    net = nn.Sequential(*[_sparse(nn.Linear(64, 64), "1x16:0.25") for _ in range(2)],
                        *[_sparse(nn.Linear(64, 64), "2:4") for _ in range(2)], _sparse(nn.Linear(64, 32), "2:4"))
    in_model = []

    def best_ms(fns, repeats):
        if len(fns) == 1:
            return [model_ms]  # the whole model before and after
        defaults = fns[0].__defaults__
        if len(defaults) == 1:  # the whole model with one group dense, then sparse
            key = defaults[0]
            in_model.append(key)
            return [1.0, 2.0] if key[2] == "2:4" else [1.0, 0.5]  # 2:4 layers: slower inside the model
        return [1.0, 0.5]  # every layer alone: 2x faster sparse

    monkeypatch.setattr(choice_module, "best_ms", best_ms)
    monkeypatch.setattr(timing, "last_level_cache_bytes", lambda: 4096)
    patterns = {"0": "1x16:0.25", "1": "1x16:0.25", "2": "2:4", "3": "2:4", "4": "2:4"}
    model, report = convert(copy.deepcopy(net), patterns, example_inputs=torch.randn(1, 64), repeats=3, fuse=False)
    rows = {r.fqn: r for r in report}
    assert report.cold_cache and rows["4"].converted and rows["0"].converted and rows["1"].converted
    if model_ms == 1.0:
        # the two repeated groups, not the single layer; the 2:4 group, slower in the model than alone, twice
        assert len(set(in_model)) == 2 and [key[2] for key in in_model].count("2:4") == 2 and len(in_model) == 3
        assert not rows["2"].converted and not rows["3"].converted
        assert "the model ran 0.50x as fast with the 2 layers of this shape sparse" in rows["2"].reason
        assert isinstance(model[2], nn.Linear) and isinstance(model[0], SparseLinear)
    else:
        assert not in_model and rows["2"].converted and rows["3"].converted
    x = torch.randn(3, 64)
    with torch.no_grad():
        assert (model(x) - net(x)).abs().max() < 1e-4


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

    conv = sys.modules["nmsparse.runtime.choice"]  # the layer choice times through choice.best_ms
    dense, _ = _converted("1x16:0.25")
    net = copy.deepcopy(dense)
    calls = iter([[1.0], [2.0, 1.0], [2.0, 1.0], [2.0, 1.0], [2.0, 1.0], [3.0]])  # model, 4 layers, model
    monkeypatch.setattr(conv, "best_ms", lambda fns, repeats: next(calls))
    x = torch.randn(2, 16, 9, 9)
    model, report = convert(net, {f: "1x16:0.25" for f in ("conv1", "conv2", "fc1", "fc2")}, example_inputs=x)
    assert report.reverted and report.speedup == pytest.approx(1 / 3)
    assert all(not r.converted and "as a whole" in r.reason for r in report if r.pattern)
    assert not any(isinstance(m, (SparseConv2d, SparseLinear)) for m in model.modules())
    assert isinstance(model.bn, nn.BatchNorm2d)  # the folded batch norm is back too
    with torch.no_grad():
        assert torch.equal(model(x), dense(x))


def test_layers_of_a_model_larger_than_the_cache_are_timed_cold(monkeypatch):
    """A model larger than the last-level cache runs each layer from memory: each layer is timed
    cycling through copies of it whose weights together exceed the cache (so every timed call reads
    its weights from memory, the code and input stay warm); a model that fits is timed in place."""
    from nmsparse.runtime import timing

    dense, _ = _converted("1x16:0.25")
    x = torch.randn(2, 16, 9, 9)
    patterns = {f: "1x16:0.25" for f in ("conv1", "conv2", "fc1", "fc2")}
    sets = []
    real = timing.cold_copies
    monkeypatch.setattr(timing, "cold_copies", lambda m, nbytes: sets.append(real(m, nbytes, 4096)) or sets[-1])
    monkeypatch.setattr(timing, "last_level_cache_bytes", lambda: 1 << 30)  # 1 GiB: the model fits
    _, report = convert(copy.deepcopy(dense), patterns, example_inputs=x, repeats=3)
    assert not report.cold_cache and not sets
    monkeypatch.setattr(timing, "last_level_cache_bytes", lambda: 4096)
    model, report = convert(copy.deepcopy(dense), patterns, example_inputs=x, repeats=3)
    assert report.cold_cache and len(sets) == 4 * 2  # the dense and the sparse form of each layer
    fc2 = [s for s in sets if isinstance(s[0], nn.Linear) and s[0].out_features == 32][0]
    assert len(fc2) == 1  # 8 KB of weights: the layer alone reads twice the 4 KB cache
    conv2 = [s for s in sets if isinstance(s[0], nn.Conv2d) and s[0].out_channels == 64][0]
    assert len(conv2) == -(-2 * 4096 // (64 * 32 * 4))  # 8 KB too
    small = [s for s in sets if len(s) > 1]
    assert small and all(len({c.weight.data_ptr() if hasattr(c, "weight") else c.vals.data_ptr() for c in s}) == len(s)
                         for s in small)
    with torch.no_grad():
        assert (model(x) - dense(x)).abs().max() < 1e-4


def test_cold_copies_hold_their_own_weights_enough_to_exceed_the_cache():
    from nmsparse.runtime.timing import cold_copies

    layer = nn.Linear(64, 32)  # 8 KB of weights
    copies = cold_copies(layer, 8192, cache_bytes=64 * 1024)
    assert len(copies) == 16 and copies[0] is layer  # twice the cache
    assert len({c.weight.data_ptr() for c in copies}) == 16
    x = torch.randn(3, 64)
    assert all(torch.equal(c(x), layer(x)) for c in copies)
    assert cold_copies(layer, 1 << 30, cache_bytes=64 * 1024) == [layer]  # larger than the cache: itself


def test_rotating_calls_the_copies_in_turn():
    from nmsparse.runtime.timing import rotating, time_interleaved

    log = []
    layers = [lambda x, k=k: log.append((k, x)) for k in range(3)]
    times = time_interleaved([rotating(layers, "x")], warmup=1, repeats=5)
    assert len(times[0]) == 5
    calls = [k for k, _ in log[1:]]  # after the warm-up call: one copy after the other
    assert calls == [i % 3 for i in range(len(calls))] and len(calls) >= 6 and {x for _, x in log} == {"x"}


# ---------------------------------------------------------------- eager calls without the dispatcher
def _sparse_linear(spec, bias=True, seed=0, out=48, inp=64):
    torch.manual_seed(seed)
    layer = _sparse(nn.Linear(inp, out, bias=bias), spec)
    model, rows = convert(nn.Sequential(layer), {"0": spec}, infer=False, fuse=False)
    assert rows[0].converted
    return layer, model[0]


def _op_call(m, x2d):
    """The module's product through PyTorch's dispatcher (what compile/export see)."""
    if m.kind == "block":
        return torch.ops.nmsparse.block_linear(x2d, m.cols, m.kstart, m.vals, m.bias, m.activation == "relu")
    return torch.ops.nmsparse.nm_linear(x2d, m.codes, m.vals, m.bias, m.out_features, m.n, m.m, m.activation == "relu")


@pytest.mark.parametrize("spec", ["2:4", "1x16:0.25", "1:8", "2:8"])
@pytest.mark.parametrize("bias", [True, False])
def test_eager_calls_skip_the_dispatcher_and_equal_the_operator(spec, bias, monkeypatch):
    """A plain eager call (one token or many) runs the kernels without the dispatcher and gives
    bit for bit what the operator gives, with the bias and a fused ReLU."""
    from nmsparse.runtime import ops

    dense, m = _sparse_linear(spec, bias)
    inputs = [
        torch.randn(1, 64),
        torch.randn(1, 1, 64),
        torch.randn(64),
        torch.randn(1, 1, 1, 1, 64),
        torch.randn(5, 64),
        torch.randn(2, 3, 64),
    ]
    expected = [_op_call(m, x.reshape(-1, 64)).reshape(*x.shape[:-1], 48) for x in inputs]
    m.activation = "relu"
    expected_relu = [_op_call(m, x.reshape(-1, 64)).reshape(*x.shape[:-1], 48) for x in inputs]

    def refuse(*args, **kwargs):
        raise AssertionError("the dispatcher was called in a plain eager call")

    monkeypatch.setattr(ops, "nm_linear", refuse)
    monkeypatch.setattr(ops, "block_linear", refuse)
    with torch.no_grad():
        got_relu = [m(x) for x in inputs]
        m.activation = None  # a changed activation rebuilds the bound one-token call
        got = [m(x) for x in inputs]
    for x, e, g, er, gr in zip(inputs, expected, got, expected_relu, got_relu):
        assert g.shape == x.shape[:-1] + (48,) and torch.equal(g, e) and torch.equal(gr, er)
        assert (g - dense(x)).abs().max() < 1e-5
    assert (torch.stack(got_relu[:1]) >= 0).all() and (got[0] < 0).any()


def test_tools_and_gradients_still_see_the_operator():
    """Under a dispatch mode (FlopCounterMode, tracing), jit.trace or with a gradient asked for, a
    one-token call goes through the operator, not around it."""
    from torch.utils._python_dispatch import TorchDispatchMode

    from nmsparse.runtime import ops

    class Record(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.ops = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.ops.append(str(func))
            return func(*args, **(kwargs or {}))

    _, m = _sparse_linear("2:4")
    x = torch.randn(1, 64)
    assert ops.eager(x)
    with Record() as rec:
        y = m(x)
    assert any("nmsparse.nm_linear" in o for o in rec.ops) and torch.equal(y, m(x))
    traced = torch.jit.trace(m, x)
    assert "nmsparse::nm_linear" in str(traced.graph) and torch.equal(traced(x), y)
    xg = x.clone().requires_grad_()
    assert not ops.eager(xg)
    with torch.no_grad():
        assert ops.eager(xg)


def test_bound_one_token_call_follows_replaced_buffers_copies_and_pickling(tmp_path):
    """The bound kernel call is rebuilt when the weights are replaced (load_state_dict of another
    layer's values, ``.to()``), is never shared with a deep copy, and is not pickled."""
    _, a = _sparse_linear("1x16:0.25", seed=0)
    dense_b, b = _sparse_linear("1x16:0.25", seed=0)
    with torch.no_grad():
        dense_b.weight.mul_(3.0)
        dense_b.bias.add_(1.0)
    b, _ = convert(nn.Sequential(dense_b), {"0": "1x16:0.25"}, infer=False, fuse=False)
    b = b[0]
    x = torch.randn(1, 64)
    with torch.no_grad():
        y_a = a(x)
        a.load_state_dict(b.state_dict())  # same mask, new values: copied in place
        assert torch.equal(a(x), b(x)) and not torch.equal(a(x), y_a)
        twin = copy.deepcopy(a)
        twin.vals.mul_(0.0)
        assert torch.equal(a(x), b(x)) and torch.equal(twin(x), twin.bias.detach().unsqueeze(0))
        moved = copy.deepcopy(b).to(torch.float32)
        assert torch.equal(moved(x), b(x))
        torch.save(a, tmp_path / "layer.pt")
        again = torch.load(tmp_path / "layer.pt", weights_only=False)
        assert torch.equal(again(x), b(x))


def test_small_one_token_products_run_on_the_calling_thread(monkeypatch):
    """Packed weights below SERIAL_GEMV_BYTES run their one-token product on one thread (waking the
    other threads costs more than it saves); larger ones on torch's thread count."""
    calls = []
    real = _native.gemv_call

    def recording(w, bias=None, relu=False, lib=None):
        fn = real(w, bias, relu, lib)
        return lambda x, out, threads: calls.append(threads) or fn(x, out, threads)

    monkeypatch.setattr(_native, "gemv_call", recording)
    monkeypatch.setattr(_native, "SERIAL_GEMV_BYTES", 8 * 1024)
    _, small = _sparse_linear("2:4", out=16, inp=64)  # 2 KB of values
    _, large = _sparse_linear("2:4", out=256, inp=128)  # 64 KB of values
    assert small.weight_nbytes < 8 * 1024 <= large.weight_nbytes
    with torch.no_grad():
        small(torch.randn(1, 64))
        large(torch.randn(1, 128))
    assert calls == [1, torch.get_num_threads()]


def test_sparse_products_leave_the_process_thread_count_alone(monkeypatch):
    """A product run on fewer threads than torch's (the one-token path on one thread) must not change
    the thread count of later PyTorch/MKL operators: the kernels share PyTorch's OpenMP runtime, and
    an omp_set_num_threads(1) there once left every dense operator of a model on one thread."""
    monkeypatch.setattr(_native, "SERIAL_GEMV_BYTES", 8 * 1024)
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        _, small = _sparse_linear("2:4", out=16, inp=64)  # one-token product on the calling thread
        _, block = _sparse_linear("1x16:0.25", out=32, inp=64)
        conv = convert(nn.Sequential(_sparse(nn.Conv2d(8, 16, 3, padding=1), "2:4")), {"0": "2:4"}, infer=False)[0]
        with torch.no_grad():
            for module, x in ((small, torch.randn(1, 64)), (small, torch.randn(9, 64)), (block, torch.randn(1, 64)),
                              (block, torch.randn(9, 64)), (conv, torch.randn(2, 8, 6, 6))):
                module(x)
                assert torch.get_num_threads() == 2, type(module).__name__
        assert "mkl_get_max_threads() : 2" in torch.__config__.parallel_info()
    finally:
        torch.set_num_threads(before)


def test_serial_threshold_reads_the_environment_and_warns_on_a_bad_value(monkeypatch):
    monkeypatch.setenv("NMSPARSE_SERIAL_GEMV_BYTES", "2048")
    assert _native._serial_gemv_bytes() == 2048
    monkeypatch.setenv("NMSPARSE_SERIAL_GEMV_BYTES", "half a megabyte")
    with pytest.warns(UserWarning, match="not a byte count"):
        assert _native._serial_gemv_bytes() == 64 * 1024
    monkeypatch.delenv("NMSPARSE_SERIAL_GEMV_BYTES")
    assert _native._serial_gemv_bytes() == 64 * 1024


def test_outputs_are_float32_whatever_the_default_dtype():
    """The kernels write float32: outputs are allocated float32 even under torch.set_default_dtype(float64)."""
    dense, m = _sparse_linear("2:4")
    x1, x5 = torch.randn(1, 64), torch.randn(5, 64)
    expected = [_op_call(m, x1), _op_call(m, x5)]
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        with torch.no_grad():
            got = [m(x1), m(x5)]
    finally:
        torch.set_default_dtype(previous)
    assert all(g.dtype == torch.float32 and torch.equal(g, e) for g, e in zip(got, expected))


def test_without_the_private_probes_every_call_takes_the_dispatcher(monkeypatch):
    """A PyTorch without the torch._C functions the eager check reads: eager() is False and calls go
    through the operator, with the same result."""
    from nmsparse.runtime import ops

    _, m = _sparse_linear("2:4")
    x = torch.randn(1, 64)
    with torch.no_grad():
        fast = m(x)
    monkeypatch.setattr(ops, "_PROBES", None)
    calls = []
    original = ops.nm_linear
    monkeypatch.setattr(ops, "nm_linear", lambda *a, **k: calls.append(1) or original(*a, **k))
    with torch.no_grad():
        slow = m(x)
    assert not ops.eager(x) and calls and torch.equal(slow, fast)



def test_a_converted_model_runs_with_gradients_on_and_refuses_only_a_backward():
    """Called outside no_grad (as users do), a converted timm ResNet with residual `x += shortcut` after
    sparse convolutions gives the no_grad result; a backward through a packed kernel is a one-line
    InferenceOnlyError naming what to do instead."""
    timm = pytest.importorskip("timm")
    from nmsparse import Selection, Sparsifier
    from nmsparse.runtime import convert
    from nmsparse.runtime.ops import InferenceOnlyError

    model = timm.create_model("test_resnet").eval()
    sparsifier = Sparsifier("magnitude", "1x16:0.25", Selection())
    sparsifier.prepare(model)
    sparsifier.squash()
    converted, report = convert(model, infer=True)
    assert sum(row.converted for row in report) > 0
    x = torch.randn(1, 3, 96, 96)
    y = converted(x)
    with torch.no_grad():
        expected = converted(x)
    assert y.requires_grad and torch.equal(y, expected)
    with pytest.raises(InferenceOnlyError, match="inference-only"):
        y.sum().backward()
