#!/usr/bin/python3
"""fashion_mnist_side_by_side.py: the Fashion-MNIST CNN trained through shmps (ASP and BSP) and
by PyTorch alone (Hogwild and DDP), in one run, with the same settings.

    /usr/bin/python3 tools/bench/fashion_mnist_side_by_side.py [--workers 2] [--epochs 4] [--batch 32]
        [--lr 0.1] [--train-samples N] [--modes hogwild,ddp,shmps-asp,shmps-bsp] [--build build/release]

Every mode runs worker/python/examples/fashion_mnist.py with the same model (the same initial
values), the same batches in the same order for each rank, the same learning rate (plain SGD) and
the same number of processes, one torch thread each (docs/fashion-mnist.md):

  hogwild    --mode hogwild: N processes on one model in shared memory, each its own SGD step
  ddp        --mode ddp: N processes, gloo on localhost, gradients all-reduced every batch
  shmps-asp  a spec from shmps.spec (sgd, --lr, consistency asp), shmps-launch with N workers and
             the example's --evaluate as its --after step
  shmps-bsp  the same with consistency bsp

For each it reads the example's --json lines and prints one row:
  - the processes;
  - samples/s: all processes' samples over the slowest process's training loop, the same clock
    in every mode, from the moment it is set up to its last batch (the start of Python and
    torch, the data loading and the evaluation are not in it);
  - the test accuracy of the final model on the 10,000 test images;
  - training CPU s: the CPU time of the training loops (all processes, all their threads), which
    what else runs on the machine moves less than the clock;
  - all CPU s: the CPU time of every process of the command from start to end (with the shmps
    server, the start, the data loading and the evaluation);
  - the whole command's wall-clock seconds;
  - the machine's 1-minute load average at the start and at the end of the mode's run (this
    run's own N processes count about N once they are up).
Then the command line that produced the table. Exits non-zero if a run fails. Each shmps job
has its own segment, removed at the end (also on an error or Ctrl-C).
"""
from __future__ import annotations

import argparse
import json
import os
import re
import resource
import shlex
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
SOURCE_DIR = HERE.parents[1]
EXAMPLE = SOURCE_DIR / "worker" / "python" / "examples" / "fashion_mnist.py"
PYTHON = "/usr/bin/python3" if os.path.exists("/usr/bin/python3") else sys.executable
MODES = ("hogwild", "ddp", "shmps-asp", "shmps-bsp")
# The example's result objects are flat (no nested braces), so each is found even where the
# output of two processes got mixed on one line.
JSON_OBJECT = re.compile(r'\{"fashion_mnist": [^{}]*\}')


def run(argv, env, log) -> tuple[str, float]:
    """Runs argv, echoing its output to `log` as it comes; (output, wall seconds). Raises on failure."""
    t0 = time.monotonic()
    print("$ " + " ".join(shlex.quote(str(a)) for a in argv), file=log, flush=True)
    p = subprocess.Popen([str(a) for a in argv], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env,
                         text=True)
    lines = []
    for line in p.stdout:
        lines.append(line)
        log.write(line)
        log.flush()
    code = p.wait()
    seconds = time.monotonic() - t0
    out = "".join(lines)
    if code != 0:
        raise RuntimeError(f"{argv[0]} exited with {code}:\n{out[-3000:]}")
    return out, seconds


def load_average() -> float:
    with open("/proc/loadavg") as f:
        return float(f.read().split()[0])


def figures(out: str) -> dict:
    """From the example's JSON lines: samples, training seconds (the slowest process), accuracy."""
    workers, result = [], None
    for m in JSON_OBJECT.finditer(out):
        d = json.loads(m.group(0))
        if d["fashion_mnist"] == "worker":
            workers.append(d)
        elif d["fashion_mnist"] == "result":
            result = d
    if not workers or result is None:
        raise RuntimeError(f"no worker or result line (--json) in the output:\n{out[-3000:]}")
    samples = sum(w["samples"] for w in workers)
    seconds = max(w["seconds"] for w in workers)
    return {"processes": len(workers), "samples": samples, "train_s": seconds,
            "samples_per_s": samples / seconds, "accuracy": result["test_accuracy"],
            "train_cpu_s": sum(w["cpu_s"] for w in workers)}


def children_cpu() -> float:
    """User + system CPU seconds of every descendant waited for so far (shmps-launch waits for
    its server and workers, the example for its processes)."""
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--workers", type=int, default=2, help="processes in every mode (default 2)")
    ap.add_argument("--epochs", type=int, default=4, help="epochs (default 4, the last at a tenth of --lr)")
    ap.add_argument("--batch", type=int, default=32, help="each process's batch (default 32)")
    ap.add_argument("--lr", type=float, default=0.1, help="SGD learning rate (default 0.1)")
    ap.add_argument("--train-samples", type=int, default=0, help="the first N training images only (default all)")
    ap.add_argument("--modes", default=",".join(MODES), help=f"comma-separated, of {', '.join(MODES)} (default all)")
    ap.add_argument("--build", default=str(SOURCE_DIR / "build" / "release"), help="the build (default build/release)")
    ap.add_argument("--log", default="", help="also write every run's output to this file")
    args = ap.parse_args(argv)
    modes = [m for m in args.modes.split(",") if m]
    for m in modes:
        if m not in MODES:
            ap.error(f"unknown mode '{m}': use {', '.join(MODES)}")
    build = Path(args.build).resolve()
    env = dict(os.environ)
    env["PYTHONPATH"] = str(build / "python") + (":" + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    common = ["--epochs", str(args.epochs), "--batch", str(args.batch), "--json", "--log-every", "500"]
    if args.train_samples:
        common += ["--train-samples", str(args.train_samples)]
    log = open(args.log, "w") if args.log else open(os.devnull, "w")
    command = " ".join(shlex.quote(a) for a in [PYTHON, str(Path(__file__).relative_to(SOURCE_DIR))] +
                       (argv if argv is not None else sys.argv[1:]))

    rows = []
    for mode in modes:
        print(f"running {mode} ...", file=sys.stderr, flush=True)
        load_before, cpu_before = load_average(), children_cpu()
        if mode in ("hogwild", "ddp"):
            out, wall = run([PYTHON, EXAMPLE, "--mode", mode, "--workers", str(args.workers), "--lr", str(args.lr),
                             *common], env, log)
        else:
            consistency = mode.split("-")[1]
            name = f"fashion-bench-{os.getpid()}-{consistency}"
            spec = subprocess.run([PYTHON, "-m", "shmps.spec", f"{EXAMPLE}:make_model", "--name", name,
                                   "--optimizer", "sgd", "--lr", str(args.lr), "--consistency", consistency],
                                  env=env, capture_output=True, text=True, check=True).stdout
            spec_path = build / f"{name}.toml"
            spec_path.write_text(spec)
            try:
                out, wall = run([build / "bin" / "shmps-launch", "--spec", spec_path,
                                 "--workers", str(args.workers), "--after", f"{EXAMPLE} --evaluate --json",
                                 "--no-eval", *common, "--", PYTHON, EXAMPLE], env, log)
            finally:
                spec_path.unlink(missing_ok=True)
                subprocess.run([build / "bin" / "shmps-ctl", "destroy", name], stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)
        f = figures(out)
        f["mode"], f["wall_s"], f["load"] = mode, wall, (load_before, load_average())
        f["all_cpu_s"] = children_cpu() - cpu_before
        rows.append(f)
        print(f"  {mode}: {f['samples_per_s']:.0f} samples/s, test accuracy {f['accuracy']:.4f}, {wall:.0f} s",
              file=sys.stderr, flush=True)

    print(f"Fashion-MNIST CNN, {args.epochs} epoch(s) of {args.train_samples or 60000} images, batch {args.batch} a "
          f"process, SGD lr {args.lr:g}{' (a tenth of it in the last epoch)' if args.epochs > 1 else ''}, "
          f"1 torch thread a process, {os.cpu_count()} CPUs")
    print()
    print("| mode | processes | samples/s | test accuracy | training s | training CPU s | all CPU s | wall-clock s "
          "| load average |")
    print("|---|---|---|---|---|---|---|---|---|")
    for f in rows:
        print(f"| {f['mode']} | {f['processes']} | {f['samples_per_s']:,.0f} | {f['accuracy']:.4f} | "
              f"{f['train_s']:.1f} | {f['train_cpu_s']:.1f} | {f['all_cpu_s']:.1f} | {f['wall_s']:.1f} | "
              f"{f['load'][0]:.1f} → {f['load'][1]:.1f} |")
    print()
    print(f"command: {command}")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except (RuntimeError, subprocess.CalledProcessError) as e:
        detail = getattr(e, "stderr", None) or ""
        print(f"fashion_mnist_side_by_side.py: {e}{detail}", file=sys.stderr)
        sys.exit(1)
