"""Zero-copy reads from Python: Worker.view() is a read-only numpy array over the values in the
segment itself (no copy), equal to pull(), whose base keeps the Worker (and its mapping) alive."""

import gc
import signal
import subprocess
import warnings

import numpy as np
import pytest

import shmps
from conftest import PYTHON, child_env
from exact import EXACT_SPEC, PATTERN_W

SPEC = EXACT_SPEC.format(workers=4, extra="")


def address(array):
    return array.__array_interface__["data"][0]


def test_a_view_equals_pull_is_read_only_and_is_the_segment_itself(make_job):
    job = make_job(SPEC)
    with shmps.Worker(job.name, rank=0) as w:
        grad = np.random.default_rng(3).integers(-4, 5, size=(3, 40000)).astype(np.float32)
        w.wait_applied(w.push("w", grad))
        view = w.view("w")
        copy, _ = w.pull("w")
        assert view.shape == (3, 40000) and view.dtype == np.float32 and view.flags.c_contiguous
        np.testing.assert_array_equal(view, copy)
        np.testing.assert_array_equal(view, -grad)
        assert not view.flags.writeable
        with pytest.raises(ValueError):
            view[0, 0] = 1.0
        with pytest.raises(ValueError):
            view.setflags(write=True)  # its base is not an array that owns writeable memory
        # Two views are the same memory, and not the pulled copy's.
        again = w.view("w")
        assert np.shares_memory(view, again) and address(view) == address(again)
        assert not np.shares_memory(view, copy)
        assert address(view) % 64 == 0
        # No copy: the view taken before shows the server's next update (ASP: nothing waits).
        w.wait_applied(w.push("w", grad))
        np.testing.assert_array_equal(view, -2 * grad)
        np.testing.assert_array_equal(copy, -grad)


def test_ranges_are_one_dimensional_windows_of_the_same_memory(make_job):
    job = make_job(SPEC)
    with shmps.Worker(job.name, rank=0) as w:
        grad = np.arange(PATTERN_W, dtype=np.float32) % 7
        w.wait_applied(w.push("w", grad))
        whole = w.view("w")
        part = w.view("w", offset=1000, count=500)
        rest = w.view("w", offset=PATTERN_W - 3)
        first = w.view("w", count=4)
        assert part.shape == (500,) and rest.shape == (3,) and first.shape == (4,)
        assert address(part) == address(whole) + 4 * 1000
        assert np.shares_memory(part, whole)
        np.testing.assert_array_equal(part, -grad[1000:1500])
        np.testing.assert_array_equal(rest, -grad[-3:])
        np.testing.assert_array_equal(first, -grad[:4])
        out = np.empty(500, np.float32)
        w.pull("w", out=out, offset=1000)
        np.testing.assert_array_equal(part, out)


def test_errors_are_pulls_errors_and_change_nothing(make_job):
    job = make_job(SPEC)
    with shmps.Worker(job.name, rank=0) as w:
        with pytest.raises(shmps.Error, match="unknown parameter 'nope'"):
            w.view("nope")
        with pytest.raises(shmps.Error, match=r"view of 'w': elements \[119999, 120001\) are outside"):
            w.view("w", offset=PATTERN_W - 1, count=2)
        with pytest.raises(shmps.Error, match="past its 7 elements"):
            w.view("b", offset=8)
        with pytest.raises(shmps.Error, match="the range is empty"):
            w.view("b", offset=7)
        with pytest.raises(shmps.Error, match="the range is empty"):
            w.view("b", count=0)
        assert w.published() == 0
    with pytest.raises(shmps.Error, match="left the job"):
        w.view("b")


def test_a_view_keeps_its_worker_alive_and_counts_as_a_pull(make_job):
    job = make_job(SPEC)
    w = shmps.Worker(job.name, rank=1)
    w.wait_applied(w.push("b", np.arange(7, dtype=np.float32)))
    b = w.view("b")
    del w
    gc.collect()
    # The array's base is the Worker: still attached, its mapping still there.
    np.testing.assert_array_equal(b, -np.arange(7, dtype=np.float32))
    with pytest.raises(shmps.Error, match="held by a live process"):
        shmps.Worker(job.name, rank=1)
    del b
    gc.collect()
    with shmps.Worker(job.name, rank=1) as again:  # the last array gone: the Worker left its slot
        assert again.generation == 2


def test_bsp_views_equal_pulls_step_after_step(make_job):
    job = make_job(EXACT_SPEC.format(workers=4, extra='consistency = "bsp"'))
    with shmps.Worker(job.name, rank=0) as w:
        grad = np.ones(7, np.float32)
        for step in range(5):
            view = w.view("b")  # waits for the previous step, as a pull does
            copy, _ = w.pull("b")
            np.testing.assert_array_equal(view, copy)
            np.testing.assert_array_equal(view, np.full(7, -step, np.float32))
            w.push("b", grad)
            np.testing.assert_array_equal(view, copy)  # nothing moves before clock()
            w.clock()


def test_torch_wraps_a_view_without_a_copy(make_job):
    torch = pytest.importorskip("torch", reason="python3-torch is not installed")
    job = make_job(SPEC)
    with shmps.Worker(job.name, rank=0) as w:
        w.wait_applied(w.push("b", np.arange(7, dtype=np.float32)))
        view = w.view("b")
        with warnings.catch_warnings():  # torch warns that the array is not writeable; we never write
            warnings.simplefilter("ignore", UserWarning)
            tensor = torch.from_numpy(view)
        assert tensor.data_ptr() == address(view)
        assert torch.equal(tensor, -torch.arange(7, dtype=torch.float32))
        w.wait_applied(w.push("b", np.ones(7, dtype=np.float32)))
        assert torch.equal(tensor, -torch.arange(7, dtype=torch.float32) - 1)  # the same memory


def test_a_write_through_a_view_kills_only_the_writer(make_job):
    """numpy refuses; a write behind its back (ctypes here, an in-place op on a torch tensor made
    from a view) is a SIGSEGV of the writing worker, because a worker maps the values read-only:
    the model of the other workers is left untouched."""
    job = make_job(SPEC)
    with shmps.Worker(job.name, rank=0) as w:
        w.wait_applied(w.push("b", np.arange(7, dtype=np.float32)))
        code = ("import ctypes, shmps\n"
                f"w = shmps.Worker({job.name!r}, rank=1)\n"
                "a = w.view('b')\n"
                "ctypes.c_float.from_address(a.__array_interface__['data'][0]).value = 42.0\n")
        ran = subprocess.run([PYTHON, "-c", code], env=child_env(), capture_output=True, timeout=60)
        assert ran.returncode == -signal.SIGSEGV, ran.stderr.decode(errors="replace")
        np.testing.assert_array_equal(w.view("b"), -np.arange(7, dtype=np.float32))
