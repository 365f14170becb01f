import pytest
import torch
from torch import nn


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


class TinyViTBlock(nn.Module):
    """Names like timm's ViT: attn.qkv (fused), attn.proj, mlp.fc1, mlp.fc2."""

    def __init__(self, dim=16):
        super().__init__()
        self.attn = nn.Module()
        self.attn.qkv = nn.Linear(dim, 3 * dim)
        self.attn.proj = nn.Linear(dim, dim)
        self.mlp = nn.Module()
        self.mlp.fc1 = nn.Linear(dim, 4 * dim)
        self.mlp.fc2 = nn.Linear(4 * dim, dim)

    def forward(self, x):
        q, k, v = self.attn.qkv(x).chunk(3, dim=-1)
        att = torch.softmax(q @ k.transpose(-1, -2) / 4.0, dim=-1)
        x = x + self.attn.proj(att @ v)
        return x + self.mlp.fc2(torch.relu(self.mlp.fc1(x)))


class TinyViT(nn.Module):
    def __init__(self, dim=16, classes=5):
        super().__init__()
        self.patch = nn.Conv2d(3, dim, 4, 4)
        self.blocks = nn.Sequential(TinyViTBlock(dim), TinyViTBlock(dim))
        self.head = nn.Linear(dim, classes)

    def forward(self, x):
        x = self.patch(x).flatten(2).transpose(1, 2)
        return self.head(self.blocks(x).mean(1))


class TinyCNN(nn.Module):
    def __init__(self, classes=10):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 8, 3, padding=1)
        self.conv2 = nn.Conv2d(8, 16, 3, padding=1)
        self.dw = nn.Conv2d(16, 16, 3, padding=1, groups=16)
        self.conv3 = nn.Conv2d(16, 16, 1)
        self.fc = nn.Linear(16, classes)

    def forward(self, x):
        x = torch.relu(self.conv1(x))
        x = torch.relu(self.conv2(x))
        x = torch.relu(self.conv3(self.dw(x)))
        return self.fc(x.mean((2, 3)))


@pytest.fixture
def tiny_vit():
    return TinyViT()


@pytest.fixture
def tiny_cnn():
    return TinyCNN()


def train_steps(model, sparsifier, steps, input_shape, *, start=0, lr=0.05, loss=None, optimizer=None, seed=None):
    """The shared "train N steps with a sparsifier" loop of the method tests.

    Optimizer steps ``start`` .. ``start + steps - 1`` on random inputs of ``input_shape`` (seeded by
    ``seed`` when given), loss ``loss(model, x)`` (default: mean square of the output) plus the
    sparsifier's penalty, then ``sparsifier.step(step)``; ``optimizer(params)`` builds the optimizer
    (default SGD at ``lr``).
    """
    params = [p for p in model.parameters() if p.requires_grad]
    opt = optimizer(params) if optimizer is not None else torch.optim.SGD(params, lr=lr)
    gen = torch.Generator().manual_seed(seed) if seed is not None else None
    for step in range(start, start + steps):
        x = torch.randn(input_shape, generator=gen)
        value = loss(model, x) if loss is not None else model(x).pow(2).mean()
        value = value + sparsifier.penalty()
        opt.zero_grad()
        value.backward()
        opt.step()
        sparsifier.step(step)
