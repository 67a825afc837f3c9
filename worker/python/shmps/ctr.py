"""The sparse click-through workload of shmps in numpy: its data, initial model and fingerprints.

A port of worker/trainer/ctr_data.{hpp,cpp} (docs/workloads.md section 4), with the SplitMix64
streams and the u24/u16 mappings of shmps.reference:

    z        = draw n*8 + f of stream 20;  e = (z >> 32) mod 20;  m = (z & 0xFFFFFFFF) & (2^e - 1)
    id[n, f] = 2^e - 1 + m                                  int64, in [0, 2^20 - 2]
    T[r]     = u16(draw r of stream 21)                     teacher, float64 [2^20]
    E[n]     = u16(draw n of stream 23)                     noise, float64
    clean[n] = sum_f T[id[n, f]]                            exact in float64, in any order
    y[n]     = 1 if clean[n] + 0.5 E[n] > 0 else 0

Training rows 0..3,999,999 in order (no shuffle), global batch j = rows j*256 .. j*256+255;
worker r of P takes the batches j = r (mod P). Test rows 10,000,000..10,099,999.

The model: a table emb [2^20, 16] whose 8 rows of a sample are summed (an embedding bag), a head
head.weight [1, 16] and head.bias [1], binary cross-entropy with logits averaged over the batch:

    emb[r, d]         = u24(draw r*16 + d of stream 24) * float32(1/64)
    head.weight[0, d] = u24(draw d of stream 25) * float32(1/4);   head.bias = 0

The parameters have the names of models/ctr.toml ("emb", "head.weight", "head.bias"); PyTorch's
module (nn.EmbeddingBag "emb", nn.Linear "head") calls the table "emb.weight": TORCH_NAMES maps
one to the other.

This module needs numpy only (no torch, no compiled shmps extension).
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from typing import Iterator

import numpy as np

try:  # inside the package
    from .reference import (CursorError, Schedule, cursor_bytes, draws, draws_at,  # noqa: F401
                            resume_cursor, u16, u24)
except ImportError:  # loaded on its own from a path (importlib), next to reference.py
    import importlib.util as _ilu
    import sys as _sys
    from pathlib import Path as _Path
    _ref = _sys.modules.get("shmps_reference")
    if _ref is None:
        _spec = _ilu.spec_from_file_location("shmps_reference", _Path(__file__).with_name("reference.py"))
        _ref = _ilu.module_from_spec(_spec)
        _sys.modules[_spec.name] = _ref
        _spec.loader.exec_module(_ref)
    CursorError, Schedule, cursor_bytes, resume_cursor = _ref.CursorError, _ref.Schedule, _ref.cursor_bytes, _ref.resume_cursor
    draws, draws_at, u16, u24 = _ref.draws, _ref.draws_at, _ref.u16, _ref.u24

# ---- constants (worker/trainer/ctr_data.hpp, ctr.hpp, models/ctr.toml) ---------------------

ROWS = 1 << 20  # R: rows of the table
DIM = 16  # D: floats per row
FIELDS = 8  # F: ids per sample
BATCH = 256  # B
TRAIN_ROWS = 4_000_000
TEST_FIRST_ROW = 10_000_000
TEST_ROWS = 100_000

ID_STREAM = 20
TEACHER_STREAM = 21
NOISE_STREAM = 23
EMB_STREAM = 24
HEAD_STREAM = 25
ID_BANDS = 20
NOISE_SCALE = 0.5
LR = 1.0  # the reference run's SGD learning rate, for every parameter

# The parameters as the shmps spec names them, with their shapes; "emb" is a table.
EMB, HEAD_WEIGHT, HEAD_BIAS = "emb", "head.weight", "head.bias"
PARAMS: tuple[tuple[str, tuple[int, ...]], ...] = (
    (HEAD_WEIGHT, (1, DIM)),
    (HEAD_BIAS, (1,)),
    (EMB, (ROWS, DIM)),
)
# shmps name -> PyTorch state_dict name (nn.EmbeddingBag "emb", nn.Linear "head"), and back.
TORCH_NAMES = {EMB: "emb.weight", HEAD_WEIGHT: "head.weight", HEAD_BIAS: "head.bias"}
SHMPS_NAMES = {v: k for k, v in TORCH_NAMES.items()}

# Samples generated at a time by the range functions (about 10 MiB of temporaries).
_CHUNK = 1 << 16

_S32 = np.uint64(32)
_LOW32 = np.uint64(0xFFFFFFFF)
_ONE = np.uint64(1)


# ---- the data --------------------------------------------------------------------------------

def rows_of_draws(z: np.ndarray) -> np.ndarray:
    """The table row of each draw z of stream 20 (uint64, any shape): int64 ids, same shape.
    Band e = (z >> 32) mod 20 takes 1/20 of the draws and spreads them over its 2^e rows."""
    z = np.asarray(z, dtype=np.uint64)
    band = np.left_shift(_ONE, (z >> _S32) % np.uint64(ID_BANDS))
    band -= _ONE  # 2^e - 1
    m = z & _LOW32
    m &= band
    m += band
    return m.view(np.int64)  # below 2^20: the same value as int64


def ids_range(first: int, count: int) -> np.ndarray:
    """id[n, f] of the consecutive samples first .. first+count-1: int64 [count, 8]."""
    out = np.empty((count, FIELDS), dtype=np.int64)
    for done in range(0, count, _CHUNK):
        n = min(_CHUNK, count - done)
        out[done:done + n] = rows_of_draws(draws(ID_STREAM, (first + done) * FIELDS, n * FIELDS)).reshape(n, FIELDS)
    return out


def ids_of(samples) -> np.ndarray:
    """id[n, f] of the samples `samples` (any sequence of sample numbers): int64 [len, 8]."""
    n = np.asarray(samples, dtype=np.uint64).reshape(-1)
    idx = n[:, None] * np.uint64(FIELDS) + np.arange(FIELDS, dtype=np.uint64)[None, :]
    return rows_of_draws(draws_at(ID_STREAM, idx))


@lru_cache(maxsize=1)
def teacher() -> np.ndarray:
    """T[r] = u16(draw r of stream 21): float64 [2^20] (8 MiB, read-only, computed once)."""
    t = u16(draws(TEACHER_STREAM, 0, ROWS))
    t.flags.writeable = False
    return t


def noise_range(first: int, count: int) -> np.ndarray:
    """E[n] of the samples first .. first+count-1: float64 [count]."""
    return u16(draws(NOISE_STREAM, first, count))


def clean(ids: np.ndarray) -> np.ndarray:
    """clean[n] = sum_f T[id[n, f]] of samples whose ids are `ids` [count, 8]: float64 [count].
    Every T is a multiple of 2^-15 in [-1, 1), so the sum is exact in any order."""
    return teacher()[ids].sum(axis=1)


def labels_range(first: int, ids: np.ndarray, with_teacher: bool = False):
    """y (float32 0/1, as the loss takes it) of the consecutive samples first .. first+len(ids)-1
    whose ids are `ids` (as ids_range gave them). With with_teacher, returns (y, teacher_labels),
    the latter the noise-free (clean > 0) as float32 too."""
    c = clean(ids)
    y = (c + NOISE_SCALE * noise_range(first, len(ids)) > 0).astype(np.float32)
    if with_teacher:
        return y, (c > 0).astype(np.float32)
    return y


def samples(first: int, count: int) -> tuple[np.ndarray, np.ndarray]:
    """(ids int64 [count, 8], y float32 [count]) of the samples first .. first+count-1."""
    ids = ids_range(first, count)
    return ids, labels_range(first, ids)


def samples_of(rows) -> tuple[np.ndarray, np.ndarray]:
    """(ids int64 [len, 8], y float32 [len]) of the samples `rows` (any sequence of sample
    numbers, e.g. several batches of one worker)."""
    n = np.asarray(rows, dtype=np.uint64).reshape(-1)
    ids = ids_of(n)
    y = (clean(ids) + NOISE_SCALE * u16(draws_at(NOISE_STREAM, n)) > 0).astype(np.float32)
    return ids, y


def chunks(first: int, count: int, chunk: int = _CHUNK) -> Iterator[tuple[int, np.ndarray, np.ndarray]]:
    """Yields (n0, ids, y) for the samples first .. first+count-1, `chunk` at a time."""
    if chunk <= 0:
        raise ValueError("chunks: chunk must be positive")
    for done in range(0, count, chunk):
        n = min(chunk, count - done)
        yield (first + done,) + samples(first + done, n)


def test_set() -> tuple[np.ndarray, np.ndarray]:
    """(ids, y) of the 100,000 test samples."""
    return samples(TEST_FIRST_ROW, TEST_ROWS)


# ---- the schedule ----------------------------------------------------------------------------

def schedule(samples: int = TRAIN_ROWS, workers: int = 1, rank: int = 0, batch: int = BATCH) -> Schedule:
    """The reference schedule (shmps.reference.Schedule, as the C++ trainer's data::Schedule)
    over the 4,000,000 training samples, whose passes visit them in order: global batch j of a
    pass is the samples j*batch .. min((j+1)*batch, 4,000,000) - 1, worker r of P takes j = r
    (mod P). More samples than the training set make further passes. Its resume cursor is
    shmps.reference.cursor_bytes(sched, batches_done)."""
    return Schedule(n=TRAIN_ROWS, batch=batch, samples=samples, workers=workers, rank=rank)


def batch_range(sched: Schedule, j: int) -> tuple[int, int]:
    """(first sample, count) of global batch j of a pass."""
    first = j * sched.batch
    if j < 0 or first >= sched.n:
        raise IndexError("batch_range: batch index past the training set")
    return first, min(sched.batch, sched.n - first)


def batches(sched: Schedule, start_batch: int = 0) -> Iterator[tuple[int, int, int, int, int]]:
    """This worker's batches in training order, as (epoch, k, j, first, count): k is the batch's
    1-based position among the worker's batches of that pass, j its global index, first and
    count its samples. The first `start_batch` batches are skipped (a resume)."""
    done = 0
    for e in range(sched.epochs()):
        for k, j in enumerate(sched.worker_batches(e), 1):
            done += 1
            if done <= start_batch:
                continue
            yield (e, k, j) + batch_range(sched, j)


# ---- the model -------------------------------------------------------------------------------

def emb_init_rows(ids) -> np.ndarray:
    """The initial rows emb[ids] (any int sequence): float32 [len, 16], computed directly."""
    r = np.asarray(ids, dtype=np.uint64).reshape(-1)
    idx = r[:, None] * np.uint64(DIM) + np.arange(DIM, dtype=np.uint64)[None, :]
    e = u24(draws_at(EMB_STREAM, idx))
    e *= np.float32(1.0 / 64.0)  # a power of two: exact
    return e


def emb_init() -> np.ndarray:
    """The initial table emb [2^20, 16] float32 (64 MiB, a new array)."""
    e = u24(draws(EMB_STREAM, 0, ROWS * DIM)).reshape(ROWS, DIM)
    e *= np.float32(1.0 / 64.0)
    return e


def head_init() -> dict[str, np.ndarray]:
    w = u24(draws(HEAD_STREAM, 0, DIM)).reshape(1, DIM)
    w *= np.float32(1.0 / 4.0)
    return {HEAD_WEIGHT: w, HEAD_BIAS: np.zeros(1, dtype=np.float32)}


def reference_init() -> dict[str, np.ndarray]:
    """The initial model, {shmps name: float32 array}: head.weight, head.bias and emb (64 MiB)."""
    return {**head_init(), EMB: emb_init()}


def logits(emb_rows: np.ndarray, ids: np.ndarray, head_weight: np.ndarray, head_bias: np.ndarray) -> np.ndarray:
    """The model's logits (float32 [n]) of samples whose ids [n, 8] index `emb_rows` (the whole
    table, or a block of rows the ids were remapped to)."""
    bag = emb_rows[ids].sum(axis=1, dtype=np.float32)  # [n, 16]
    return bag @ np.asarray(head_weight, np.float32).reshape(DIM) + np.float32(np.asarray(head_bias).reshape(-1)[0])


def bce_with_logits(z: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Per-sample binary cross-entropy with logits (float64), the stable form."""
    z = z.astype(np.float64)
    return np.maximum(z, 0) - z * y + np.log1p(np.exp(-np.abs(z)))


@dataclass
class EvalResult:
    loss: float  # mean binary cross-entropy
    accuracy: float  # share of samples with (logit > 0) == y
    rows: int


def evaluate_on(emb_rows: np.ndarray, ids: np.ndarray, y: np.ndarray, head_weight, head_bias,
                chunk: int = _CHUNK) -> EvalResult:
    """Loss and accuracy on the samples (ids, y): ids index emb_rows (see logits)."""
    loss_sum, correct = 0.0, 0
    for b in range(0, len(ids), chunk):
        z = logits(emb_rows, ids[b:b + chunk], head_weight, head_bias)
        yy = y[b:b + chunk]
        loss_sum += float(bce_with_logits(z, yy).sum())
        correct += int(np.count_nonzero((z > 0) == (yy > 0.5)))
    n = len(ids)
    return EvalResult(loss_sum / n if n else 0.0, correct / n if n else 0.0, n)


def evaluate(params: dict[str, np.ndarray], first: int = TEST_FIRST_ROW, count: int = TEST_ROWS) -> EvalResult:
    """Loss and accuracy of the model {shmps name: array} (emb the whole table) on the samples
    first .. first+count-1 (default: the test set)."""
    ids, y = samples(first, count)
    return evaluate_on(params[EMB], ids, y, params[HEAD_WEIGHT], params[HEAD_BIAS])


# ---- fingerprints (docs/workloads.md section 4) -----------------------------------------------

@dataclass
class Fingerprints:
    samples: int
    positive_share: float  # share of y = 1 (0.4275 over the first 1,000,000 training rows)
    teacher_agreement: float  # share of y == (clean > 0) (0.9425)
    distinct_rows: int  # rows of the table the samples touch (740,840)
    batch_distinct_rows: float  # mean distinct rows in a batch of 256 (about 1,350)


def distinct_per_batch(ids: np.ndarray, batch: int = BATCH) -> np.ndarray:
    """Distinct rows of each batch of `batch` samples of ids [count, 8] (count a multiple of
    batch): int64 [count / batch]."""
    s = np.sort(ids.reshape(-1, batch * FIELDS), axis=1)
    return 1 + np.count_nonzero(s[:, 1:] != s[:, :-1], axis=1)


def fingerprints(first: int = 0, count: int = 1_000_000, batch: int = BATCH) -> Fingerprints:
    """The fingerprints over the samples first .. first+count-1 (about 2 s for 1,000,000)."""
    touched = np.zeros(ROWS, dtype=bool)
    positive = agree = 0
    per_batch_sum, batches_seen = 0, 0
    chunk = max(batch, (_CHUNK // batch) * batch)  # whole batches
    for n0, ids, y in chunks(first, count, chunk):
        t = (clean(ids) > 0).astype(np.float32)
        positive += int(np.count_nonzero(y))
        agree += int(np.count_nonzero(y == t))
        touched[ids.reshape(-1)] = True
        whole = (len(ids) // batch) * batch
        if whole:
            d = distinct_per_batch(ids[:whole], batch)
            per_batch_sum += int(d.sum())
            batches_seen += len(d)
    return Fingerprints(count, positive / count if count else 0.0, agree / count if count else 0.0,
                        int(np.count_nonzero(touched)), per_batch_sum / batches_seen if batches_seen else 0.0)
