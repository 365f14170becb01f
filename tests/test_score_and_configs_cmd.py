"""score.py against hand values, the numba path for conv weights against the torch reference, and the
`nmsparse configs` command."""

import pytest
import torch
import yaml

from nmsparse.cli.main import main
from nmsparse.config.load import list_recipes
from nmsparse.mask import _topk_torch, from_groups, nm_mask, to_groups
from nmsparse.pattern import NMPattern
from nmsparse.score import activation_weighted, magnitude


def test_magnitude_and_activation_weighted_by_hand():
    w = torch.tensor([[1.0, -2.0, 3.0, -4.0]], requires_grad=True)
    assert magnitude(w).tolist() == [[1.0, 2.0, 3.0, 4.0]] and not magnitude(w).requires_grad
    norms = torch.tensor([4.0, 1.0, 0.5, 0.25])
    assert activation_weighted(w, norms).tolist() == [[4.0, 2.0, 1.5, 1.0]]  # |W_ij| * ||X_j||
    conv = torch.ones(2, 3, 2, 2)
    conv[1] = -2.0
    scores = activation_weighted(conv, torch.tensor([1.0, 2.0, 3.0]))  # per input channel, every kernel tap
    assert scores.shape == conv.shape
    assert scores[0, :, 0, 0].tolist() == [1.0, 2.0, 3.0] and scores[1, :, 1, 1].tolist() == [2.0, 4.0, 6.0]
    im2col = activation_weighted(conv, torch.arange(12.0).reshape(3, 2, 2))  # one norm per im2col column
    assert torch.equal(im2col[0], torch.arange(12.0).reshape(3, 2, 2))


@pytest.mark.parametrize("m", [4, 8])
@pytest.mark.parametrize("absolute", [False, True])
def test_conv_weight_masks_from_the_numba_path_equal_the_torch_reference(m, absolute):
    from nmsparse import _topk_cpu

    if not _topk_cpu.available():
        pytest.skip("numba not installed: the torch path is the only path")
    gen = torch.Generator().manual_seed(m)
    weight = torch.randint(-3, 4, (6, 2 * m, 3, 3), generator=gen).float()  # groups strided over channels
    for n in range(1, m):
        pattern = NMPattern(n, m, "in")
        groups = to_groups(weight, pattern)  # [G, m], the reference gathers each group explicitly
        expected = from_groups(_topk_torch(groups.abs() if absolute else groups, n), weight.shape, pattern)
        assert torch.equal(nm_mask(weight, pattern, absolute=absolute), expected)


def test_configs_list_show_and_validate(capsys, tmp_path):
    assert main(["configs", "list"]) == 0
    listed = capsys.readouterr().out
    assert all(name in listed for name in list_recipes())
    assert main(["configs", "show", "default"]) == 0
    text = capsys.readouterr().out
    assert text.startswith("#") and "nmsparse train" in text.split("\ndata:")[0]  # the header gives the command
    assert main(["configs", "show", "default", "--resolved"]) == 0
    resolved = yaml.safe_load(capsys.readouterr().out)
    assert {"model", "data", "sparsity", "train"} <= set(resolved) and resolved["sparsity"]["method"]
    assert main(["configs", "validate"]) == 0
    assert capsys.readouterr().out.count("ok  ") == len(list_recipes())
    bad = tmp_path / "bad.yaml"
    bad.write_text("# a recipe with a typo\nsparsity:\n  methd: srste\n")
    assert main(["configs", "validate", str(bad)]) == 2
    err = capsys.readouterr().err
    assert "sparsity.methd" in err and "method" in err and "Traceback" not in err
