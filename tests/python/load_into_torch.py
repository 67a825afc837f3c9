#!/usr/bin/env python3
"""Loads a `shmps-ctl export` of the reference MLP into the equivalent PyTorch module.

    load_into_torch.py FILE [--expect-test-loss L --expect-test-acc A]

The module is the one docs/workloads.md section 2 describes: 784-256-10, Linear,
ReLU, Linear, nn.Linear layout and names (fc1.weight, fc1.bias, fc2.weight, fc2.bias). Checks:
  - the file's tensors load with load_state_dict(strict=True): same names, same shapes, none
    missing, none extra (tensors named with a '/' or starting with '__', which checkpoints may
    add for optimizer state, are left out first);
  - the module's parameters then equal the file's arrays bit for bit;
  - a forward pass on 8 rows of the reference test set is finite, [8, 10], and agrees with the
    same computation done in numpy on the file's arrays;
  - with --expect-test-*: the module's softmax cross-entropy and accuracy on the whole reference
    test set (rows 200000..219999, generated here from the SplitMix64 definition of
    docs/workloads.md section 1) match what the trainer (shmps-worker) printed for the same
    weights.

Exit 0 with a one-line summary; 1 with "FAIL: ..." on any mismatch; 77 with "SKIP: ..." when
torch (or numpy) is not installed. The safetensors reading is done here with struct, json and
numpy only (Debian's python3-torch 1.13 has no safetensors package).
"""
import argparse
import json
import struct
import sys

SKIP = 77


def read_safetensors(path):
    """(metadata, {name: numpy array}) of a safetensors file. Only F32 is needed here."""
    import numpy as np
    with open(path, "rb") as f:
        data = f.read()
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8:8 + n])
    arrays = {}
    for name, t in header.items():
        if name == "__metadata__":
            continue
        if t["dtype"] != "F32":
            raise ValueError(f"{name}: dtype {t['dtype']}, expected F32")
        begin, end = t["data_offsets"]
        arrays[name] = np.frombuffer(data[8 + n + begin:8 + n + end], dtype="<f4").reshape(t["shape"]).copy()
    return header.get("__metadata__", {}), arrays


# ---- the reference data (docs/workloads.md section 1), for the test-set check ----------------------------

GOLDEN = 0x9E3779B97F4A7C15
D, K = 784, 10
TEST_FIRST, TEST_ROWS = 200000, 20000


def draws(np, stream, first, count):
    """Draws first..first+count-1 of SplitMix64 stream `stream`, as uint64 (wrapping arithmetic)."""
    i = np.arange(first + 1, first + count + 1, dtype=np.uint64)
    z = np.uint64(stream) + i * np.uint64(GOLDEN)
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return z ^ (z >> np.uint64(31))


def u24(np, z):
    return ((z >> np.uint64(40)).astype(np.int64) - 2**23).astype(np.float32) * np.float32(2.0**-23)


def u16(np, z):
    return ((z >> np.uint64(48)).astype(np.int64) - 2**15).astype(np.float64) * 2.0**-15


def test_set(np, rows):
    """(X float32 [rows, 784], y int64 [rows], agreement of y with the noise-free teacher)."""
    x = u24(np, draws(np, 1, TEST_FIRST * D, rows * D)).reshape(rows, D)
    teacher = u16(np, draws(np, 2, 0, D * K)).reshape(D, K)
    noise = u16(np, draws(np, 3, TEST_FIRST * K, rows * K)).reshape(rows, K)
    clean = x.astype(np.float64) @ teacher  # exact in float64 whatever the order (docs/workloads.md)
    y = np.argmax(clean + 8.0 * noise, axis=1)  # the first maximum on ties
    return x, y, float(np.mean(y == np.argmax(clean, axis=1)))


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("file")
    ap.add_argument("--expect-test-loss", type=float)
    ap.add_argument("--expect-test-acc", type=float)
    args = ap.parse_args()
    try:
        import numpy as np
        import torch
    except ImportError:
        print("SKIP: python3-torch is not installed (apt-get install python3-torch to run this test)")
        return SKIP

    class MLP(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.fc1 = torch.nn.Linear(784, 256)
            self.fc2 = torch.nn.Linear(256, 10)

        def forward(self, x):
            return self.fc2(torch.relu(self.fc1(x)))

    def fail(why):
        print(f"FAIL: {why}")
        return 1

    metadata, arrays = read_safetensors(args.file)
    weights = {k: v for k, v in arrays.items() if "/" not in k and not k.startswith("__")}
    model = MLP()
    try:
        model.load_state_dict({k: torch.from_numpy(v) for k, v in weights.items()}, strict=True)
    except RuntimeError as e:
        return fail(f"load_state_dict(strict=True) refused {args.file}: {e}")
    for name, p in model.state_dict().items():
        got = p.detach().numpy()
        if got.dtype != np.float32 or not np.array_equal(got.view(np.uint32), weights[name].view(np.uint32)):
            return fail(f"{name} in the module differs from the file")

    # A forward pass on 8 rows of the test set, checked against numpy on the file's arrays.
    x8, _, _ = test_set(np, 8)
    model.eval()
    with torch.no_grad():
        out = model(torch.from_numpy(x8)).numpy()
    if out.shape != (8, 10):
        return fail(f"forward pass gave shape {out.shape}, expected (8, 10)")
    if not np.all(np.isfinite(out)):
        return fail("forward pass gave non-finite outputs")
    h = np.maximum(x8 @ weights["fc1.weight"].T + weights["fc1.bias"], 0)
    ref = h @ weights["fc2.weight"].T + weights["fc2.bias"]
    if not np.allclose(out, ref, rtol=1e-4, atol=1e-4):
        return fail(f"forward pass differs from numpy: max |diff| {np.max(np.abs(out - ref))}")
    summary = (f"OK: {len(weights)} tensors ({sum(v.size for v in weights.values())} floats) of {args.file} "
               f"loaded strictly into torch {torch.__version__} nn.Linear 784-256-10, bit-exact; "
               f"forward [8, 10] finite and equal to numpy")

    if args.expect_test_loss is not None or args.expect_test_acc is not None:
        x, y, agreement = test_set(np, TEST_ROWS)
        if round(agreement, 4) != 0.6409:  # docs/workloads.md's fingerprint of the test set
            return fail(f"the test set generated here is not the reference one (teacher agreement {agreement:.4f})")
        with torch.no_grad():
            logits = model(torch.from_numpy(x))
            loss = torch.nn.functional.cross_entropy(logits.double(), torch.from_numpy(y)).item()
            acc = (logits.argmax(dim=1).numpy() == y).mean()
        # The trainer prints 4 decimals and sums in another order: a few rows may flip on a tie.
        if args.expect_test_loss is not None and abs(loss - args.expect_test_loss) > 1e-3:
            return fail(f"test loss in torch {loss:.6f}, the trainer said {args.expect_test_loss:.4f}")
        if args.expect_test_acc is not None and abs(acc - args.expect_test_acc) > 5e-4:
            return fail(f"test accuracy in torch {acc:.6f}, the trainer said {args.expect_test_acc:.4f}")
        summary += (f"; test loss {loss:.6f} acc {acc:.6f} (rows {TEST_FIRST}..{TEST_FIRST + TEST_ROWS - 1}), the trainer "
                    f"said {args.expect_test_loss} and {args.expect_test_acc}")
    segment = metadata.get("shmps.segment")
    print(summary + (f" (segment {segment})" if segment else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
