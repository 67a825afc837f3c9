"""The exact-sum pattern of tests/support/pattern.hpp, the same in C++ and Python: small
integers in [-4, 4], so that SGD with lr 1 keeps every float sum exact and the final values must
equal minus the sum of every committed push, element by element."""

import numpy as np

EXACT_SPEC = """slice_bytes = 65536
max_workers = {workers}
{extra}
[optimizer]
kind = "sgd"
lr = 1.0
[[param]]
name = "w"
shape = [3, 40000]
[[param]]
name = "b"
shape = [7]
"""
PATTERN_W, PATTERN_B = 3 * 40000, 7


def pattern(rank, push, first, count):
    element = np.arange(first, first + count, dtype=np.int64)
    return (((rank * 31 + push * 17 + element * 7) % 9) - 4).astype(np.float32)


def plan_push(rank, k, w_size=PATTERN_W, b_size=PATTERN_B):
    if k % 3 == 0:
        return "w", 0, w_size
    if k % 3 == 1:
        return "w", (k * 977 + rank * 131) % (w_size // 2), w_size // 3
    return "b", 0, b_size


def expected_exact_sum(pushes_per_rank):
    """The values after every rank r's first pushes_per_rank[r] pattern pushes: minus their sum."""
    want = {"w": np.zeros(PATTERN_W, np.float64), "b": np.zeros(PATTERN_B, np.float64)}
    for rank, pushes in enumerate(pushes_per_rank):
        for k in range(pushes):
            name, offset, count = plan_push(rank, k)
            want[name][offset:offset + count] -= pattern(rank, k, offset, count)
    return want
