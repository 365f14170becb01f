import subprocess
import sys


def _fresh_process_prints_ok(code: str) -> None:
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok"


def test_import_does_not_initialise_cuda_or_heavy_extras():
    code = (
        "import sys, torch, nmsparse, nmsparse.cli.main, nmsparse.runtime\n"
        "assert not torch.cuda.is_initialized(), 'CUDA initialised on import'\n"
        "heavy = [m for m in ('timm', 'transformers', 'torchvision', 'matplotlib', 'numba', 'torch._dynamo',\n"
        "                     'torch._inductor') if m in sys.modules]\n"
        "assert not heavy, heavy\n"
        "print('ok')\n"
    )
    _fresh_process_prints_ok(code)


def test_sparse_training_steps_do_not_load_numba_where_a_compiler_builds_the_mask_kernels():
    """2:4 SR-STE training (prepare, mask updates, backward with the decay hook) runs on the C++ mask
    kernels: a fresh process never pays numba's ~1 s start-up."""
    from nmsparse import _topk_cpu

    if _topk_cpu.cpp_library() is None:
        import pytest

        pytest.skip("no C++ compiler: training uses the numba kernels")
    code = (
        "import sys, torch\n"
        "from torch import nn\n"
        "from nmsparse import Selection, Sparsifier\n"
        "model = nn.Sequential(nn.Conv2d(4, 8, 1), nn.Conv2d(8, 8, 3), nn.Flatten(),\n"
        "                      nn.Linear(128, 16), nn.Linear(16, 4))\n"
        "sparsifier = Sparsifier('srste', '2:4', Selection(layers=('all',)))\n"
        "sparsifier.prepare(model)\n"
        "model(torch.randn(2, 4, 6, 6)).sum().backward()\n"
        "sparsifier.step(0)\n"
        "assert model[1].parametrizations.weight.original.grad is not None\n"
        "assert 'numba' not in sys.modules, 'numba was imported'\n"
        "print('ok')\n"
    )
    _fresh_process_prints_ok(code)
