"""What the Python tests share: real jobs (a shmps-server process per test, a unique segment
name each), worker processes, and a watchdog.

Every process a test starts is registered here and killed when the test ends, passes or fails;
every segment is destroyed. A hung test does not wait for ctest's timeout: the watchdog prints
where every thread is, kills the test's processes, removes its segments and exits the run.
Children also get PR_SET_PDEATHSIG, so nothing outlives a pytest that was itself killed.
"""

import ctypes
import faulthandler
import itertools
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

BIN_DIR = Path(os.environ.get("SHMPS_BIN_DIR", Path(__file__).resolve().parents[2] / "build/release/bin"))
PYTHON_DIR = BIN_DIR.parent / "python"
HERE = Path(__file__).resolve().parent
SOURCE_DIR = HERE.parents[1]
PYTHON = "/usr/bin/python3" if os.path.exists("/usr/bin/python3") else sys.executable
TEST_TIMEOUT_S = float(os.environ.get("SHMPS_PYTEST_TIMEOUT", "90"))

if str(PYTHON_DIR) not in sys.path:
    sys.path.insert(0, str(PYTHON_DIR))

_names = itertools.count()
_live_processes = []  # every Process not yet reaped, for the watchdog and the fixtures
_live_segments = set()


def _die_with_parent():
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG: killed if pytest dies
    os.setpgid(0, 0)


def child_env(extra=None):
    env = dict(os.environ)
    env["PYTHONPATH"] = str(PYTHON_DIR) + (":" + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env.update(extra or {})
    return env


class Process:
    """A child process whose output (stdout and stderr together) is collected in a file."""

    def __init__(self, argv, env=None, log_dir=None):
        self.argv = [str(a) for a in argv]
        self._log = open(Path(log_dir or "/tmp") / f"shmps-pytest-{os.getpid()}-{next(_names)}.log", "w+b")
        self.popen = subprocess.Popen(self.argv, stdout=self._log, stderr=subprocess.STDOUT,
                                      env=child_env(env), preexec_fn=_die_with_parent)
        _live_processes.append(self)

    def output(self):
        self._log.flush()
        self._log.seek(0)
        return self._log.read().decode(errors="replace")

    def running(self):
        return self.popen.poll() is None

    def wait(self, timeout):
        """The exit code; a process still running after `timeout` seconds is killed (code None)."""
        try:
            return self.popen.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.kill(signal.SIGKILL)
            self.popen.wait()
            return None

    def kill(self, sig=signal.SIGKILL):
        if self.running():
            try:
                os.killpg(self.popen.pid, sig)
            except ProcessLookupError:
                pass

    def close(self):
        self.kill(signal.SIGKILL)
        self.popen.wait()
        self._log.close()
        os.unlink(self._log.name)
        if self in _live_processes:
            _live_processes.remove(self)


def destroy_segment(name):
    path = Path("/dev/shm") / f"shmps.{name}"
    subprocess.run([BIN_DIR / "shmps-ctl", "destroy", name], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    for leftover in Path("/dev/shm").glob(f"shmps.{name}*"):
        leftover.unlink(missing_ok=True)
    _live_segments.discard(name)
    return not path.exists()


class Job:
    """One shmps-server with its own segment, and the workers a test starts against it."""

    def __init__(self, spec_text, tmp_path, tag="py"):
        self.name = f"pytest-{tag}-{os.getpid()}-{next(_names)}"
        self.tmp_path = tmp_path
        self.spec_path = tmp_path / f"{self.name}.toml"
        self.spec_path.write_text(f'name = "{self.name}"\n' + spec_text)
        self.processes = []
        self.server = None
        _live_segments.add(self.name)

    def start_server(self, *extra):
        self.server = self.start([BIN_DIR / "shmps-server", "--spec", self.spec_path, "--name", self.name, *extra])
        deadline = time.monotonic() + 30
        while "event=ready" not in self.server.output():
            assert self.server.running(), "the server exited before the segment was ready:\n" + self.server.output()
            assert time.monotonic() < deadline, "segment not ready within 30 s:\n" + self.server.output()
            time.sleep(0.01)
        return self.server

    def start(self, argv, env=None):
        p = Process(argv, {"SHMPS_SEGMENT": self.name, **(env or {})}, self.tmp_path)
        self.processes.append(p)
        return p

    def python(self, script, *args, env=None):
        """A Python worker process running tests/python/<script>."""
        return self.start([PYTHON, HERE / script, *args], env)

    def stop_server(self, timeout=30):
        self.server.kill(signal.SIGTERM)
        return self.server.wait(timeout)

    def close(self):
        for p in self.processes:
            p.close()
        destroy_segment(self.name)


@pytest.fixture
def make_job(tmp_path):
    """make_job(spec_text) -> a Job with its server started; all of it cleaned up afterwards."""
    jobs = []

    def make(spec_text, *server_args, tag="py", start=True):
        job = Job(spec_text, tmp_path, tag)
        jobs.append(job)
        if start:
            job.start_server(*server_args)
        return job

    yield make
    for job in jobs:
        job.close()


def _watchdog_fire(test_name):
    sys.stderr.write(f"\nwatchdog: {test_name} still running after {TEST_TIMEOUT_S:.0f} s; "
                     "killing its processes, removing its segments, and stopping\n")
    faulthandler.dump_traceback(file=sys.stderr, all_threads=True)
    for p in list(_live_processes):
        p.kill(signal.SIGKILL)
    for name in list(_live_segments):
        destroy_segment(name)
    sys.stderr.flush()
    os._exit(3)


@pytest.fixture(autouse=True)
def watchdog(request):
    timer = threading.Timer(TEST_TIMEOUT_S, _watchdog_fire, args=(request.node.nodeid,))
    timer.daemon = True
    timer.start()
    yield
    timer.cancel()
