"""The reference workloads of shmps in numpy: the synthetic data, its epoch schedule and the MLP.

A bit-exact port of worker/trainer/synthetic_data.{hpp,cpp} and the parts of
worker/trainer/{mlp,main}.cpp a Python worker needs to share a job with `shmps-worker`
(docs/workloads.md sections 1 and 2):

    X[n, d] = u24(draw n*784 + d of stream 1)                      float32, row-major
    T[d, k] = u16(draw d*10 + k of stream 2)                       teacher, float64
    E[n, k] = u16(draw n*10 + k of stream 3)                       noise, float64
    y[n]    = first argmax_k  sum_d X[n,d] T[d,k] + 8 E[n,k]       int64 (exact in float64)

Draw i of SplitMix64 stream s is mix(s + (i+1) * gamma), so every draw is computed directly,
vectorised with wrapping numpy uint64 arithmetic; nothing is stored on disk. Rows are generated
a chunk at a time (`chunks`), so the whole data set never has to be in memory.

The schedule is the C++ trainer's `data::Schedule`: epoch e is the stable argsort of draw i of
stream 1000 + e (i < n), global batch j of an epoch is order[j*B, (j+1)*B), and worker r of P
takes the global batches j = r (mod P). The resume cursor (`cursor_bytes`, `resume_cursor`) has
the same bytes as shmps-worker's, so a slot's resume state means the same in either language.

This module needs numpy only (no torch, no compiled shmps extension).
"""
from __future__ import annotations

import struct
from dataclasses import dataclass
from functools import lru_cache
from typing import Iterator

import numpy as np

# ---- constants (synthetic_data.hpp, mlp.hpp) -------------------------------------------------

FEATURES = 784
CLASSES = 10
TRAIN_ROWS = 200000
TEST_FIRST_ROW = 200000
TEST_ROWS = 20000

FEATURE_STREAM = 1
TEACHER_STREAM = 2
NOISE_STREAM = 3
EPOCH_STREAM_BASE = 1000
NOISE_SCALE = 8.0

HIDDEN = 256

# name, shape (the nn.Linear layout, weight[out, in]), in the order used everywhere: pull/push,
# the weights hash, checkpoints. The same shapes as models/mlp.toml.
PARAMS: tuple[tuple[str, tuple[int, ...]], ...] = (
    ("fc1.weight", (HIDDEN, FEATURES)),
    ("fc1.bias", (HIDDEN,)),
    ("fc2.weight", (CLASSES, HIDDEN)),
    ("fc2.bias", (CLASSES,)),
)

# ---- SplitMix64 (shm/include/shmps/splitmix.hpp) ---------------------------------------------

GAMMA = 0x9E3779B97F4A7C15
_GAMMA = np.uint64(GAMMA)
_M1 = np.uint64(0xBF58476D1CE4E5B9)
_M2 = np.uint64(0x94D049BB133111EB)
_S30, _S27, _S31 = np.uint64(30), np.uint64(27), np.uint64(31)
_S40, _S48 = np.uint64(40), np.uint64(48)

# Work is done in blocks of this many draws, so the temporaries of one block stay in the cache
# (about 3 x 512 KiB); the per-call overhead of numpy is negligible at this size.
_BLOCK = 1 << 16


def _mix_inplace(z: np.ndarray, tmp: np.ndarray) -> np.ndarray:
    """The SplitMix64 output function on every element of the uint64 array z, in place."""
    np.right_shift(z, _S30, out=tmp)
    z ^= tmp
    z *= _M1  # wraps mod 2^64 (numpy does not check array integer overflow)
    np.right_shift(z, _S27, out=tmp)
    z ^= tmp
    z *= _M2
    np.right_shift(z, _S31, out=tmp)
    z ^= tmp
    return z


def mix(z) -> np.ndarray:
    """splitmix_mix applied to a state value or an array of them (a new uint64 array)."""
    z = np.array(z, dtype=np.uint64, copy=True, ndmin=1)
    return _mix_inplace(z, np.empty_like(z))


def draws(stream: int, first: int, count: int) -> np.ndarray:
    """Draws first .. first+count-1 of stream `stream`, as uint64."""
    out = np.empty(count, dtype=np.uint64)
    step = np.arange(min(count, _BLOCK), dtype=np.uint64) * _GAMMA
    tmp = np.empty(len(step), dtype=np.uint64)
    for b in range(0, count, _BLOCK):
        n = min(_BLOCK, count - b)
        z = out[b:b + n]
        # state of draw i: stream + (i + 1) * gamma, i = first + b + (0 .. n-1)
        np.add(step[:n], np.uint64((stream + (first + b + 1) * GAMMA) % 2**64), out=z)
        _mix_inplace(z, tmp[:n])
    return out


def draws_at(stream: int, indices) -> np.ndarray:
    """The draws number `indices` (any shape of non-negative integers) of stream `stream`."""
    i = np.asarray(indices, dtype=np.uint64)
    z = (i + np.uint64(1)) * _GAMMA + np.uint64(stream)
    return _mix_inplace(z, np.empty_like(z))


def draw(stream: int, i: int) -> int:
    """Draw i of stream `stream` as a Python int (splitmix_draw)."""
    return int(draws(stream, i, 1)[0])


def u24(z: np.ndarray) -> np.ndarray:
    """float32 (int64(z >> 40) - 2^23) * 2^-23, in [-1, 1). Exact: z >> 40 < 2^24 converts to
    float32 without rounding, and the subtraction and the power-of-two scale are exact too."""
    f = (z >> _S40).astype(np.float32)
    f -= np.float32(1 << 23)
    f *= np.float32(2.0 ** -23)
    return f


def u16(z: np.ndarray) -> np.ndarray:
    """float64 (int64(z >> 48) - 2^15) * 2^-15, in [-1, 1). Exact."""
    f = (z >> _S48).astype(np.float64)
    f -= 2.0 ** 15
    f *= 2.0 ** -15
    return f


# ---- the data --------------------------------------------------------------------------------

@lru_cache(maxsize=1)
def teacher() -> np.ndarray:
    """T[d, k] = u16(draw d*10 + k of stream 2), float64 [784, 10] (read-only)."""
    t = u16(draws(TEACHER_STREAM, 0, FEATURES * CLASSES)).reshape(FEATURES, CLASSES)
    t.flags.writeable = False
    return t


def features_range(first: int, count: int, out: np.ndarray | None = None) -> np.ndarray:
    """X of the consecutive rows first .. first+count-1: float32 [count, 784]."""
    if out is None:
        out = np.empty((count, FEATURES), dtype=np.float32)
    if out.shape != (count, FEATURES) or out.dtype != np.float32 or not out.flags.c_contiguous:
        raise ValueError("features_range: out must be a C-contiguous float32 array [count, 784]")
    flat = out.reshape(-1)  # a view, since out is C-contiguous
    total = count * FEATURES
    step = np.arange(min(total, _BLOCK), dtype=np.uint64) * _GAMMA
    z = np.empty(len(step), dtype=np.uint64)
    tmp = np.empty(len(step), dtype=np.uint64)
    base = first * FEATURES
    for b in range(0, total, _BLOCK):
        n = min(_BLOCK, total - b)
        np.add(step[:n], np.uint64((FEATURE_STREAM + (base + b + 1) * GAMMA) % 2**64), out=z[:n])
        _mix_inplace(z[:n], tmp[:n])
        flat[b:b + n] = u24(z[:n])
    return out


@lru_cache(maxsize=1)
def _feature_offsets() -> np.ndarray:
    return np.arange(FEATURES, dtype=np.uint64)


def features(rows, out: np.ndarray | None = None) -> np.ndarray:
    """X of the rows `rows` (a sequence of row numbers, e.g. one batch): float32 [len, 784]."""
    r = np.asarray(rows, dtype=np.uint64).reshape(-1)
    idx = r[:, None] * np.uint64(FEATURES) + _feature_offsets()[None, :]
    x = u24(draws_at(FEATURE_STREAM, idx))
    if out is None:
        return x
    out[...] = x
    return out


def labels(rows, x: np.ndarray, with_teacher: bool = False):
    """y (int64) of the rows `rows` whose features are x [len, 784] (as `features` gave them).
    With with_teacher, returns (y, teacher_labels), the latter the noise-free argmax_k clean."""
    r = np.asarray(rows, dtype=np.uint64).reshape(-1)
    if x.shape != (len(r), FEATURES):
        raise ValueError(f"labels: features must be [{len(r)}, {FEATURES}], got {list(x.shape)}")
    # Every product X*T is a multiple of 2^-38 and every partial sum stays below 2^10, so the
    # float64 matrix product is exact whatever order (or FMA) the BLAS uses.
    clean = x.astype(np.float64) @ teacher()
    idx = r[:, None] * np.uint64(CLASSES) + np.arange(CLASSES, dtype=np.uint64)[None, :]
    score = clean + NOISE_SCALE * u16(draws_at(NOISE_STREAM, idx))
    y = np.argmax(score, axis=1).astype(np.int64)  # the first maximum, as the C++ strict '>'
    if with_teacher:
        return y, np.argmax(clean, axis=1).astype(np.int64)
    return y


def labels_range(first: int, x: np.ndarray, with_teacher: bool = False):
    """`labels` for the consecutive rows first .. first+len(x)-1."""
    return labels(np.arange(first, first + len(x), dtype=np.uint64), x, with_teacher)


def chunks(first: int, count: int, chunk: int = 8192, with_teacher: bool = False) -> Iterator[tuple]:
    """Yields (row0, X, y) — or (row0, X, y, teacher_labels) — for the rows first ..
    first+count-1, `chunk` rows at a time (fresh arrays each time)."""
    if chunk <= 0:
        raise ValueError("chunks: chunk must be positive")
    for done in range(0, count, chunk):
        n = min(chunk, count - done)
        x = features_range(first + done, n)
        lab = labels_range(first + done, x, with_teacher)
        yield (first + done, x) + (lab if with_teacher else (lab,))


def rows(first: int, count: int, chunk: int = 8192) -> tuple[np.ndarray, np.ndarray]:
    """(X float32 [count, 784], y int64 [count]) of the rows first .. first+count-1, generated
    `chunk` rows at a time (the temporaries stay small; X itself is 3136 bytes a row)."""
    x = np.empty((count, FEATURES), dtype=np.float32)
    y = np.empty(count, dtype=np.int64)
    for done in range(0, count, chunk):
        n = min(chunk, count - done)
        features_range(first + done, n, x[done:done + n])
        y[done:done + n] = labels_range(first + done, x[done:done + n])
    return x, y


def train_set(chunk: int = 8192):
    return rows(0, TRAIN_ROWS, chunk)


def test_set(chunk: int = 8192):
    return rows(TEST_FIRST_ROW, TEST_ROWS, chunk)


# ---- the epoch schedule (data::Schedule) -----------------------------------------------------

def epoch_order(epoch: int, n: int = TRAIN_ROWS) -> np.ndarray:
    """The order of epoch e over the rows 0..n-1 (int64): the stable argsort of draw i of stream
    1000 + e, i < n (unsigned comparison, ties by increasing i)."""
    keys = draws(EPOCH_STREAM_BASE + epoch, 0, n)
    return np.argsort(keys, kind="stable")


def batches_per_epoch(n: int, batch: int) -> int:
    """Global batches per epoch: ceil(n / batch) (the last one may be short)."""
    if batch <= 0:
        raise ValueError("batch size must be positive")
    return (n + batch - 1) // batch


def global_batch(order: np.ndarray, batch: int, j: int) -> np.ndarray:
    """Global batch j of an epoch: order[j*batch, min((j+1)*batch, n)) (a view)."""
    begin = j * batch
    if batch <= 0 or begin >= len(order) or j < 0:
        raise IndexError("global_batch: batch index past the epoch")
    return order[begin:begin + batch]


@dataclass(frozen=True)
class Schedule:
    """The reference schedule: `samples` samples drawn epoch after epoch in batches of `batch`
    rows. A partial last epoch is cut after ceil(rest / batch) global batches, all of them full
    unless they reach the end of the epoch (so the run may train up to batch-1 samples more than
    `samples`). Worker `rank` of `workers` takes the global batches j = rank (mod workers) of
    every epoch, j counted within the epoch."""

    n: int = TRAIN_ROWS
    batch: int = 64
    samples: int = 400000
    workers: int = 1
    rank: int = 0

    def __post_init__(self):
        if self.batch <= 0:
            raise ValueError("batch size must be positive")
        if self.n <= 0:
            raise ValueError("schedule: empty data set")
        if self.workers <= 0 or not 0 <= self.rank < self.workers:
            raise ValueError("schedule: rank must be below workers")

    def per_epoch(self) -> int:
        return batches_per_epoch(self.n, self.batch)

    def total_global_batches(self) -> int:
        """Full epochs, then ceil(rest / batch)."""
        full, rest = divmod(self.samples, self.n)
        return full * self.per_epoch() + (rest + self.batch - 1) // self.batch

    def epochs(self) -> int:
        """Epochs touched: ceil(total_global_batches / per_epoch)."""
        per = self.per_epoch()
        return (self.total_global_batches() + per - 1) // per

    def global_batches_in_epoch(self, epoch: int) -> int:
        per = self.per_epoch()
        first = epoch * per
        total = self.total_global_batches()
        return 0 if first >= total else min(per, total - first)

    def worker_batches(self, epoch: int) -> range:
        """The batch indices j of epoch e this worker takes, in order."""
        return range(self.rank, self.global_batches_in_epoch(epoch), self.workers)

    def worker_batch_count(self, epoch: int) -> int:
        return len(self.worker_batches(epoch))

    def worker_total_batches(self) -> int:
        return sum(self.worker_batch_count(e) for e in range(self.epochs()))

    def batches(self, start_batch: int = 0) -> Iterator[tuple[int, int, int, np.ndarray]]:
        """This worker's batches in training order, as (epoch, k, j, rows): k is the batch's
        1-based position within the worker's batches of that epoch, j its global index, rows
        the int64 row numbers. The first `start_batch` batches of the run are skipped (a resume),
        and an epoch's order is only computed if one of its batches is left."""
        done = 0
        for e in range(self.epochs()):
            js = self.worker_batches(e)
            if done + len(js) <= start_batch:
                done += len(js)
                continue
            order = epoch_order(e, self.n)
            for k, j in enumerate(js, 1):
                if done < start_batch:
                    done += 1
                    continue
                done += 1
                yield e, k, j, global_batch(order, self.batch, j)


# ---- the resume cursor (worker/trainer/main.cpp, struct Cursor) -------------------------------

CURSOR_MAGIC = 0x3152534E5255434D  # the bytes "MCURNSR1", little-endian (as shmps-worker's)
# Six uint64 in native byte order, as the C++ trainer memcpy's its struct Cursor: magic,
# samples, batch, workers, rank, batches_done (48 bytes).
_CURSOR = struct.Struct("=6Q")
CURSOR_SIZE = _CURSOR.size


class CursorError(ValueError):
    """A slot's resume state that this schedule cannot continue."""


def cursor_bytes(sched: Schedule, batches_done: int) -> bytes:
    """The resume state committed with each step: the schedule and how many of this worker's
    batches are done. Byte for byte what shmps-worker saves."""
    return _CURSOR.pack(CURSOR_MAGIC, sched.samples, sched.batch, sched.workers, sched.rank, batches_done)


def resume_cursor(state: bytes, sched: Schedule, slot: int) -> int:
    """Batches already done by this slot's previous processes (0 for an empty state). A cursor
    of another program or of another schedule raises CursorError (the C++ trainer's messages):
    continuing it would train on the wrong data."""
    if len(state) == 0:
        return 0
    if len(state) != CURSOR_SIZE:
        raise CursorError(f"the resume state of slot {slot} is not shmps-worker's")
    magic, samples, batch, workers, rank, done = _CURSOR.unpack(bytes(state))
    if magic != CURSOR_MAGIC:
        raise CursorError(f"the resume state of slot {slot} is not shmps-worker's")
    if (samples, batch, workers, rank) != (sched.samples, sched.batch, sched.workers, sched.rank):
        raise CursorError(f"slot {slot} was training another schedule (--samples {samples} --batch {batch} "
                          f"--workers {workers}); run with the same options, or use a new segment")
    return done


# ---- the MLP (worker/trainer/mlp.cpp) in numpy ------------------------------------------------

def reference_init() -> dict[str, np.ndarray]:
    """The reference initial model, {name: float32 array} in PARAMS order:
    fc1.weight[o,i] = u24(draw o*784+i of stream 11) * float32(1/28),
    fc2.weight[o,i] = u24(draw o*256+i of stream 12) * float32(1/16), biases zero
    (each product one float32 multiply, rounded to nearest)."""
    def init(stream, shape, scale):
        w = u24(draws(stream, 0, int(np.prod(shape)))).reshape(shape)
        w *= np.float32(scale)  # float32(1.0 / 28.0): the double quotient rounded once
        return w

    return {
        "fc1.weight": init(11, (HIDDEN, FEATURES), 1.0 / 28.0),
        "fc1.bias": np.zeros(HIDDEN, dtype=np.float32),
        "fc2.weight": init(12, (CLASSES, HIDDEN), 1.0 / 16.0),
        "fc2.bias": np.zeros(CLASSES, dtype=np.float32),
    }


def logits(params: dict[str, np.ndarray], x: np.ndarray) -> np.ndarray:
    """fc2(relu(fc1(x))) in float32, [len(x), 10]."""
    h = x @ params["fc1.weight"].T
    h += params["fc1.bias"]
    np.maximum(h, 0, out=h)
    z = h @ params["fc2.weight"].T
    z += params["fc2.bias"]
    return z


def batch_loss(z: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, int]:
    """(per-row softmax cross-entropy as float64, correct count) of the logits z, as mlp.cpp: the
    prediction is the first argmax of the logits, the loss log(sum exp(z - zmax)) + zmax - z[y]."""
    zmax = z.max(axis=1, keepdims=True)
    lse = np.log(np.exp(z - zmax).sum(axis=1, dtype=np.float32))
    loss = lse.astype(np.float64) + zmax[:, 0] - z[np.arange(len(y)), y]
    correct = int(np.count_nonzero(np.argmax(z, axis=1) == y))
    return loss, correct


@dataclass
class EvalResult:
    loss: float  # mean cross-entropy
    accuracy: float  # fraction correct
    rows: int


def evaluate(params: dict[str, np.ndarray], first: int, count: int, chunk: int = 4096) -> EvalResult:
    """Loss and accuracy over the data rows first .. first+count-1 (mlp::evaluate), generated
    `chunk` rows at a time. Float32 like the C++ trainer, in another summation order: the
    figures agree to about 1e-5 (a row whose two best logits tie may flip)."""
    p = {name: np.ascontiguousarray(params[name], dtype=np.float32).reshape(shape) for name, shape in PARAMS}
    loss_sum, correct = 0.0, 0
    for _, x, y in chunks(first, count, chunk):
        loss, c = batch_loss(logits(p, x), y)
        loss_sum += float(loss.sum())
        correct += c
    if count == 0:
        return EvalResult(0.0, 0.0, 0)
    return EvalResult(loss_sum / count, correct / count, count)


def weights_hash(params: dict[str, np.ndarray]) -> int:
    """FNV-1a 64 over the bytes of the four parameters in PARAMS order (mlp::weights_hash), the
    figure shmps-worker prints as weights-hash. Plain Python: about half a second."""
    h = 0xCBF29CE484222325
    prime, mask = 0x100000001B3, 0xFFFFFFFFFFFFFFFF
    for name, _ in PARAMS:
        for byte in np.ascontiguousarray(params[name], dtype="<f4").tobytes():
            h = ((h ^ byte) * prime) & mask
    return h
