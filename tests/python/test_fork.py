"""fork() after attaching, as a PyTorch DataLoader or multiprocessing does: the slot stays the
parent's. The child's copy of the Worker refuses to act and its destructor touches nothing, and
the child does not keep the slot's liveness lock alive after the parent dies."""

import gc
import os
import re
import signal
import time

import numpy as np

import shmps
from exact import EXACT_SPEC

SPEC = EXACT_SPEC.format(workers=4, extra="")


def test_a_forked_child_can_neither_use_nor_release_the_parents_slot(make_job):
    job = make_job(SPEC)
    w = shmps.Worker(job.name, rank=0)
    child = os.fork()
    if child == 0:  # the child: every call refuses, then the Worker is destroyed here
        code = 0
        try:
            w.push("b", np.ones(7, np.float32))
            code = 10
        except shmps.Error as e:
            code = 0 if "forked from it" in str(e) and "nothing was changed" in str(e) else 11
        try:
            w.pull("b")
            code = code or 12
        except shmps.Error:
            pass
        w.leave()  # does nothing in the child
        del w
        gc.collect()
        os._exit(code)
    _, status = os.waitpid(child, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    # The parent still holds its slot: it works, and nobody else can take rank 0.
    w.wait_applied(w.push("b", np.ones(7, np.float32)))
    assert w.published() == 1
    try:
        shmps.Worker(job.name, rank=0, timeout=1)
        raise AssertionError("rank 0 could be taken while its process lives")
    except shmps.Error as e:
        assert "rank 0" in str(e) or "slot 0" in str(e), str(e)
    w.leave()


def test_the_parents_death_frees_its_slot_while_its_forked_child_lives_on(make_job):
    job = make_job(SPEC)
    holder = job.python("workers.py", "fork-holder", env={"SHMPS_RANK": "0"})
    deadline = time.monotonic() + 30
    while "parent" not in holder.output():
        assert holder.running() and time.monotonic() < deadline, holder.output()
        time.sleep(0.01)
    parent, child = map(int, re.search(r"parent (\d+) child (\d+)", holder.output()).groups())
    os.kill(parent, signal.SIGKILL)  # only the parent: the child sleeps on, holding its descriptors
    # The slot is free once the parent is gone: a new process takes rank 0 as generation 2.
    deadline = time.monotonic() + 10
    while True:
        try:
            with shmps.Worker(job.name, rank=0, timeout=1) as w:
                assert w.generation == 2
            break
        except shmps.Error as e:
            assert time.monotonic() < deadline, f"rank 0 still held 10 s after its process died: {e}"
            time.sleep(0.05)
    os.kill(child, 0)  # the child was alive all along
    os.kill(child, signal.SIGKILL)
