"""The sparse click-through workload from Python: shmps.ctr (the data of docs/workloads.md
section 4 in numpy) against the definition and its fingerprints, the table bindings
(Worker.pull_rows / push_rows) against a real shmps-server, and the PyTorch example
worker/python/examples/ctr_torch.py.

The data tests load shmps/ctr.py from the source tree by path: they need numpy only. The table
tests need the built extension; those with PyTorch are skipped where python3-torch is missing.
"""
from __future__ import annotations

import importlib.util
import re
import sys
from pathlib import Path

import numpy as np
import pytest

from conftest import PYTHON, SOURCE_DIR

PYDIR = SOURCE_DIR / "worker" / "python"
EXAMPLE = PYDIR / "examples" / "ctr_torch.py"
CTR_SPEC = SOURCE_DIR / "models" / "ctr.toml"


def _load(name: str, path: Path):
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod  # dataclasses look their module up there
    spec.loader.exec_module(mod)
    return mod


C = _load("shmps_ctr_under_test", PYDIR / "shmps" / "ctr.py")

try:
    import shmps
    HAVE_TABLES = hasattr(shmps.Worker, "pull_rows")
except ImportError:
    shmps, HAVE_TABLES = None, False
needs_tables = pytest.mark.skipif(not HAVE_TABLES, reason="the shmps extension with pull_rows is not built")

try:
    import torch
except ImportError:
    torch = None
needs_torch = pytest.mark.skipif(torch is None, reason="python3-torch is not installed (apt-get install python3-torch)")

# ---- an independent, plain-Python definition (docs/workloads.md section 4) -------------------

M64 = (1 << 64) - 1
GAMMA = 0x9E3779B97F4A7C15


def draw(stream: int, i: int) -> int:
    z = (stream + (i + 1) * GAMMA) & M64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & M64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & M64
    return z ^ (z >> 31)


def row_id(n: int, f: int) -> int:
    z = draw(20, n * 8 + f)
    e = (z >> 32) % 20
    return (1 << e) - 1 + ((z & 0xFFFFFFFF) & ((1 << e) - 1))


def u16_py(z: int) -> float:
    return ((z >> 48) - 2**15) * 2.0**-15


def u24_py(z: int) -> float:
    return float(np.float32(((z >> 40) - 2**23) * 2.0**-23))


def label(n: int) -> int:
    clean = sum(u16_py(draw(21, row_id(n, f))) for f in range(8))
    return 1 if clean + 0.5 * u16_py(draw(23, n)) > 0 else 0


# ---- the data --------------------------------------------------------------------------------

def test_ids_labels_and_init_are_the_definition():
    some = [0, 1, 2, 255, 256, 65535, 65536, 3999999, 10000000, 10099999]
    ids, y = C.samples_of(some)
    assert ids.dtype == np.int64 and ids.shape == (len(some), 8) and y.dtype == np.float32
    assert ids.tolist() == [[row_id(n, f) for f in range(8)] for n in some]
    assert y.tolist() == [label(n) for n in some]
    # by range, across the internal chunk boundary, and by index agree
    r_ids, r_y = C.samples(65530, 12)
    g_ids, g_y = C.samples_of(range(65530, 65542))
    assert np.array_equal(r_ids, g_ids) and np.array_equal(r_y, g_y)
    assert np.array_equal(C.ids_range(65530, 12), C.ids_of(np.arange(65530, 65542)))
    assert C.teacher().shape == (C.ROWS,) and C.teacher()[5] == u16_py(draw(21, 5))
    # initial values: emb[r, d] = u24(draw r*16 + d of stream 24) / 64, head = u24(stream 25) / 4
    rows = [0, 1, 777, C.ROWS - 1]
    assert C.emb_init_rows(rows).tolist() == [[u24_py(draw(24, r * 16 + d)) / 64 for d in range(16)] for r in rows]
    head = C.head_init()
    assert head["head.weight"].shape == (1, 16) and head["head.bias"].tolist() == [0.0]
    assert head["head.weight"][0].tolist() == [u24_py(draw(25, d)) / 4 for d in range(16)]


def test_ids_stay_in_range_and_row_zero_is_hot():
    ids = C.ids_range(0, 100000)
    assert ids.min() == 0 and ids.max() <= C.ROWS - 2
    share0 = np.count_nonzero(ids == 0) / ids.size
    assert 0.045 < share0 < 0.055  # band 0 (row 0 alone) takes 1/20 of the draws


def test_fingerprints_of_the_first_million_training_samples():
    fp = C.fingerprints(0, 1_000_000)
    assert round(fp.positive_share, 4) == 0.4275
    assert round(fp.teacher_agreement, 4) == 0.9425
    assert fp.distinct_rows == 740840
    assert 1300 < fp.batch_distinct_rows < 1450, fp  # "about 1,350"


def test_schedule_splits_the_batches_and_keeps_the_trainers_cursor():
    sched = C.schedule(workers=2, rank=1)
    assert sched.worker_total_batches() == 15625 // 2
    first = list(zip(range(3), C.batches(sched)))
    assert [b[1][2:] for b in first] == [(1, 256, 256), (3, 768, 256), (5, 1280, 256)]
    resumed = next(C.batches(sched, start_batch=2))
    assert resumed[2] == 5
    cursor = C.cursor_bytes(sched, 7)
    assert len(cursor) == 48 and C.resume_cursor(cursor, sched, 1) == 7
    with pytest.raises(C.CursorError):
        C.resume_cursor(cursor, C.schedule(workers=3, rank=1), 1)


def test_numpy_evaluation_of_the_initial_model_is_chance():
    ids, y = C.samples(C.TEST_FIRST_ROW, 20000)
    uniq, inv = np.unique(ids, return_inverse=True)
    head = C.head_init()
    r = C.evaluate_on(C.emb_init_rows(uniq), inv.reshape(ids.shape), y, head["head.weight"], head["head.bias"])
    assert r.rows == 20000 and 0.45 < r.accuracy < 0.6 and abs(r.loss - np.log(2)) < 0.01


# ---- the table bindings against a server -----------------------------------------------------

TABLE_SPEC = """slice_bytes = 1024
max_workers = 4
[optimizer]
kind = "sgd"
lr = 1.0
[[param]]
name = "b"
shape = [7]
[[table]]
name = "t"
rows = 1000
dim = 16
init = "zeros"
[[table]]
name = "u"
rows = 300
dim = 16
init = { kind = "u24", stream = 24, scale_divisor = 64 }
"""


@needs_tables
def test_params_describe_tables(make_job):
    job = make_job(TABLE_SPEC, tag="ctr")
    with shmps.Worker(job.name, rank=0) as w:
        p = {q.name: q for q in w.params()}
        assert (p["t"].is_table, p["t"].rows, p["t"].dim, p["t"].shape, p["t"].size) == (True, 1000, 16, (1000, 16), 16000)
        assert (p["b"].is_table, p["b"].rows, p["b"].dim) == (False, 0, 0)
        assert "table" in repr(p["t"]) and "table" not in repr(p["b"])


@needs_tables
def test_pull_rows_gives_the_server_init(make_job):
    job = make_job(TABLE_SPEC, tag="ctr")
    with shmps.Worker(job.name, rank=0) as w:
        ids = np.array([0, 299, 5, 5, 17], np.int64)
        rows, version = w.pull_rows("u", ids)
        assert rows.shape == (5, 16) and rows.dtype == np.float32 and version == 0
        # the same formula as the click-through table's init, row by row
        np.testing.assert_array_equal(rows, C.emb_init_rows(ids))


@needs_tables
def test_push_rows_round_trip_sums_repeated_ids_exactly(make_job):
    job = make_job(TABLE_SPEC, tag="ctr")
    with shmps.Worker(job.name, rank=0) as w:
        ids = np.array([3, 5, 3, 999, 0, 3], np.int64)
        grads = np.random.default_rng(7).integers(-4, 5, size=(6, 16)).astype(np.float32)
        seq = w.push_rows("t", ids, grads)
        assert seq == 1
        w.wait_applied(seq)
        want = np.zeros((1000, 16), np.float32)
        np.subtract.at(want, ids, grads)  # SGD, lr 1, small integers: exact
        probe = np.array([0, 1, 3, 5, 999, 998], np.uint64)  # uint64 ids read in place too
        got, version = w.pull_rows("t", probe)
        np.testing.assert_array_equal(got, want[probe.astype(np.int64)])
        assert version >= 1
        # a flat gradient of len(ids) * dim elements, and out= filled in place
        w.wait_applied(w.push_rows("t", np.array([998], np.uint64), np.full(16, 2.0, np.float32)))
        out = np.full((2, 16), 99.0, np.float32)
        address = out.__array_interface__["data"][0]
        got, _ = w.pull_rows("t", np.array([998, 3]), out=out)
        assert got is out and out.__array_interface__["data"][0] == address
        np.testing.assert_array_equal(out, [np.full(16, -2.0), want[3]])
        # pull_all gives a table whole, (rows, dim)
        everything = w.pull_all()
        assert everything["t"].shape == (1000, 16)
        want[998] = -2.0
        np.testing.assert_array_equal(everything["t"], want)


@needs_tables
def test_bad_inputs_raise_and_change_nothing(make_job):
    job = make_job(TABLE_SPEC, tag="ctr")
    with shmps.Worker(job.name, rank=0) as w:
        ids = np.array([1, 2], np.int64)
        g = np.ones((2, 16), np.float32)
        cases = [
            (lambda: w.push_rows("t", np.array([1, 1000]), g), "1000"),  # out of range
            (lambda: w.pull_rows("t", np.array([1000])), "1000"),
            (lambda: w.push_rows("t", np.array([1, -3]), g), "negative"),
            (lambda: w.pull_rows("t", np.array([-1])), "negative"),
            (lambda: w.push_rows("t", ids, np.ones((2, 15), np.float32)), "16"),  # row width
            (lambda: w.push_rows("t", ids, np.ones((2, 32), np.float32)), "16"),
            (lambda: w.push_rows("t", ids, np.ones(33, np.float32)), "16"),
            (lambda: w.pull_rows("t", ids, out=np.empty((3, 16), np.float32)), "out"),
            (lambda: w.push("t", np.ones(16000, np.float32)), "table"),  # a table's name to push/pull
            (lambda: w.pull("t"), "table"),
            (lambda: w.push_rows("b", ids, g), "dense"),  # a dense name to push_rows/pull_rows
            (lambda: w.pull_rows("b", ids), "dense"),
            (lambda: w.push_rows("t", ids, np.array([[np.nan] * 16, [0] * 16], np.float32)), ""),
            (lambda: w.push_rows("t", ids, np.array([[np.inf] * 16, [0] * 16], np.float32)), ""),
            (lambda: w.push_rows("t", ids.astype(np.int32), g), "int64"),  # dtype, layout, type
            (lambda: w.push_rows("t", ids.astype(np.float64), g), "int64"),
            (lambda: w.push_rows("t", np.arange(4, dtype=np.int64)[::2], g), "contiguous"),
            (lambda: w.push_rows("t", [1, 2], g), "int64"),
            (lambda: w.push_rows("t", ids, g.astype(np.float64)), "float32"),
            (lambda: w.push_rows("nope", ids, g), "nope"),
        ]
        for call, words in cases:
            with pytest.raises(shmps.Error, match=words):
                call()
        assert w.published() == 0
        rows, version = w.pull_rows("t", np.arange(1000))
        assert not rows.any() and version == 0


@needs_tables
@needs_torch
def test_a_sparse_embedding_bag_gradient_is_pushed_as_it_is(make_job):
    job = make_job(TABLE_SPEC, tag="ctr")
    with shmps.Worker(job.name, rank=0) as w:
        emb = torch.nn.EmbeddingBag(1000, 16, mode="sum", sparse=True)
        with torch.no_grad():
            emb.weight.zero_()
        ids = torch.tensor([[3, 7, 3], [999, 0, 7], [3, 3, 3]])
        coeff = torch.arange(-8, 8, dtype=torch.float32)  # integer gradients: exact sums
        (emb(ids) * coeff).sum().backward()
        g = emb.weight.grad
        assert not g.is_coalesced()  # the raw gradient has one row per occurrence
        dense = g.to_dense().numpy().copy()
        c = g.coalesce()
        # as it is: int64 indices()[0] (a contiguous row of a (1, n) tensor) and values() (n, 16)
        assert c.indices()[0].is_contiguous() and c.values().shape == (4, 16)
        w.wait_applied(w.push_rows("t", c.indices()[0], c.values()))
        got, _ = w.pull_rows("t", np.arange(1000))
        np.testing.assert_array_equal(got, -dense)
        # uncoalesced too (the server sums repeated ids), and indices() of shape (1, n) whole
        w.wait_applied(w.push_rows("t", g._indices(), g._values()))
        got, _ = w.pull_rows("t", torch.arange(1000))  # torch ids
        np.testing.assert_array_equal(got, -2 * dense)


# ---- the PyTorch example ---------------------------------------------------------------------

def ctr_spec_text():
    """models/ctr.toml without its name (the test's Job gives each segment its own)."""
    return re.sub(r'(?m)^name = "ctr"\n', "", CTR_SPEC.read_text())


def accuracy(out):
    m = re.search(r"test loss [0-9.]+ acc ([0-9.]+)", out)
    assert m, out
    return float(m.group(1))


@needs_torch
def test_example_checks_the_data_and_trains_locally(make_job, tmp_path):
    job = make_job("", start=False, tag="ctr")  # only for its process handling and cleanup
    p = job.start([PYTHON, EXAMPLE, "--check-data"])
    assert p.wait(60) == 0, p.output()
    assert "fingerprints match" in p.output()
    p = job.start([PYTHON, EXAMPLE, "--local", "--samples", "200000"])
    assert p.wait(60) == 0, p.output()
    out = p.output()
    assert "trained 782 batches, 200192 samples" in out, out
    assert accuracy(out) > 0.7, out  # untrained: about 0.53; 4M samples reach about 0.845


@needs_tables
@needs_torch
def test_example_as_two_shmps_workers_compact_and_sparse(make_job):
    job = make_job(ctr_spec_text(), tag="ctr")
    args = ["--samples", "204800", "--workers", "2"]
    w0 = job.python(EXAMPLE, "--rank", "0", "--grad", "compact", *args)
    w1 = job.python(EXAMPLE, "--rank", "1", "--grad", "sparse", *args)
    assert w1.wait(120) == 0, w1.output()
    assert w0.wait(120) == 0, w0.output()
    assert "trained 400 batches, 102400 samples" in w0.output(), w0.output()
    assert "trained 400 batches, 102400 samples" in w1.output(), w1.output()
    assert accuracy(w0.output()) > 0.7, w0.output()
    # the job's model evaluated by a separate process, as shmps-launch --after would
    e = job.python(EXAMPLE, "--evaluate", env={"SHMPS_RANK": "0"})
    assert e.wait(60) == 0, e.output()
    assert accuracy(e.output()) > 0.7, e.output()


def read_f32_tensors(path):
    """{name: array} of a safetensors file's F32 tensors, read with struct, json and numpy only
    (a checkpoint also holds integer tensors of the job's state, which are not needed here)."""
    import json
    import struct
    data = Path(path).read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8:8 + n])
    out = {}
    for name, t in header.items():
        if name != "__metadata__" and t["dtype"] == "F32":
            begin, end = t["data_offsets"]
            out[name] = np.frombuffer(data[8 + n + begin:8 + n + end], dtype="<f4").reshape(t["shape"]).copy()
    return out


@needs_tables
@needs_torch
def test_a_checkpoint_of_the_table_loads_into_the_pytorch_module(make_job, tmp_path):
    """Trained through shmps, checkpointed live (shmps-ctl checkpoint), read back with a plain
    safetensors reader: the file's `emb` [2^20, 16] and the head load into the example's module
    (nn.EmbeddingBag + nn.Linear) with load_state_dict(strict=True), equal the job's values bit
    for bit, and the module scores the test samples as the job's own evaluation does."""
    import subprocess

    from conftest import BIN_DIR

    example = _load("ctr_torch_under_test", EXAMPLE)
    job = make_job(ctr_spec_text(), tag="ctr")
    trainer = job.python(EXAMPLE, "--rank", "0", "--samples", "102400", "--workers", "1", "--no-eval")
    assert trainer.wait(120) == 0, trainer.output()
    path = tmp_path / "ctr.safetensors"
    made = subprocess.run([BIN_DIR / "shmps-ctl", "checkpoint", job.name, path], capture_output=True, text=True)
    assert made.returncode == 0, made.stdout + made.stderr
    tensors = read_f32_tensors(path)
    assert tensors["emb"].shape == (1 << 20, 16)
    model = example.CTR()
    model.load_state_dict({"emb.weight": torch.from_numpy(tensors["emb"]),
                           "head.weight": torch.from_numpy(tensors["head.weight"]),
                           "head.bias": torch.from_numpy(tensors["head.bias"])}, strict=True)
    with shmps.Worker(job.name, rank=1) as w:
        rows, _ = w.pull_rows("emb", np.arange(1 << 20, dtype=np.uint64))
        head, _ = w.pull("head.weight")
    np.testing.assert_array_equal(model.emb.weight.detach().numpy(), rows)
    np.testing.assert_array_equal(model.head.weight.detach().numpy(), head)
    assert not np.array_equal(rows, C.reference_init()["emb"]), "the table was trained"
    # The module's logits on test samples: the bag sum and the head, as the data module computes them.
    ids = C.ids_range(C.TEST_FIRST_ROW, 64)
    with torch.no_grad():
        got = model(torch.from_numpy(ids)).numpy()
    want = C.logits(rows, ids, head, tensors["head.bias"])
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


KEYED_SPEC = """
max_workers = 4
slice_bytes = 1024
[optimizer]
kind = "sgd"
lr = 1.0
[[param]]
name = "b"
shape = [4]
[[table]]
name = "k"
rows = 64
dim = 16
keys = "u64"
init = { kind = "constant", value = 0.5 }
"""


@needs_tables
def test_a_keyed_table_takes_any_64_bit_key_as_int64_bits_or_uint64(make_job):
    """keys = "u64": int64 ids are keys by their bits (negative ones too, as torch's hashed
    ids are), uint64 ids the same keys; a key reads as its init until pushed, then init minus
    its sum; pull_all leaves the table out (it has no whole, only keys)."""
    job = make_job(KEYED_SPEC, tag="ctr")
    with shmps.Worker(job.name, rank=0) as w:
        p = {q.name: q for q in w.params()}
        assert p["k"].keyed and p["k"].is_table and p["k"].rows == 64
        assert not p["b"].keyed
        keys = np.array([-1, 1 << 62, -(1 << 63), 7, -1], np.int64)
        rows, _ = w.pull_rows("k", keys)
        np.testing.assert_array_equal(rows, np.full((5, 16), 0.5, np.float32))
        grads = np.arange(5 * 16, dtype=np.float32).reshape(5, 16) % 5
        w.wait_applied(w.push_rows("k", keys, grads))
        as_unsigned = keys.view(np.uint64)
        got, _ = w.pull_rows("k", as_unsigned)
        want = np.full((5, 16), 0.5, np.float32) - grads
        want[0] = want[4] = 0.5 - grads[0] - grads[4]  # key -1 twice: summed
        np.testing.assert_array_equal(got, want)
        assert "k" not in w.pull_all() and "b" in w.pull_all()
        with pytest.raises(shmps.Error, match="keys = \"u64\""):
            w.put("k", np.zeros(64 * 16, np.float32))
