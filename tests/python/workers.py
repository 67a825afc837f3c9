#!/usr/bin/python3
"""Python worker processes for the tests: the Python twins of shmps-test-pusher's modes.

  workers.py exact --pushes K [--slow-ms X]
      pushes the pattern gradients (conftest.pattern / tests/support/pattern.hpp) up to push K,
      continuing after the last push its slot committed (push k has sequence number k + 1,
      whatever generation committed it), then waits until they are applied.
  workers.py fork-holder
      attaches, forks a child that sleeps (as a DataLoader worker would), prints both pids and
      sleeps: a parent to be SIGKILLed while its forked child lives on.
  workers.py steps --workers P --steps B [--slow-ms X] [--check]
      BSP: B steps of pull "w" and "b", push the pattern of (rank, step) to the whole of each,
      save_state(next step) and clock(). Starts at the step its slot's resume state names, so a
      restarted process continues its predecessor's schedule. --check: before step t the pulled
      values must equal minus the sum of every rank's gradients of the steps before t.

Segment and rank come from SHMPS_SEGMENT / SHMPS_RANK. Exit code 0 on success.
"""

import argparse
import os
import struct
import sys
import time

import numpy as np

import shmps
from exact import pattern, plan_push


def exact(w, args):
    rank = w.rank
    print(f"attached: rank {rank} generation {w.generation} published {w.published()}", flush=True)
    last = w.published()
    for k in range(w.published(), args.pushes):
        name, offset, count = plan_push(rank, k)
        last = w.push(name, pattern(rank, k, offset, count), offset=offset)
        if args.slow_ms:
            time.sleep(args.slow_ms / 1000)
    if last:
        w.wait_applied(last)
    print(f"rank {rank} generation {w.generation} pushed {last} applied {w.applied()}", flush=True)
    return 0


def steps(w, args):
    rank, sizes = w.rank, {p.name: p.size for p in w.params()}
    state = w.load_state()
    first_step = struct.unpack("<Q", state)[0] if len(state) == 8 else 0  # as shmps-test-pusher --resume
    print(f"rank {rank} generation {w.generation} starts at step {first_step}", flush=True)
    want = {name: np.zeros(size, np.float64) for name, size in sizes.items()}
    for k in range(first_step):
        for r in range(args.workers):
            for name in want:
                want[name] -= pattern(r, k, 0, sizes[name])
    pulled = {name: np.empty(size, np.float32) for name, size in sizes.items()}
    wrong_steps, last = 0, 0
    for k in range(first_step, args.steps):
        for name in ("w", "b"):
            w.pull(name, out=pulled[name])
        if args.check:
            wrong = sum(int(np.count_nonzero(pulled[n].astype(np.float64) != want[n])) for n in want)
            if wrong:
                wrong_steps += 1
                print(f"step {k}: {wrong} values differ from the exact sum", flush=True)
            for r in range(args.workers):
                for name in want:
                    want[name] -= pattern(r, k, 0, sizes[name])
        for name in ("w", "b"):
            last = w.push(name, pattern(rank, k, 0, sizes[name]))
        w.save_state(struct.pack("<Q", k + 1))
        w.clock()
        print(f"step {k} done", flush=True)
        if args.slow_ms:
            time.sleep(args.slow_ms / 1000)
    if last:
        w.wait_applied(last)
    print(f"rank {rank} steps {args.steps} first_step {first_step} wrong_steps {wrong_steps}", flush=True)
    return 0 if wrong_steps == 0 else 1


def fork_holder(w, args):
    child = os.fork()
    if child == 0:
        time.sleep(120)
        os._exit(0)
    print(f"parent {os.getpid()} child {child} rank {w.rank}", flush=True)
    time.sleep(120)
    return 0


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("mode", choices=["exact", "steps", "fork-holder"])
    parser.add_argument("--pushes", type=int, default=0)
    parser.add_argument("--steps", type=int, default=0)
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--slow-ms", type=float, default=0)
    parser.add_argument("--check", action="store_true")
    args = parser.parse_args()
    try:
        with shmps.Worker() as w:
            return {"exact": exact, "steps": steps, "fork-holder": fork_holder}[args.mode](w, args)
    except shmps.Error as e:
        print(f"workers.py: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
