#!/usr/bin/python3
"""python_workers.py: the Python worker (module shmps) against the C++ worker, in one run.

    /usr/bin/python3 tools/bench/python_workers.py [--build DIR] [--quick] [--reps N] [--out FILE]

Measures, with the same model, sizes and method as shmps-bench's transfer group (transfer.cpp,
docs/workloads.md §3), and runs shmps-bench itself in the same run for the C++
figures and the memcpy limit:

  pull        the whole 64 MiB model (16 parameters of 2^20 float32) into preallocated,
              touched, 64-byte aligned arrays (pull(name, out=...)), one call per parameter
  pull.alloc  the same with out=None: every call returns a new array (allocation and the first
              touch of its pages are timed; freeing the previous repetition's arrays is not).
              Whether the new arrays take page faults depends on glibc's malloc: when it gives
              the freed 64 MiB back to the kernel (here it does, every repetition; see
              pull.alloc.py.faults), each pull faults its pages in again
  push        a whole-model gradient (one preallocated array of 1.0f, reused for every
              parameter) into the worker's ring; as in C++ the ring holds a whole model, the
              wait until it is applied comes after the clock stops, so a repetition starts with
              an empty ring

Each timed piece: one warm-up repetition, then --reps (default 9) timed ones; the median is
reported, in GB/s with bytes counted once. The same again with 64 KiB parameters (what
shmps-bench --quick uses) exposes the per-call cost, and a one-float pull and push give the
cost of a call with almost nothing to copy.

Then the training throughput of the reference MLP, 400,000 samples (--quick 6400), batch 64:
the C++ trainer (shmps-worker) against the PyTorch example
(worker/python/examples/train_mlp_torch.py, the same CLI), one and two workers through
shmps-launch, and each --local for reference (see compare_training). Skipped, saying so, without
torch; --no-train skips it.

Prints the comparison tables, then one "name value unit" line per figure (also to --out FILE),
like shmps-bench. --quick: small sizes, a few seconds (ctest python_bench_quick checks that
every figure is printed and finite; the numbers mean little). Every server it starts has its own
segment, which is removed at the end, also on an error or Ctrl-C.
"""

import argparse
import ctypes
import math
import os
import re
import resource
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
SOURCE_DIR = HERE.parents[1]
PYTHON = "/usr/bin/python3" if os.path.exists("/usr/bin/python3") else sys.executable
MiB = 1 << 20


# --------------------------------------------------------------------------------------------
# Report: figures as shmps-bench prints them


class Report:
    def __init__(self):
        self.figures = []  # (name, value, unit, note)

    def add(self, name, value, unit, note=""):
        self.figures.append((name, float(value), unit, note))

    def get(self, name):
        for n, v, _, _ in self.figures:
            if n == name:
                return v
        raise KeyError(name)

    def lines(self):
        # The same "name value unit" form as shmps-bench (its value is printed with %g-like 6 digits).
        return "".join(f"{n} {v:.6g} {u}\n" for n, v, u, _ in self.figures)

    def print(self, out_path=None):
        width = max([22] + [len(n) + 2 for n, _, _, _ in self.figures])
        print(f"{'figure':<{width}}{'value':>12}  {'unit':<10}what")
        for n, v, u, note in self.figures:
            print(f"{n:<{width}}{v:>12.3f}  {u:<10}{note}")
        print()
        print(self.lines(), end="", flush=True)
        if out_path:
            Path(out_path).write_text(self.lines())


def median(values):
    """As shmps-bench's median(): the element at size/2 of the sorted values."""
    s = sorted(values)
    return s[len(s) // 2] if s else 0.0


# --------------------------------------------------------------------------------------------
# A server of our own, on a segment of our own, always removed


def _die_with_parent():
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


_job_counter = 0


def job_spec(name, params, per_param, max_workers, ring_bytes=0):
    """The spec shmps-bench's Job writes (harness.cpp, job_spec), for the same options."""
    spec = f'name = "{name}"\nmax_workers = {max_workers}\nconsistency = "asp"\n'
    if ring_bytes:
        spec += f"ring_bytes = {ring_bytes}\n"
    spec += '[optimizer]\nkind = "sgd"\nlr = 1e-6\n'
    for i in range(params):
        spec += f'[[param]]\nname = "p{i}"\nshape = [{per_param}]\n'
    return spec


def destroy_segment(bin_dir, name):
    subprocess.run([str(bin_dir / "shmps-ctl"), "destroy", name], stdout=subprocess.DEVNULL,
                   stderr=subprocess.DEVNULL)
    for leftover in Path("/dev/shm").glob(f"shmps.{name}*"):
        leftover.unlink(missing_ok=True)


class Server:
    """shmps-server for a spec of p0..p<params-1>, as shmps-bench's Job starts it (--remove-on-stop);
    stopped with SIGTERM at the end and its segment destroyed whatever happened."""

    def __init__(self, bin_dir, tmp_dir, params, per_param, max_workers=4, ring_bytes=0):
        global _job_counter
        self.bin_dir = bin_dir
        self.name = f"pybench-{os.getpid()}-{_job_counter}"
        _job_counter += 1
        self.spec_path = Path(tmp_dir) / f"{self.name}.toml"
        self.spec_path.write_text(job_spec(self.name, params, per_param, max_workers, ring_bytes))
        self.log_path = Path(tmp_dir) / f"{self.name}.log"
        self.proc = None
        self.log = None

    def __enter__(self):
        try:
            self.log = open(self.log_path, "w+b")
            self.proc = subprocess.Popen(
                [str(self.bin_dir / "shmps-server"), "--spec", str(self.spec_path), "--remove-on-stop"],
                stdout=self.log, stderr=subprocess.STDOUT, preexec_fn=_die_with_parent)
            deadline = time.monotonic() + 30
            while b"event=ready" not in self.log_path.read_bytes():
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"shmps-server for {self.name} did not start:\n"
                                       + self.log_path.read_text(errors="replace"))
                time.sleep(0.005)
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return self

    def __exit__(self, *exc):
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        destroy_segment(self.bin_dir, self.name)
        if self.log is not None:
            self.log.close()
        self.spec_path.unlink(missing_ok=True)
        self.log_path.unlink(missing_ok=True)
        return False


# --------------------------------------------------------------------------------------------
# The Python worker's figures


def aligned_floats(np, n, value):
    """A touched float32 array of n elements starting on a 64-byte boundary, like the C++
    harness's Floats (numpy itself aligns to 16 bytes)."""
    raw = np.empty(n + 16, dtype=np.float32)
    skip = (-raw.ctypes.data % 64) // 4
    a = raw[skip:skip + n]
    a.fill(value)
    return a


def minor_faults():
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def time_pull_push(shmps, np, bin_dir, tmp_dir, params, per_param, reps):
    """Seconds (medians) for one whole-model pull into preallocated arrays, one allocating, and
    one push; plus the allocating pull's page faults per repetition. transfer.cpp's method."""
    names = [f"p{i}" for i in range(params)]
    result = {}
    with Server(bin_dir, tmp_dir, params, per_param, max_workers=4) as job:
        with shmps.Worker(job.name, rank=0) as w:
            values = [aligned_floats(np, per_param, 0.0) for _ in names]
            t = []
            for rep in range(-1, reps):  # rep -1 warms up
                t0 = time.perf_counter()
                for name, out in zip(names, values):
                    w.pull(name, out=out)
                if rep >= 0:
                    t.append(time.perf_counter() - t0)
            result["pull"] = median(t)
            del values
            t, faults = [], []
            for rep in range(-1, reps):
                f0 = minor_faults()
                t0 = time.perf_counter()
                pulled = [w.pull(name)[0] for name in names]
                if rep >= 0:
                    t.append(time.perf_counter() - t0)
                    faults.append(minor_faults() - f0)
                del pulled  # freed outside the clock
            result["pull.alloc"] = median(t)
            result["pull.alloc.faults"] = median(faults)
    # A ring with room for a whole model's records (and their headers), as transfer.cpp sizes it.
    ring = (2 * params * per_param * 4 + MiB) // 64 * 64
    with Server(bin_dir, tmp_dir, params, per_param, max_workers=2, ring_bytes=ring) as job:
        with shmps.Worker(job.name, rank=0) as w:
            grad = aligned_floats(np, per_param, 1.0)
            t = []
            for rep in range(-1, reps):
                seq = 0
                t0 = time.perf_counter()
                for name in names:
                    seq = w.push(name, grad)
                if rep >= 0:
                    t.append(time.perf_counter() - t0)
                w.wait_applied(seq)  # not timed: the next repetition starts with an empty ring
            result["push"] = median(t)
    return result


def time_tiny_calls(shmps, np, bin_dir, tmp_dir, calls, reps):
    """Microseconds per call of a one-float pull and push (offset=0): the cost of a call itself.
    The ring has room for every push of a repetition, so no back-pressure is timed."""
    with Server(bin_dir, tmp_dir, 1, 16384, max_workers=2, ring_bytes=max(MiB, calls * 512)) as job:
        with shmps.Worker(job.name, rank=0) as w:
            one = aligned_floats(np, 1, 1.0)
            tp, tq = [], []
            for rep in range(-1, reps):
                t0 = time.perf_counter()
                for _ in range(calls):
                    w.pull("p0", out=one, offset=0)
                t1 = time.perf_counter()
                seq = 0
                for _ in range(calls):
                    seq = w.push("p0", one, offset=0)
                t2 = time.perf_counter()
                w.wait_applied(seq)
                if rep >= 0:
                    tp.append((t1 - t0) / calls)
                    tq.append((t2 - t1) / calls)
    return median(tp) * 1e6, median(tq) * 1e6


# --------------------------------------------------------------------------------------------
# The C++ figures: shmps-bench in the same run


def run_cpp_bench(bin_dir, tmp_dir, quick, reps):
    """Runs shmps-bench --only transfer (the limits always run); returns {name: value}."""
    out = Path(tmp_dir) / f"cpp-bench-{'quick' if quick else 'full'}.txt"
    argv = [str(bin_dir / "shmps-bench"), "--only", "transfer", "--reps", str(reps), "--out", str(out)]
    if quick:
        argv.insert(1, "--quick")
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        output, _ = proc.communicate()
    except BaseException:
        # Ctrl-C: shmps-bench has no handler and its server dies with it (PDEATHSIG SIGKILL), so
        # its segments stay behind; they are named bench-<its pid>-<n>.
        proc.kill()
        proc.wait()
        time.sleep(0.2)
        for leftover in Path("/dev/shm").glob(f"shmps.bench-{proc.pid}-*"):
            destroy_segment(bin_dir, leftover.name[len("shmps."):].split(".")[0])
        raise
    if proc.returncode != 0 or not out.exists():
        raise RuntimeError(f"{' '.join(argv)} failed ({proc.returncode}):\n{output}")
    figures = {}
    for line in out.read_text().splitlines():
        parts = line.split()
        if len(parts) >= 3:
            figures[parts[0]] = float(parts[1])
    for needed in ("limit.memcpy", "pull", "push"):
        if needed not in figures:
            raise RuntimeError(f"shmps-bench printed no '{needed}':\n{output}")
    return figures


# --------------------------------------------------------------------------------------------
# Training throughput: the C++ trainer against the PyTorch example

TORCH_EXAMPLE = SOURCE_DIR / "worker/python/examples/train_mlp_torch.py"
MLP_SPEC = SOURCE_DIR / "models/mlp.toml"
TRAINED = re.compile(r"trained (\d+) batches, (\d+) samples in ([0-9.]+) s")


def run_trainers(argv, what, segment=None):
    """Runs a training command; samples/s as shmps-bench's train group counts it: all workers'
    samples over the longest worker's training time (each prints "trained B batches, S samples
    in T s"). On an error or Ctrl-C, shmps-launch gets SIGTERM (it stops its job and removes the
    segment) and the segment is destroyed whatever it did."""
    proc = subprocess.Popen([str(a) for a in argv], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        output, _ = proc.communicate()
    except BaseException:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        raise
    finally:
        if segment is not None:
            destroy_segment(Path(argv[0]).parent, segment)
    samples, longest = 0, 0.0
    for line in output.splitlines():
        m = TRAINED.search(line)
        if m:
            samples += int(m.group(2))
            longest = max(longest, float(m.group(3)))
    if proc.returncode != 0 or longest <= 0:
        raise RuntimeError(f"train ({what}): '{' '.join(map(str, argv))}' failed ({proc.returncode}) or printed "
                           f"no 'trained ...' line:\n{output}")
    return samples / longest


def compare_training(bin_dir, args, report):
    """Training throughput of the Python worker against the C++ trainer: the reference MLP,
    the same samples and batch, through shmps-launch (ASP) with 1 and 2 workers, program
    shmps-worker against worker/python/examples/train_mlp_torch.py (the same CLI and the same
    "trained ..." line); and each trainer's --local run (no parameter server) for reference,
    which separates what torch costs from what shmps costs. samples/s and Python/C++ ratios.
    Returns False (and adds nothing) without the example or without torch."""
    example = Path(args.torch_example) if args.torch_example else TORCH_EXAMPLE
    if not example.exists():
        print(f"train: skipped: no PyTorch example trainer at {example}", file=sys.stderr)
        return False
    if subprocess.run([PYTHON, "-c", "import torch"], capture_output=True).returncode != 0:
        print(f"train: skipped: {PYTHON} cannot import torch (Debian: apt-get install python3-torch)",
              file=sys.stderr)
        return False
    samples = str(args.train_samples or (6400 if args.quick else 400000))
    common = ["--samples", samples, "--batch", str(args.batch)]
    cpp_prog = [bin_dir / "shmps-worker"]
    py_prog = [PYTHON, example]
    runs = 0

    def launch(workers, program):
        nonlocal runs
        name = f"pybench-train-{os.getpid()}-{runs}"
        runs += 1
        return run_trainers([bin_dir / "shmps-launch", "--spec", MLP_SPEC, "--name", name, "--workers", workers,
                             "--consistency", "asp", "--", *program, *common],
                            f"{workers} worker(s), {Path(str(program[-1])).name}", segment=name)

    fig = {}
    fig["local.cpp"] = run_trainers([*cpp_prog, "--local", *common], "shmps-worker --local")
    fig["local.py"] = run_trainers([*py_prog, "--local", *common], "train_mlp_torch.py --local")
    for p in (1, 2):
        fig[f"asp.{p}.cpp"] = launch(p, cpp_prog)
        fig[f"asp.{p}.py"] = launch(p, py_prog)
    what = {"local": "--local, no parameter server", "asp.1": "1 worker through shmps (shmps-launch, ASP)",
            "asp.2": "2 workers through shmps (shmps-launch, ASP)"}
    for key, text in what.items():
        report.add(f"train.{key}.cpp", fig[f"{key}.cpp"], "samples/s", f"shmps-worker {text}, {samples} samples")
        report.add(f"train.{key}.py", fig[f"{key}.py"], "samples/s", f"train_mlp_torch.py {text}")
        report.add(f"train.{key}.py.vs_cpp", fig[f"{key}.py"] / fig[f"{key}.cpp"], "x", "Python / C++")
    for lang in ("cpp", "py"):
        report.add(f"train.asp.1.{lang}.vs_local", fig[f"asp.1.{lang}"] / fig[f"local.{lang}"], "x",
                   "1 worker through shmps / the same trainer --local")
        report.add(f"train.asp.2.{lang}.vs_asp.1", fig[f"asp.2.{lang}"] / fig[f"asp.1.{lang}"], "x",
                   "2 workers / 1 worker")
    return True


# --------------------------------------------------------------------------------------------


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--build", default=None,
                    help="the build directory with bin/ and python/ (default: build/release next to this "
                         "source tree)")
    ap.add_argument("--quick", action="store_true", help="small sizes, a few seconds (ctest python_bench_quick)")
    ap.add_argument("--reps", type=int, default=0,
                    help="timed repetitions of a whole-model pull or push (default 9, --quick 3)")
    ap.add_argument("--small-reps", type=int, default=0,
                    help="timed repetitions at 64 KiB a parameter and of the one-float calls (default 201, "
                         "--quick 3)")
    ap.add_argument("--out", default=None, help="also write the 'name value unit' lines to this file")
    ap.add_argument("--torch-example", default=None, help="the PyTorch example trainer (default: " +
                    str(TORCH_EXAMPLE.relative_to(SOURCE_DIR)) + " in this source tree)")
    ap.add_argument("--train-samples", type=int, default=0,
                    help="samples per training run (default 400000, --quick 6400)")
    ap.add_argument("--batch", type=int, default=64, help="global batch size of the training runs (default 64)")
    ap.add_argument("--no-train", action="store_true", help="skip the training comparison")
    args = ap.parse_args()

    build = Path(args.build) if args.build else SOURCE_DIR / "build/release"
    bin_dir, python_dir = build.resolve() / "bin", build.resolve() / "python"
    if not (bin_dir / "shmps-bench").exists() or not (python_dir / "shmps").is_dir():
        ap.error(f"{build} has no bin/shmps-bench or python/shmps: build it first, or give --build DIR")
    sys.path.insert(0, str(python_dir))
    os.environ["PYTHONPATH"] = str(python_dir) + (":" + os.environ["PYTHONPATH"] if os.environ.get("PYTHONPATH") else "")
    import numpy as np
    import shmps

    params = 16
    per_param = (1 << 14) if args.quick else (1 << 20)
    small = 1 << 14  # 64 KiB a parameter, as shmps-bench --quick
    reps = args.reps or (3 if args.quick else 9)
    small_reps = args.small_reps or (3 if args.quick else 201)
    tiny_calls = 100 if args.quick else 2000

    # SIGTERM ends the run as Ctrl-C does, through every finally and __exit__ (servers stopped,
    # segments removed).
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(128 + signal.SIGTERM))

    report = Report()
    with tempfile.TemporaryDirectory(prefix="shmps-pybench-") as tmp:
        cpp = run_cpp_bench(bin_dir, tmp, args.quick, reps)
        py = time_pull_push(shmps, np, bin_dir, tmp, params, per_param, reps)
        cpp_small = run_cpp_bench(bin_dir, tmp, True, small_reps)
        py_small = time_pull_push(shmps, np, bin_dir, tmp, params, small, small_reps)
        pull1_us, push1_us = time_tiny_calls(shmps, np, bin_dir, tmp, tiny_calls, small_reps)

    # Whole model.
    gb = params * per_param * 4 / 1e9
    memcpy = cpp["limit.memcpy"]
    report.add("limit.memcpy", memcpy, "GB/s", f"shmps-bench: one memcpy of {params * per_param * 4 // MiB} MiB")
    rows = [("pull", "pull", "pull(name, out=preallocated), the whole model"),
            ("pull.alloc", "pull", "pull(name) -> a new array, the whole model"),
            ("push", "push", "push(name, grad), a whole-model gradient into the ring")]
    for name, cpp_name, what in rows:
        py_gbs = gb / py[name]
        report.add(f"{name}.py", py_gbs, "GB/s", "Python: " + what)
        if name == cpp_name:
            report.add(f"{name}.cpp", cpp[cpp_name], "GB/s", f"C++ (shmps-bench '{cpp_name}')")
        report.add(f"{name}.py.vs_cpp", py_gbs / cpp[cpp_name], "x", f"Python / C++ {cpp_name}")
        report.add(f"{name}.py.ratio", py_gbs / memcpy, "x", "Python / memcpy")
        if name == cpp_name:
            report.add(f"{name}.cpp.ratio", cpp[cpp_name] / memcpy, "x", "C++ / memcpy")
    report.add("pull.alloc.py.faults", py["pull.alloc.faults"], "faults",
               "minor page faults in one allocating whole-model pull (4 KiB pages: "
               f"{params * per_param * 4 // 4096} to touch)")

    # 64 KiB a parameter: the cost of a call next to what it copies.
    small_bytes = small * 4
    small_memcpy = cpp_small["limit.memcpy"]
    report.add("small.limit.memcpy", small_memcpy, "GB/s",
               f"shmps-bench --quick: one memcpy of {params * small_bytes // 1024} KiB")

    def per_call_us(seconds):
        return seconds / params * 1e6

    for name, cpp_name in (("pull", "pull"), ("pull.alloc", "pull"), ("push", "push")):
        py_us = per_call_us(py_small[name])
        cpp_us = small_bytes / (cpp_small[cpp_name] * 1e9) * 1e6
        report.add(f"small.{name}.py", small_bytes / (py_us * 1e3), "GB/s", f"Python, 64 KiB a call ({name})")
        if name == cpp_name:
            report.add(f"small.{name}.cpp", cpp_small[cpp_name], "GB/s", "C++, 64 KiB a call (shmps-bench --quick)")
            report.add(f"small.{name}.cpp.call", cpp_us, "us", "C++: time of one 64 KiB call")
        report.add(f"small.{name}.py.call", py_us, "us", "Python: time of one 64 KiB call")
        report.add(f"small.{name}.py.vs_cpp", cpp_us / py_us, "x", f"Python / C++ {cpp_name}, 64 KiB")
        report.add(f"small.{name}.py.overhead", py_us - cpp_us, "us", f"Python - C++ {cpp_name}, per call")
    report.add("call.pull1.py", pull1_us, "us", "Python: pull of one float (offset=0, out=)")
    report.add("call.push1.py", push1_us, "us", "Python: push of one float (offset=0)")

    trained = False if args.no_train else compare_training(bin_dir, args, report)

    print_tables(report, params, per_param, trained)
    print()
    report.print(args.out)
    return 0


# The rows of both tables: figure name, label, and the C++ figure it is compared with.
TABLE_ROWS = (("pull", "pull, out=array", "pull"), ("pull.alloc", "pull, out=None", "pull"), ("push", "push", "push"))


def print_tables(r, params, per_param, trained):
    mib = params * per_param * 4 // MiB
    print(f"Python worker vs C++ worker, {params} parameters of {per_param} float32 ({mib} MiB), "
          f"medians; memcpy {r.get('limit.memcpy'):.2f} GB/s")
    print(f"{'':24}{'Python GB/s':>12}{'C++ GB/s':>10}{'Py/C++':>8}{'Py/memcpy':>11}{'C++/memcpy':>12}")
    for name, label, cpp_name in TABLE_ROWS:
        print(f"{label:24}{r.get(name + '.py'):12.2f}{r.get(cpp_name + '.cpp'):10.2f}"
              f"{r.get(name + '.py.vs_cpp'):8.2f}{r.get(name + '.py.ratio'):11.2f}{r.get(cpp_name + '.cpp.ratio'):12.2f}")
    print(f"\nPer call, 64 KiB a parameter ({params} calls a repetition); memcpy of "
          f"{params * 64} KiB {r.get('small.limit.memcpy'):.2f} GB/s")
    print(f"{'':24}{'Python us':>12}{'C++ us':>10}{'Py/C++':>8}{'Py-C++ us':>11}")
    for name, label, cpp_name in TABLE_ROWS:
        print(f"{label:24}{r.get('small.' + name + '.py.call'):12.2f}{r.get('small.' + cpp_name + '.cpp.call'):10.2f}"
              f"{r.get('small.' + name + '.py.vs_cpp'):8.2f}{r.get('small.' + name + '.py.overhead'):11.2f}")
    print(f"one-float call: pull {r.get('call.pull1.py'):.2f} us, push {r.get('call.push1.py'):.2f} us")
    if trained:
        print_training_table(r)


def print_training_table(r):
    print("\nTraining the reference MLP (samples/s; batch and samples the same for both)")
    print(f"{'':30}{'Python':>10}{'C++':>10}{'Py/C++':>8}")
    for key, label in (("local", "--local (no server)"), ("asp.1", "1 worker through shmps"),
                       ("asp.2", "2 workers through shmps")):
        print(f"{label:30}{r.get(f'train.{key}.py'):10.0f}{r.get(f'train.{key}.cpp'):10.0f}"
              f"{r.get(f'train.{key}.py.vs_cpp'):8.2f}")
    print(f"through shmps / local: Python {r.get('train.asp.1.py.vs_local'):.2f}, "
          f"C++ {r.get('train.asp.1.cpp.vs_local'):.2f}; 2 workers / 1: Python "
          f"{r.get('train.asp.2.py.vs_asp.1'):.2f}, C++ {r.get('train.asp.2.cpp.vs_asp.1'):.2f}")


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        print("python_workers.py: interrupted; servers stopped, segments removed", file=sys.stderr)
        sys.exit(130)
