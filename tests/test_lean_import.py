import subprocess
import sys


def test_import_does_not_initialise_cuda_or_heavy_extras():
    code = (
        "import sys, torch, nmsparse, nmsparse.cli.main, nmsparse.runtime\n"
        "assert not torch.cuda.is_initialized(), 'CUDA initialised on import'\n"
        "heavy = [m for m in ('timm', 'transformers', 'torchvision', 'matplotlib', 'numba', 'torch._dynamo',\n"
        "                     'torch._inductor') if m in sys.modules]\n"
        "assert not heavy, heavy\n"
        "print('ok')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok"
