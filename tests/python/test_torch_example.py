"""The PyTorch example (worker/python/examples/train_mlp_torch.py) as shmps workers, next to the
C++ trainer, started by shmps-launch the way docs/python.md shows. Skipped, saying so, where Debian's
python3-torch is not installed."""

import re

import pytest

torch = pytest.importorskip(
    "torch", reason="python3-torch is not installed (apt-get install python3-torch): the PyTorch example's tests are skipped")

from conftest import BIN_DIR, SOURCE_DIR  # noqa: E402

EXAMPLE = SOURCE_DIR / "worker/python/examples/train_mlp_torch.py"
SPEC = SOURCE_DIR / "models/mlp.toml"


def launch(make_job, *args):
    job = make_job("", start=False, tag="torch")  # shmps-launch starts the server; the job cleans up
    return job.start([BIN_DIR / "shmps-launch", "--spec", SPEC, "--name", job.name, *args,
                      "--after", "shmps-worker --evaluate"])


def batches(samples, batch=64):
    return -(-samples // batch)  # the trainers' schedule rounds up to whole global batches


def records_applied(out):
    return int(re.search(r"records_applied=(\d+)", out).group(1))


def test_two_torch_workers_and_one_cpp_worker_train_the_reference_mlp(make_job):
    p = launch(make_job, "--worker", EXAMPLE, "--worker", EXAMPLE, "--worker", "shmps-worker", "--samples", "60000")
    assert p.wait(150) == 0, p.output()
    out = p.output()
    for rank in range(3):
        assert f"[w{rank}] trained " in out, out
    # Every batch of all three workers was pushed, four parameters each, and applied.
    assert records_applied(out) == batches(60000) * 4, out
    accuracy = float(re.search(r"\[after\] test loss [0-9.]+ acc ([0-9.]+)", out).group(1))
    # 60,000 samples with SGD at 0.05 reach about 0.57 (the C++ trainer alone: the same); the
    # untrained model is at chance, 0.1.
    assert accuracy > 0.5, out


def test_a_torch_worker_sigkilled_mid_run_is_restarted_and_resumes_its_schedule(make_job):
    # Killed 1 s after its first push, of a run of about 4 s here (the torch worker once took
    # longer; at --chaos-after 3 it finished first and nothing was killed).
    p = launch(make_job, "--worker", "shmps-worker", "--worker", EXAMPLE, "--samples", "240000",
               "--chaos", "--chaos-after", "1")
    assert p.wait(150) == 0, p.output()
    out = p.output()
    assert "--chaos: killing worker w1" in out, out
    resumed = re.search(r"\[w1\] resuming: generation 2 of slot 1 continues at batch (\d+)", out)
    assert resumed and int(resumed.group(1)) > 1, out
    assert "[w1] trained " in out, out
    # Each of the 3750 batches pushed once, plus at most the step w1 was in when it died (ASP applies
    # a dead worker's committed pushes, and the restarted process repeats that step).
    assert batches(240000) * 4 <= records_applied(out) <= batches(240000) * 4 + 4, out
