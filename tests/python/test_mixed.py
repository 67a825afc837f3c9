"""Python and C++ workers in one job: the exact-sum check, and a Python worker SIGKILLed and
restarted that continues exactly where its slot stopped (nothing lost, nothing counted twice)."""

import signal
import time

import numpy as np

import shmps
from conftest import BIN_DIR
from exact import EXACT_SPEC, expected_exact_sum, pattern


def pull_exact(job, rank):
    with shmps.Worker(job.name, rank=rank) as reader:
        return {name: reader.pull(name)[0].ravel().astype(np.float64) for name in ("w", "b")}


def assert_exact(got, want):
    for name in want:
        wrong = np.flatnonzero(got[name] != want[name])
        assert wrong.size == 0, (f"{wrong.size} values of {name} differ from the exact sum; first {name}[{wrong[0]}] = "
                                 f"{got[name][wrong[0]]}, expected {want[name][wrong[0]]}")
    # The check can fail: the sums are far from the initial zeros.
    assert np.count_nonzero(want["w"]) > want["w"].size // 4


def wait_for(process, text, timeout=30):
    deadline = time.monotonic() + timeout
    while text not in process.output():
        assert process.running(), f"exited before printing {text!r}:\n{process.output()}"
        assert time.monotonic() < deadline, f"no {text!r} within {timeout} s:\n{process.output()}"
        time.sleep(0.005)


def test_exact_sum_with_two_python_workers_and_one_cpp_worker(make_job):
    job = make_job(EXACT_SPEC.format(workers=4, extra=""))
    workers = [job.python("workers.py", "exact", "--pushes", "60", env={"SHMPS_RANK": "0"}),
               job.python("workers.py", "exact", "--pushes", "60", env={"SHMPS_RANK": "1"}),
               job.start([BIN_DIR / "shmps-test-pusher", "exact", "--pushes", "60"], {"SHMPS_RANK": "2"})]
    for p in workers:
        assert p.wait(60) == 0, p.output()
    assert_exact(pull_exact(job, 3), expected_exact_sum([60, 60, 60]))


def test_a_python_worker_killed_between_copy_and_commit_restarts_and_pushes_exactly_once(make_job):
    job = make_job(EXACT_SPEC.format(workers=4, extra=""))
    cpp = job.start([BIN_DIR / "shmps-test-pusher", "exact", "--pushes", "45"], {"SHMPS_RANK": "1"})
    # The 20th push is copied into the ring and the process SIGKILLs itself before committing it.
    doomed = job.python("workers.py", "exact", "--pushes", "45",
                        env={"SHMPS_RANK": "0", "SHMPS_KILL_AT": "push.before_commit:20"})
    assert doomed.wait(60) == -signal.SIGKILL, doomed.output()
    restarted = job.python("workers.py", "exact", "--pushes", "45", env={"SHMPS_RANK": "0"})
    assert restarted.wait(60) == 0, restarted.output()
    assert "generation 2 pushed 45" in restarted.output()
    assert cpp.wait(60) == 0, cpp.output()
    assert_exact(pull_exact(job, 3), expected_exact_sum([45, 45]))


def test_a_python_worker_sigkilled_at_any_moment_loses_nothing(make_job):
    job = make_job(EXACT_SPEC.format(workers=4, extra=""))
    for victim_round in range(3):
        p = job.python("workers.py", "exact", "--pushes", "300", "--slow-ms", "1", env={"SHMPS_RANK": "0"})
        wait_for(p, "attached")  # starting Python and numpy can take longer than the pushes
        time.sleep(0.02 + 0.06 * victim_round)
        assert p.running(), p.output()
        p.kill(signal.SIGKILL)
        assert p.wait(10) == -signal.SIGKILL
    last = job.python("workers.py", "exact", "--pushes", "300", env={"SHMPS_RANK": "0"})
    assert last.wait(60) == 0, last.output()
    assert "generation 4 pushed 300" in last.output()
    assert_exact(pull_exact(job, 3), expected_exact_sum([300]))


def test_bsp_a_python_worker_sigkilled_mid_run_resumes_its_state_and_every_step_counts_once(make_job):
    # on_worker_death = "wait": the C++ worker waits in its step for the restarted Python worker.
    job = make_job(EXACT_SPEC.format(workers=3, extra='consistency = "bsp"\non_worker_death = "wait"'))
    steps = 40
    cpp = job.start([BIN_DIR / "shmps-test-pusher", "steps", "--workers", "2", "--steps", str(steps), "--resume",
                     "--check"], {"SHMPS_RANK": "1"})
    first = job.python("workers.py", "steps", "--workers", "2", "--steps", str(steps), "--check", "--slow-ms", "5",
                       env={"SHMPS_RANK": "0"})
    wait_for(first, "step 8 done")
    first.kill(signal.SIGKILL)
    assert first.wait(10) == -signal.SIGKILL
    second = job.python("workers.py", "steps", "--workers", "2", "--steps", str(steps), "--check",
                        env={"SHMPS_RANK": "0"})
    assert second.wait(60) == 0, second.output()
    assert cpp.wait(60) == 0, cpp.output()
    # The second process started at the step after the last one its slot committed, and every
    # pull of both workers (--check) saw exactly the sum of the steps before it.
    resumed_at = int(second.output().split("starts at step ")[1].split()[0])
    assert resumed_at >= 9, second.output()
    assert "wrong_steps 0" in second.output() and "wrong_steps 0" in cpp.output()
    want = {"w": np.zeros(120000), "b": np.zeros(7)}
    for r in range(2):
        for k in range(steps):
            for name in want:
                want[name] -= pattern(r, k, 0, want[name].size)
    assert_exact(pull_exact(job, 2), want)
