"""The Python API of shmps.Worker against a real shmps-server: params, pull and push round trips,
pulls into caller-owned memory, torch tensors, errors, the context manager, the GIL."""

import signal
import threading
import time

import numpy as np
import pytest

import shmps
from exact import EXACT_SPEC, PATTERN_B, PATTERN_W

SPEC = EXACT_SPEC.format(workers=4, extra="")


def test_params_give_names_shapes_and_dtypes(make_job):
    job = make_job(SPEC)
    with shmps.Worker(job.name, rank=0) as w:
        params = w.params()
        assert [p.name for p in params] == ["w", "b"]
        assert [p.shape for p in params] == [(3, 40000), (7,)]
        assert [p.size for p in params] == [PATTERN_W, PATTERN_B]
        assert all(p.dtype == np.float32 for p in params)
        assert "shape=(3, 40000)" in repr(params[0])
        assert (w.rank, w.segment, w.generation, w.consistency) == (0, job.name, 1, "asp")


def test_a_push_comes_back_in_the_next_pull_exactly(make_job):
    job = make_job(SPEC)
    with shmps.Worker(job.name, rank=0) as w:
        before, version = w.pull("w")
        assert before.shape == (3, 40000) and before.dtype == np.float32 and version == 0
        grad = np.random.default_rng(1).integers(-4, 5, size=(3, 40000)).astype(np.float32)
        seq = w.push("w", grad)
        assert seq == 1 and w.published() == 1
        w.wait_applied(seq)
        assert w.applied() == 1
        after, version = w.pull("w")
        assert version == 1
        np.testing.assert_array_equal(after, before - grad)  # SGD, lr 1, small integers: exact


def test_pull_into_out_fills_the_callers_array_without_allocating(make_job):
    job = make_job(SPEC)
    with shmps.Worker(job.name, rank=0) as w:
        w.wait_applied(w.push("b", np.arange(7, dtype=np.float32)))
        out = np.full(7, 99.0, np.float32)
        address = out.__array_interface__["data"][0]
        got, version = w.pull("b", out=out)
        assert got is out and out.__array_interface__["data"][0] == address
        np.testing.assert_array_equal(out, -np.arange(7, dtype=np.float32))
        assert version == 1
        # Any C-contiguous float32 buffer of the right size will do, whatever its shape.
        flat = np.zeros((7, 1), np.float32)
        w.pull("b", out=flat)
        np.testing.assert_array_equal(flat.ravel(), out)


def test_ranges_with_offset(make_job):
    job = make_job(SPEC)
    with shmps.Worker(job.name, rank=0) as w:
        seq = w.push("w", np.ones(5, np.float32), offset=39998)  # crosses a slice boundary
        w.wait_applied(seq)
        part, _ = w.pull("w", offset=39996)
        assert part.shape == (PATTERN_W - 39996,)
        np.testing.assert_array_equal(part[:8], [0, 0, -1, -1, -1, -1, -1, 0])
        window = np.empty(3, np.float32)
        w.pull("w", out=window, offset=39999)
        np.testing.assert_array_equal(window, [-1, -1, -1])


def test_pull_all_gives_every_parameter(make_job):
    job = make_job(SPEC)
    with shmps.Worker(job.name, rank=0) as w:
        w.wait_applied(w.push("b", np.ones(7, np.float32)))
        everything = w.pull_all()
        assert set(everything) == {"w", "b"}
        assert everything["w"].shape == (3, 40000)
        np.testing.assert_array_equal(everything["b"], -np.ones(7, np.float32))


def test_torch_tensors_in_place(make_job):
    torch = pytest.importorskip("torch", reason="python3-torch is not installed")
    job = make_job(SPEC)
    with shmps.Worker(job.name, rank=0) as w:
        param = torch.nn.Parameter(torch.zeros(3, 40000))
        grad = torch.full((3, 40000), 2.0)
        w.wait_applied(w.push("w", grad))
        address = param.data_ptr()
        w.pull("w", out=param)  # into the parameter's own storage, even though it requires grad
        assert param.data_ptr() == address
        assert torch.equal(param.detach(), torch.full((3, 40000), -2.0))
        with pytest.raises(shmps.Error, match="C-contiguous"):
            w.push("w", grad.t().contiguous().t())  # a transposed view is not contiguous


def test_the_context_manager_leaves_and_frees_the_slot(make_job):
    job = make_job(SPEC)
    with shmps.Worker(job.name, rank=1) as w:
        w.push("b", np.ones(7, np.float32))
    with pytest.raises(shmps.Error, match="has left the job"):
        w.pull("b")
    again = shmps.Worker(job.name, rank=1)  # the slot is free again: the same rank attaches
    assert again.generation == 2 and again.published() == 1
    again.leave()
    again.leave()  # idempotent


def test_resume_state_round_trip(make_job):
    job = make_job(SPEC)
    with shmps.Worker(job.name, rank=2) as w:
        assert w.load_state() == b""
        w.save_state(b"cursor=42")
        assert w.clock() == 1 and w.current_clock == 1
        assert w.load_state() == b"cursor=42"
    with shmps.Worker(job.name, rank=2) as w:
        assert w.load_state() == b"cursor=42"  # a later process of the slot sees it
        with pytest.raises(shmps.Error, match="1024"):
            w.save_state(bytes(1025))


@pytest.mark.parametrize("case, message", [
    ("unknown segment", "does not exist"),
    ("unknown parameter", "unknown parameter 'nope'"),
    ("wrong size", "grad has 6 elements, the parameter 7 (7,)"),
    ("wrong dtype", "dtype float32, got format 'd'"),
    ("not contiguous", "C-contiguous"),
    ("read-only out", "must be writeable"),
    ("out of wrong size", "out has 3 elements, the parameter 7 (7,)"),
    ("not an array", "must be a float32 numpy array"),
    ("NaN", "element 3 is NaN; nothing was pushed"),
    ("offset past the end", "offset 8 is past its 7 elements"),
    ("bad timeout", "timeout must be positive"),
])
def test_errors_raise_shmps_error_with_a_clear_message_and_change_nothing(make_job, case, message):
    job = make_job(SPEC)
    with shmps.Worker(job.name, rank=0) as w:
        b = np.ones(7, np.float32)
        nan = b.copy()
        nan[3] = np.nan
        readonly = np.zeros(7, np.float32)
        readonly.flags.writeable = False
        calls = {
            "unknown segment": lambda: shmps.Worker(job.name + "-missing", rank=0),
            "unknown parameter": lambda: w.push("nope", b),
            "wrong size": lambda: w.push("b", b[:6]),
            "wrong dtype": lambda: w.push("b", b.astype(np.float64)),
            "not contiguous": lambda: w.push("b", np.ones(14, np.float32)[::2]),
            "read-only out": lambda: w.pull("b", out=readonly),
            "out of wrong size": lambda: w.pull("b", out=np.zeros(3, np.float32)),
            "not an array": lambda: w.push("b", [1.0] * 7),
            "NaN": lambda: w.push("b", nan),
            "offset past the end": lambda: w.pull("b", offset=8),
            "bad timeout": lambda: shmps.Worker(job.name, rank=1, timeout=0),
        }
        with pytest.raises(shmps.Error, match=None) as raised:
            calls[case]()
        assert message in str(raised.value)
        assert isinstance(raised.value, Exception)
        # Nothing changed: no push was committed, the values are untouched.
        assert w.published() == 0
        values, version = w.pull("b")
        assert version == 0 and not values.any()


def test_the_gil_is_released_while_a_call_waits(make_job):
    """While one thread waits in wait_applied (the server frozen), another keeps running Python."""
    job = make_job(SPEC)
    with shmps.Worker(job.name, rank=0) as w:
        job.server.kill(signal.SIGSTOP)
        try:
            seq = w.push("w", np.ones(PATTERN_W, np.float32))
            counted = [0]
            stop = threading.Event()

            def count():
                while not stop.is_set():
                    counted[0] += 1

            counter = threading.Thread(target=count)
            counter.start()
            threading.Timer(0.5, lambda: job.server.kill(signal.SIGCONT)).start()
            started = time.monotonic()
            w.wait_applied(seq)  # returns once the server runs again
            waited = time.monotonic() - started
            stop.set()
            counter.join()
        finally:
            job.server.kill(signal.SIGCONT)
        assert waited >= 0.4
        # Holding the GIL for the whole wait would leave the counter near zero; released, it counts
        # for the whole half second (hundreds of thousands of turns on any machine).
        assert counted[0] > 10000, counted[0]


def test_threads_sharing_one_worker_are_serialised_and_lose_nothing(make_job):
    job = make_job(SPEC)
    with shmps.Worker(job.name, rank=0) as w:
        grads = [np.full(PATTERN_W, float(t + 1), np.float32) for t in range(4)]
        seqs = []

        def pusher(t):
            for _ in range(25):
                seqs.append(w.push("w", grads[t]))

        threads = [threading.Thread(target=pusher, args=(t,)) for t in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert sorted(seqs) == list(range(1, 101))
        w.wait_applied(100)
        values, version = w.pull("w")
        assert version == 100
        np.testing.assert_array_equal(values.ravel(), np.full(PATTERN_W, -25.0 * (1 + 2 + 3 + 4), np.float32))


def test_wait_for_workers_is_a_start_barrier_and_names_who_is_missing(make_job):
    job = make_job(SPEC)
    with shmps.Worker(job.name, rank=0) as w0:
        w0.wait_for_workers(1, timeout=20.0)  # admitted (a loaded machine's server may take a while)
        with pytest.raises(shmps.Error, match=r"ranks 1, 2, 3 of segment"):
            w0.wait_for_workers(4, timeout=0.3)
        with pytest.raises(shmps.Error, match=r"pass a count from 1 to 4"):
            w0.wait_for_workers(0)
        with pytest.raises(shmps.Error, match=r"timeout must be positive"):
            w0.wait_for_workers(1, timeout=-1.0)
        attached = []
        w0_returned = threading.Event()

        def late():
            time.sleep(0.3)
            with shmps.Worker(job.name, rank=1) as w1:
                attached.append(w1.rank)
                w1.wait_for_workers(2, timeout=20.0)
                w0_returned.wait(20.0)  # stays attached until rank 0 has seen it

        t = threading.Thread(target=late)
        t.start()
        try:
            w0.wait_for_workers(2, timeout=20.0)  # returns once rank 1 is in (the GIL is released meanwhile)
            assert attached == [1], "returned before rank 1 had even attached"
        finally:
            w0_returned.set()
            t.join()


def test_pull_with_min_version_waits_for_the_version_and_times_out_with_its_message(make_job):
    job = make_job(SPEC)
    with shmps.Worker(job.name, rank=0, timeout=0.4) as w:
        with pytest.raises(shmps.Error, match=r"pull of 'b' at version 1: slice 0 of it .* has had 0 updates"):
            w.pull("b", min_version=1)
        done = threading.Event()

        def pusher():
            time.sleep(0.2)
            with shmps.Worker(job.name, rank=1) as p:
                for _ in range(2):
                    p.wait_applied(p.push("b", np.ones(7, np.float32)))
            done.set()

        t = threading.Thread(target=pusher)
        t.start()
        try:
            with shmps.Worker(job.name, rank=2, timeout=20.0) as reader:
                values, version = reader.pull("b", min_version=2)  # the GIL is released while it waits
                assert version >= 2
                np.testing.assert_array_equal(values, np.full(7, -2.0, np.float32))
        finally:
            t.join()
        assert done.is_set()


PUT_SPEC = """max_workers = 3
consistency = "bsp"
[optimizer]
kind = "sgd"
lr = 1.0
[[param]]
name = "fc.weight"
shape = [4, 3]
init = "put"
[[param]]
name = "fc.bias"
shape = [4]
init = "put"
"""


def test_rank_zero_puts_a_freshly_initialised_model_and_the_others_train_on_it(make_job):
    """The PyTorch pattern (DDP broadcasts rank 0's weights): rank 0 puts its module's parameters,
    the other ranks' first pulls wait for them, and every BSP step applies on top of them."""
    job = make_job(PUT_SPEC)
    try:  # a torch module where torch is installed (CPU tensors are put in place), else numpy arrays
        import torch

        torch.manual_seed(7)
        fresh = {"fc." + n: p.detach() for n, p in torch.nn.Linear(3, 4).named_parameters()}
        initial = {n: t.numpy().copy() for n, t in fresh.items()}
    except ImportError:
        rng = np.random.default_rng(7)
        fresh = {"fc.weight": rng.standard_normal((4, 3)).astype(np.float32),
                 "fc.bias": rng.standard_normal(4).astype(np.float32)}
        initial = {n: a.copy() for n, a in fresh.items()}
    errors = []
    final = {}

    def trainer(rank):
        try:
            with shmps.Worker(job.name, rank=rank, timeout=20.0) as w:
                w.wait_for_workers(2)
                if rank == 0:
                    for name, values in fresh.items():
                        w.put(name, values)
                for _ in range(3):
                    for name, shape in (("fc.weight", (4, 3)), ("fc.bias", (4,))):
                        w.pull(name)
                        w.push(name, np.full(shape, rank + 1, np.float32))
                    w.clock()
                if rank == 0:  # in step 3 now: the pulls wait until the last step is applied
                    final.update({name: w.pull(name) for name in initial})
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append(f"rank {rank}: {e}")

    threads = [threading.Thread(target=trainer, args=(r,)) for r in (1, 0)]  # rank 1 first: it waits
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    for name, values in initial.items():
        got, version = final[name]
        want = values
        for _ in range(3):  # three steps of 1 + 2, rounded to float32 each, as the server does
            want = want - np.float32(3)
        np.testing.assert_array_equal(got, want)
        assert version == 4  # the put, then three steps


def test_put_refusals_raise_shmps_error_saying_why(make_job):
    job = make_job(SPEC)
    with shmps.Worker(job.name, rank=0) as w0, shmps.Worker(job.name, rank=1) as w1:
        w0.put("b", np.arange(7, dtype=np.float32))
        np.testing.assert_array_equal(w1.pull("b")[0], np.arange(7, dtype=np.float32))
        with pytest.raises(shmps.Error, match=r"refused: worker 0 put it first"):
            w1.put("b", np.zeros(7, np.float32))
        with pytest.raises(shmps.Error, match=r"element 2 is NaN; nothing was put"):
            w0.put("b", np.array([0, 0, np.nan, 0, 0, 0, 0], np.float32))
        w0.put("b", np.ones(2, np.float32), offset=5)
        np.testing.assert_array_equal(w1.pull("b")[0], np.array([0, 1, 2, 3, 4, 1, 1], np.float32))
