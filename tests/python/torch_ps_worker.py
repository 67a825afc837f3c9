#!/usr/bin/python3
"""Worker processes for test_torch_ps.py: a module bound to a job with shmps.torch.ParameterServer.

  torch_ps_worker.py init --seed S
      builds the test module with seed S, binds it (rank 0 puts, the others wait for its put),
      and prints the values it then holds as one line `values <sha256>`.
  torch_ps_worker.py train --seed S --steps N [--loader-workers K]
      as init, then N steps on its own batches from a DataLoader with K worker processes,
      then waits until its pushes are applied; prints `trained <steps>`.
  torch_ps_worker.py wait-forever
      attaches and pulls a parameter nobody puts (init = "put"), with a long timeout: a wait
      for Ctrl-C to interrupt. Prints `waiting` first.

Segment and rank come from SHMPS_SEGMENT / SHMPS_RANK.
"""

import argparse
import hashlib
import sys

import torch
import torch.utils.data

import shmps
import shmps.torch
from torch_ps_model import batches, make_model


def digest(model):
    h = hashlib.sha256()
    for _, p in model.named_parameters():
        h.update(p.detach().contiguous().numpy().tobytes())
    return h.hexdigest()


class Batches(torch.utils.data.Dataset):
    def __init__(self, seed, count):
        self.items = list(batches(seed, count))

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        return self.items[i]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("mode", choices=["init", "train", "wait-forever"])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--steps", type=int, default=0)
    ap.add_argument("--loader-workers", type=int, default=0)
    args = ap.parse_args()
    torch.set_num_threads(1)
    if args.mode == "wait-forever":
        w = shmps.Worker(timeout=600.0)
        print("waiting", flush=True)
        w.pull("fc.weight")
        return 1  # never reached: nobody puts it
    model = make_model(args.seed)
    ps = shmps.torch.ParameterServer(model)
    print(f"values {digest(model)}", flush=True)
    if args.mode == "train":
        loader = torch.utils.data.DataLoader(Batches(100 + ps.rank, args.steps), batch_size=None,
                                             num_workers=args.loader_workers)
        steps = 0
        for x, ids, offsets, y in loader:
            ps.zero_grad()
            torch.nn.functional.cross_entropy(model(x, ids, offsets), y).backward()
            ps.step()
            ps.pull()
            steps += 1
        ps.finish()
        print(f"trained {steps}", flush=True)
    ps.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
