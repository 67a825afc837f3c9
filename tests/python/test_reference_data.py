"""Checks worker/python/shmps/reference.py, the numpy port of the reference workloads, against
docs/workloads.md section 1 and against the C++ trainer.

    /usr/bin/python3 -m pytest tests/python/test_reference_data.py

The module is loaded from the source tree by path, so no build of the shmps extension is needed.
The comparisons with the C++ trainer run build/release/bin/shmps-worker (or $SHMPS_WORKER) and
are skipped when it is not built; those through the example trainer need torch.
"""
from __future__ import annotations

import hashlib
import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[2]
PYDIR = ROOT / "worker" / "python"


def _load(name: str, path: Path):
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod  # dataclasses look their module up there
    spec.loader.exec_module(mod)
    return mod


R = _load("shmps_reference_under_test", PYDIR / "shmps" / "reference.py")

# ---- an independent, plain-Python SplitMix64 (sequential, as docs/workloads.md defines it) ----------

M64 = (1 << 64) - 1


def splitmix_seq(seed: int, count: int) -> list[int]:
    state, out = seed, []
    for _ in range(count):
        state = (state + 0x9E3779B97F4A7C15) & M64
        z = state
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & M64
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & M64
        out.append(z ^ (z >> 31))
    return out


def u24_py(z: int) -> float:
    return float(np.float32(((z >> 40) - 2**23) * 2.0**-23))


def u16_py(z: int) -> float:
    return ((z >> 48) - 2**15) * 2.0**-15


# ---- section 1: the draws and the mappings ---------------------------------------------------

def test_first_draw_of_stream_1():
    assert R.draw(1, 0) == 0x910A2DEC89025CC1
    assert int(R.draws(1, 0, 1)[0]) == 0x910A2DEC89025CC1


@pytest.mark.parametrize("stream", [1, 2, 3, 11, 1000, 2**64 - 5])
def test_draws_equal_the_sequential_stream(stream):
    seq = splitmix_seq(stream, 300)
    assert [int(v) for v in R.draws(stream, 0, 300)] == seq
    # any window, computed directly, across the internal block boundary
    big = R.draws(stream, 65530, 12)
    assert [int(v) for v in big] == [int(R.draws_at(stream, [i])[0]) for i in range(65530, 65542)]
    assert [int(v) for v in R.draws_at(stream, np.array([[7, 0], [299, 3]]).reshape(-1))] == \
        [seq[7], seq[0], seq[299], seq[3]]


def test_u24_u16_are_exact():
    z = R.draws(5, 0, 2000)
    f = R.u24(z)
    assert f.dtype == np.float32
    assert [float(v) for v in f] == [u24_py(int(v)) for v in z]
    assert f.min() >= -1.0 and f.max() < 1.0
    d = R.u16(z)
    assert d.dtype == np.float64
    assert [float(v) for v in d] == [u16_py(int(v)) for v in z]
    # the ends of the ranges
    ends = np.array([0, M64], dtype=np.uint64)
    assert R.u24(ends).tolist() == [-1.0, 1.0 - 2.0**-23]
    assert R.u16(ends).tolist() == [-1.0, 1.0 - 2.0**-15]


def test_rows_are_the_readme_definition():
    # X[n, d] = u24(draw n*784 + d of stream 1), for a few rows, from the sequential stream
    seq = splitmix_seq(1, 3 * 784)
    x = R.features_range(0, 3)
    assert x.dtype == np.float32 and x.shape == (3, 784) and x.flags.c_contiguous
    assert x.reshape(-1).tolist() == [u24_py(z) for z in seq]
    # row 12345 alone, by range and by index, and one of its labels by hand
    n = 12345
    xr = R.features_range(n, 1)
    assert np.array_equal(R.features([n]), xr)
    t = np.array([u16_py(z) for z in splitmix_seq(2, 7840)]).reshape(784, 10)
    assert np.array_equal(R.teacher(), t)
    e = np.array([u16_py(int(z)) for z in R.draws_at(3, [n * 10 + k for k in range(10)])])
    clean = [sum(float(xr[0, d]) * t[d, k] for d in range(784)) for k in range(10)]
    score = [c + 8.0 * e[k] for k, c in enumerate(clean)]
    assert int(R.labels([n], xr)[0]) == score.index(max(score))


def test_gathered_rows_equal_ranges():
    rows = np.array([199999, 0, 7, 200000, 123456, 7], dtype=np.int64)
    x = R.features(rows)
    y, t = R.labels(rows, x, with_teacher=True)
    assert y.dtype == np.int64
    for i, n in enumerate(rows):
        xr = R.features_range(int(n), 1)
        assert np.array_equal(x[i:i + 1], xr)
        yr, tr = R.labels_range(int(n), xr, with_teacher=True)
        assert (y[i], t[i]) == (yr[0], tr[0])
    # rows() and chunks() agree, whatever the chunk
    xa, ya = R.rows(1000, 700, chunk=256)
    got = list(R.chunks(1000, 700, chunk=300))
    assert [g[0] for g in got] == [1000, 1300, 1600]
    assert np.array_equal(np.concatenate([g[1] for g in got]), xa)
    assert np.array_equal(np.concatenate([g[2] for g in got]), ya)


# ---- section 1: the data set fingerprints ----------------------------------------------------

def test_training_set_fingerprints():
    """sha256 of X and y, label histogram and teacher agreement over all 200,000 rows (a few
    seconds: the rows are generated in chunks, never all in memory)."""
    hx, hy = hashlib.sha256(), hashlib.sha256()
    hist = np.zeros(10, dtype=np.int64)
    agree = 0
    for _, x, y, teacher in R.chunks(0, R.TRAIN_ROWS, 8192, with_teacher=True):
        hx.update(x.astype("<f4", copy=False).tobytes())
        hy.update(y.astype("<i8", copy=False).tobytes())
        hist += np.bincount(y, minlength=10)
        agree += int(np.count_nonzero(y == teacher))
    assert hx.hexdigest()[:16] == "1eb002bc9907fb76"
    assert hy.hexdigest()[:16] == "ab2c5ec595b6e2b1"
    assert hist.tolist() == [19287, 20133, 20611, 20436, 19002, 19388, 20835, 20509, 20509, 19290]
    assert round(agree / R.TRAIN_ROWS, 4) == 0.6342


def test_test_set_teacher_agreement():
    agree = 0
    for _, _, y, teacher in R.chunks(R.TEST_FIRST_ROW, R.TEST_ROWS, 8192, with_teacher=True):
        agree += int(np.count_nonzero(y == teacher))
    assert round(agree / R.TEST_ROWS, 4) == 0.6409


# ---- the epoch shuffle and the schedule ------------------------------------------------------

@pytest.mark.parametrize("epoch,n", [(0, 1500), (7, 1500), (1, 200000)])
def test_epoch_order_is_the_stable_argsort_of_the_keys(epoch, n):
    order = R.epoch_order(epoch, n)
    keys = [int(k) for k in R.draws(1000 + epoch, 0, n)]
    expect = sorted(range(n), key=lambda i: (keys[i], i))  # Python ints: unsigned, exact
    assert order.tolist() == expect


def test_schedule_reference_run():  # the C++ test_synthetic_data's Schedule cases
    s = R.Schedule()
    assert (s.per_epoch(), s.total_global_batches(), s.epochs(), s.worker_total_batches()) == (3125, 6250, 2, 6250)
    assert list(s.worker_batches(1)) == list(range(3125))
    assert len(s.worker_batches(2)) == 0
    for p in (2, 3, 5):
        taken = [0] * 3125
        total = 0
        for r in range(p):
            s = R.Schedule(workers=p, rank=r)
            for j in s.worker_batches(0):
                assert j % p == r
                taken[j] += 1
            total += s.worker_total_batches()
        assert taken == [1] * 3125 and total == 6250
    assert R.Schedule(workers=2, rank=0).worker_batch_count(0) == 1563
    assert R.Schedule(workers=2, rank=1).worker_batch_count(0) == 1562
    with pytest.raises(ValueError):
        R.Schedule(workers=2, rank=2)


def test_schedule_partial_epochs_and_short_batches():
    order = R.epoch_order(0, 1000)
    assert R.batches_per_epoch(1000, 64) == 16
    assert R.global_batch(order, 64, 0).tolist() == order[:64].tolist()
    assert R.global_batch(order, 64, 15).tolist() == order[960:].tolist()  # the short last one
    with pytest.raises(IndexError):
        R.global_batch(order, 64, 16)
    s = R.Schedule(samples=250000)  # one epoch, then 50000 samples = 782 full batches
    assert (s.total_global_batches(), s.epochs()) == (3125 + 782, 2)
    assert (s.global_batches_in_epoch(0), s.global_batches_in_epoch(1)) == (3125, 782)
    s = R.Schedule(samples=250000, workers=2, rank=1)
    assert s.worker_batch_count(1) == 391 and s.worker_batches(1)[-1] == 781


def test_schedule_batches_and_resume():
    s = R.Schedule(n=1000, batch=64, samples=2500, workers=3, rank=1)
    every = list(s.batches())
    assert len(every) == s.worker_total_batches()
    assert [(e, j) for e, _, j, _ in every] == [(e, j) for e in range(s.epochs()) for j in s.worker_batches(e)]
    for e, k, j, rows in every:
        assert k == list(s.worker_batches(e)).index(j) + 1
        assert rows.tolist() == R.global_batch(R.epoch_order(e, 1000), 64, j).tolist()
    for start in (0, 1, 5, 6, len(every) - 1, len(every)):
        assert [(e, j) for e, _, j, _ in s.batches(start)] == [(e, j) for e, _, j, _ in every[start:]]
    assert R.Schedule(samples=20000, workers=2, rank=1).worker_total_batches() == 156  # of 313


def test_cursor_bytes_are_shmps_workers():
    s = R.Schedule(samples=400000, batch=64, workers=2, rank=1)
    b = R.cursor_bytes(s, 17)
    # struct Cursor in worker/trainer/main.cpp: six uint64, the magic first (its comment says
    # "MCURSNR1", but 0x3152534e5255434d is stored as the bytes "MCURNSR1")
    assert len(b) == 48 and b[:8] == b"MCURNSR1"
    assert np.frombuffer(b, dtype="<u8").tolist() == [0x3152534E5255434D, 400000, 64, 2, 1, 17]
    assert R.resume_cursor(b, s, 1) == 17
    assert R.resume_cursor(b"", s, 1) == 0
    with pytest.raises(R.CursorError, match="not shmps-worker's"):
        R.resume_cursor(b[:40], s, 1)
    with pytest.raises(R.CursorError, match="not shmps-worker's"):
        R.resume_cursor(b"X" + b[1:], s, 1)
    with pytest.raises(R.CursorError, match=r"slot 1 was training another schedule \(--samples 400000 --batch 64 "
                                            r"--workers 2\)"):
        R.resume_cursor(b, R.Schedule(samples=400000, batch=32, workers=2, rank=1), 1)


def test_reference_init():
    p = R.reference_init()
    assert [(k, v.shape, v.dtype) for k, v in p.items()] == [(k, s, np.float32) for k, s in R.PARAMS]
    w1 = [u24_py(z) for z in splitmix_seq(11, 1000)]
    assert p["fc1.weight"].reshape(-1)[:1000].tolist() == [float(np.float32(v) * np.float32(1 / 28)) for v in w1]
    w2 = [u24_py(z) for z in splitmix_seq(12, 2560)]
    assert p["fc2.weight"].reshape(-1).tolist() == [float(np.float32(v) * np.float32(1 / 16)) for v in w2]
    assert not p["fc1.bias"].any() and not p["fc2.bias"].any()
    # What `shmps-worker --evaluate` prints for a fresh `shmps-server --spec models/mlp.toml`,
    # whose u24 initialisers are the same: pins reference_init and weights_hash to the C++ ones.
    assert R.weights_hash(p) == 0x66391D18026FF338


# ---- against the C++ trainer -----------------------------------------------------------------

def _cpp_worker() -> Path:
    path = Path(os.environ.get("SHMPS_WORKER")
                or Path(os.environ.get("SHMPS_BIN_DIR", ROOT / "build" / "release" / "bin")) / "shmps-worker")
    if not path.exists():
        pytest.skip(f"{path} is not built (cmake --build build/release, or set SHMPS_WORKER)")
    return path


def _run(cmd) -> str:
    r = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, f"{cmd} failed:\n{r.stdout}\n{r.stderr}"
    return r.stdout


def _final(out: str) -> dict:
    m = re.search(r"^trained (\d+) batches, (\d+) samples", out, re.M)
    r = re.search(r"^running train loss ([\d.]+) acc ([\d.]+) \(this worker's last epoch, (\d+) samples\)", out, re.M)
    assert m and r, out
    return {"batches": int(m[1]), "samples": int(m[2]), "loss": float(r[1]), "acc": float(r[2]), "seen": int(r[3])}


def _initial_model_last_epoch(s, rank: int) -> list[tuple[float, int, int]]:
    """(loss sum, correct, rows) of the reference initial model on each of worker `rank`'s
    batches of the last epoch of schedule s, in training order: what shmps-worker --local
    accumulates into its running figures when its learning rate is too small to move the weights."""
    sched = R.Schedule(n=s.n, batch=s.batch, samples=s.samples, workers=s.workers, rank=rank)
    e = sched.epochs() - 1
    order = R.epoch_order(e)
    p = R.reference_init()
    out = []
    for j in sched.worker_batches(e):
        r = R.global_batch(order, sched.batch, j)
        x = R.features(r)
        loss, c = R.batch_loss(R.logits(p, x), R.labels(r, x))
        out.append((float(loss.sum()), c, len(r)))
    return out


def _running(per_batch, k=None) -> tuple[float, float, int]:
    """Mean loss, accuracy and rows over the first k batches (all if k is None)."""
    part = per_batch[:k]
    rows = sum(b[2] for b in part)
    return sum(b[0] for b in part) / rows, sum(b[1] for b in part) / rows, rows


def _progress(out: str) -> list[tuple[int, int, int, int, float, float]]:
    """The trainer's progress lines: (epoch, epochs, k, batches in the epoch, loss, acc)."""
    return [(int(m[1]), int(m[2]), int(m[3]), int(m[4]), float(m[5]), float(m[6])) for m in
            re.finditer(r"^epoch (\d+)/(\d+) batch (\d+)/(\d+) +\d+% loss ([\d.]+) acc ([\d.]+) ", out, re.M)]


# A tiny learning rate leaves the weights (not the zero biases, by 1e-30) where they started, so
# the running loss and accuracy of the C++ trainer are those of the initial model on exactly the
# batches its schedule gave this worker; a different batch order would show in the 4 decimals.
SCHEDULES = [
    # crosses into a partial second epoch: 47 global batches there, rank 2 of 3 takes 15
    dict(samples=203000, batch=64, workers=3, rank=2),
    # a short last batch (200000 = 153 * 1300 + 1100, global batch 153), taken by rank 9 of 16
    dict(samples=200000, batch=1300, workers=16, rank=9),
]


@pytest.mark.parametrize("cfg", SCHEDULES, ids=["partial-epoch", "short-batch"])
def test_schedule_matches_the_cpp_trainer(cfg):
    worker = _cpp_worker()
    stdout = _run([worker, "--local", "--lr", "1e-30", "--eval-rows", "1", "--samples", cfg["samples"],
                   "--batch", cfg["batch"], "--workers", cfg["workers"], "--rank", cfg["rank"]])
    out = _final(stdout)
    s = R.Schedule(samples=cfg["samples"], batch=cfg["batch"], workers=cfg["workers"], rank=cfg["rank"])
    batches = list(s.batches())
    assert out["batches"] == len(batches) == s.worker_total_batches()
    assert out["samples"] == sum(len(b[3]) for b in batches)
    per_batch = _initial_model_last_epoch(s, cfg["rank"])
    loss, acc, seen = _running(per_batch)
    assert out["seen"] == seen
    assert abs(out["loss"] - loss) < 1.5e-4, (out, loss)
    assert abs(out["acc"] - acc) < 1.0 / seen + 5e-5, (out, acc)
    # The progress lines of the last epoch give the running figures after batch k (3 decimals):
    # they depend on the order of the batches, not only on which ones.
    lines = [p for p in _progress(stdout) if p[0] == p[1] == s.epochs()]
    assert lines and lines[-1][2] == lines[-1][3] == len(per_batch), stdout
    for _, _, k, _, line_loss, line_acc in lines:
        loss_k, acc_k, seen_k = _running(per_batch, k)
        assert abs(line_loss - loss_k) < 6e-4 and abs(line_acc - acc_k) < 1.0 / seen_k + 6e-4, (k, stdout)
    # The check can fail: the neighbouring rank's batches give other figures.
    other_loss, other_acc, other_seen = _running(_initial_model_last_epoch(s, (cfg["rank"] + 1) % cfg["workers"]))
    assert abs(out["loss"] - other_loss) > 1.5e-4 or abs(out["acc"] - other_acc) > 1.0 / other_seen + 5e-5


def test_example_local_run_matches_the_cpp_trainer():
    """train_mlp_torch.py --local and shmps-worker --local, 20,000 samples at the reference
    learning rate: the same batches and the same model up to float rounding."""
    pytest.importorskip("torch")
    worker = _cpp_worker()
    args = ["--local", "--samples", "20000", "--batch", "64", "--workers", "2", "--rank", "1", "--eval-rows", "5000"]
    cpp = _run([worker, *args])
    py = _run([sys.executable, PYDIR / "examples" / "train_mlp_torch.py", *args])
    a, b = _final(cpp), _final(py)
    assert (a["batches"], a["samples"], a["seen"]) == (b["batches"], b["samples"], b["seen"]) == (156, 9984, 9984)
    assert abs(a["loss"] - b["loss"]) < 1e-3 and abs(a["acc"] - b["acc"]) < 3e-3, (cpp, py)

    def evals(out):
        return {m[1]: (float(m[2]), float(m[3])) for m in
                re.finditer(r"^(train|test) loss ([\d.]+) acc ([\d.]+) \(rows \d+\.\.\d+\)$", out, re.M)}

    ea, eb = evals(cpp), evals(py)
    assert set(ea) == set(eb) == {"train", "test"}
    for k in ea:
        assert abs(ea[k][0] - eb[k][0]) < 1e-3 and abs(ea[k][1] - eb[k][1]) < 3e-3, (cpp, py)
    assert re.search(r"^weights-hash 0x[0-9a-f]{16}$", py, re.M)
