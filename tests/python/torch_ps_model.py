"""The module test_torch_ps.py trains through shmps.torch: several layer kinds (a convolution, a
batch norm whose running statistics are buffers that stay local, a sparse embedding bag that the
job serves as a table, linear layers), and its deterministic batches."""

import torch
import torch.nn as nn

EMBEDDINGS = 64


class Mixed(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3)
        self.bn = nn.BatchNorm2d(4)
        self.emb = nn.EmbeddingBag(EMBEDDINGS, 8, mode="sum", sparse=True)
        self.fc = nn.Linear(4 * 6 * 6 + 8, 16)
        self.out = nn.Linear(16, 3)

    def forward(self, x, ids, offsets):
        h = torch.relu(self.bn(self.conv(x))).flatten(1)
        e = self.emb(ids, offsets)
        return self.out(torch.relu(self.fc(torch.cat([h, e], 1))))


def make_model(seed=0):
    torch.manual_seed(seed)
    return Mixed()


def factory():
    """For `python3 -m shmps.spec torch_ps_model.py:factory`."""
    return make_model(0)


def not_a_module():
    """A factory that returns something else (test_torch_ps.py checks the spec CLI's error)."""
    return {"fc": None}


def batches(seed, count, size=8):
    """`count` batches (x, ids, offsets, y): images, 3 embedding ids per sample (repeats included)."""
    g = torch.Generator().manual_seed(seed)
    for _ in range(count):
        x = torch.randn(size, 1, 8, 8, generator=g)
        ids = torch.randint(0, EMBEDDINGS // 2, (size * 3,), generator=g)  # half the rows stay untouched
        offsets = torch.arange(0, size * 3, 3)
        y = torch.randint(0, 3, (size,), generator=g)
        yield x, ids, offsets, y
