#!/usr/bin/python3
"""Trains a small CNN on Fashion-MNIST (real data: docs/workloads.md section 5) with PyTorch, three
ways on the same model, batches and learning rate, so that they can be compared side by side:

    PYTHONPATH=build/release/python /usr/bin/python3 worker/python/examples/fashion_mnist.py [options]

Modes (--mode):
  shmps      (default) a shmps worker, started by shmps-launch with a spec from shmps.spec:
                 /usr/bin/python3 -m shmps.spec worker/python/examples/fashion_mnist.py:make_model \\
                     --name fashion --optimizer sgd --lr 0.1 --consistency asp > fashion.toml
                 build/release/bin/shmps-launch --spec fashion.toml \\
                     --worker worker/python/examples/fashion_mnist.py \\
                     --worker worker/python/examples/fashion_mnist.py \\
                     --after "worker/python/examples/fashion_mnist.py --evaluate" --no-eval
             Each batch: forward and backward on the module, ps.step() (push every .grad and end
             the step), in ASP ps.finish() (until the server has applied that push: see
             --no-wait-own), ps.pull(); the server's optimizer (the spec's) updates the parameters.
             (tools/quickstart fashion-demo runs this.)
  hogwild    --workers N processes (torch.multiprocessing), no server: one model in shared memory
             (model.share_memory()), each process runs its own local SGD optimizer on it with no lock.
  ddp        --workers N processes of torch.distributed (gloo, on localhost) wrapping the model in
             DistributedDataParallel: synchronous, gradients all-reduced every batch.
  --evaluate attach to a running shmps job (any free slot), pull its model and print its test
             accuracy: the --after step of shmps-launch.

The model (make_model, FashionCNN): conv 5x5 1->16, ReLU, max-pool 2; conv 5x5 16->32, ReLU,
max-pool 2; fully connected 1568->128, ReLU, 128->10; softmax cross-entropy averaged over the
batch. No batch-norm, so every value of the model is a parameter the server holds (no local
buffers). Every process builds it from the same seed (--seed); in shmps mode rank 0's values are
put into the job and every rank pulls them.

The schedule, the same in every mode: each epoch is one permutation of the training images
(seeded by --seed and the epoch), cut into whole batches of --batch; of N processes, rank r takes
the batches j = r (mod N), and each process gets the same number (the remainder is dropped, as
DDP needs). An update is lr times the gradient of one batch in every mode: in DDP, which
averages the N processes' gradients, the optimizer's learning rate is N x --lr (the linear
scaling rule), so one synchronous step moves the model by lr x (sum of the N gradients), exactly
as a BSP step of shmps (bsp_aggregate = "sum", the default) or N Hogwild/ASP updates. Plain SGD at
0.1 for 4 epochs, the last at a tenth of it (--last-epoch-lr: the gradients are scaled before the
update, which the server's SGD turns into the same step as a smaller learning rate), reaches a
test accuracy of about 0.91 in every mode (docs/fashion-mnist.md, BENCHMARKS.md).

Every process prints progress (rank, epoch, batch, loss, accuracy, samples/s) every --log-every
batches and at the end of each epoch; the job ends with the test accuracy. --json adds one
machine-readable line per process and per result (tools/bench/fashion_mnist_side_by_side.py).
"""
from __future__ import annotations

import argparse
import ctypes
import importlib.util
import json
import os
import socket
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

PROG = "fashion_mnist.py"
HERE = Path(__file__).resolve().parent
# Standardisation of the inputs: Fashion-MNIST's mean and standard deviation of its training
# pixels (in [0, 1]); plain SGD converges faster on centred inputs.
MEAN, STD = 0.2860, 0.3530


def tune_malloc() -> bool:
    """Keeps glibc's malloc from giving every large tensor its own mmap.

    By default glibc serves an allocation above its mmap threshold (128 KiB, raised only as big
    blocks are freed) with a fresh mmap, and gives it back with munmap when it is freed: every
    batch's activations (a 32-image batch's first convolution alone is 1.6 MB) are then mapped,
    page-faulted in and unmapped again, batch after batch. Page faults are expensive on this VM:
    measured here, the same training loop used 20-45 ms of CPU a batch so, 9-10 ms with these
    settings. Whether a process got the raised threshold depended on its history (Hogwild's spawned
    processes did, the others not), so the modes were not compared on the same footing: every
    process of every mode calls this first. 32 MiB is glibc's largest mmap threshold; the heap is
    trimmed only above 128 MiB of free space at its top. Returns False where it had no effect
    (not glibc)."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # <malloc.h>
        return bool(libc.mallopt(M_MMAP_THRESHOLD, 32 << 20)) and bool(libc.mallopt(M_TRIM_THRESHOLD, 128 << 20))
    except (OSError, AttributeError):
        return False


def _import_data():
    """shmps.fashion_mnist; from the source tree next to this file if the shmps package (with its
    compiled extension) is not importable, or was built before the reader existed, so that hogwild
    and ddp run without a build."""
    try:
        from shmps import fashion_mnist
        return fashion_mnist
    except ImportError:
        path = HERE.parent / "shmps" / "fashion_mnist.py"
        spec = importlib.util.spec_from_file_location("shmps_fashion_mnist", path)
        if spec is None or not path.exists():
            raise
        mod = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = mod
        spec.loader.exec_module(mod)
        return mod


data = _import_data()


# ---- the model --------------------------------------------------------------------------------

class FashionCNN(torch.nn.Module):
    """Two convolution + max-pooling layers, then two fully connected ones (about 0.916 test
    accuracy is published for this kind of model).

    fc1 is an nn.Linear (its parameters fc1.weight [128, 1568] and fc1.bias, as the spec and
    state_dict name them), but its product is computed as a 1x1 convolution, which PyTorch runs
    with oneDNN: Debian's torch does its matrix products with the generic reference BLAS, several
    times slower (see train_mlp_torch.py). Same arithmetic, different float rounding."""

    def __init__(self):
        super().__init__()
        self.conv1 = torch.nn.Conv2d(1, 16, kernel_size=5, padding=2)   # 16 x 28 x 28 -> pool 16 x 14 x 14
        self.conv2 = torch.nn.Conv2d(16, 32, kernel_size=5, padding=2)  # 32 x 14 x 14 -> pool 32 x 7 x 7
        self.fc1 = torch.nn.Linear(32 * 7 * 7, 128)
        self.fc2 = torch.nn.Linear(128, 10)
        self.onednn = torch.backends.mkldnn.is_available()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.max_pool2d(F.relu(self.conv1(x)), 2)
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)
        b = x.shape[0]
        if self.onednn:
            w = self.fc1.weight
            h = F.conv2d(x.reshape(b, -1, 1, 1), w.view(w.shape[0], w.shape[1], 1, 1), self.fc1.bias).view(b, -1)
        else:
            h = self.fc1(x.reshape(b, -1))
        return self.fc2(F.relu(h))


def make_model(seed: int = 0) -> FashionCNN:
    """The factory for shmps.spec (`fashion_mnist.py:make_model`) and for every mode: the same
    initial values in every process for a seed. The global RNG is left as it was."""
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return FashionCNN()


# ---- data and schedule ------------------------------------------------------------------------

class Data:
    """The images as float32 [N, 1, 28, 28], standardised, and the labels as int64."""

    def __init__(self, split: str, limit: int = 0):
        images, labels = data.load(split)
        if limit:
            images, labels = images[:limit], labels[:limit]
        self.x = torch.from_numpy((data.normalized(images) - MEAN) / STD)
        self.y = torch.from_numpy(labels.astype(np.int64))

    def __len__(self) -> int:
        return len(self.y)


def epoch_batches(n: int, batch: int, workers: int, rank: int, epoch: int, seed: int) -> list[np.ndarray]:
    """This rank's batches of one epoch (indices into the training set): the batches j = rank
    (mod workers) of a permutation seeded by (seed, epoch), every rank the same number."""
    order = np.random.default_rng([seed, epoch]).permutation(n)
    whole = batches_per_worker(n, batch, workers) * workers
    return [order[j * batch:(j + 1) * batch] for j in range(rank, whole, workers)]


def batches_per_worker(n: int, batch: int, workers: int) -> int:
    """Whole batches only, and the same count for every rank (DDP's all-reduce needs every rank at
    every step): the last n mod (batch x workers) images of an epoch's order are left out."""
    return n // batch // workers


class Progress:
    """Running loss and accuracy since the last line, and the samples/s since the start."""

    def __init__(self, rank: int, workers: int, epochs: int, per_epoch: int, every: int):
        self.tag = f"rank {rank}/{workers}"
        self.epochs, self.per_epoch, self.every = epochs, per_epoch, every
        self.samples = 0
        self.batches = 0
        self.loss_sum, self.correct, self.seen = 0.0, 0, 0
        self.t0 = time.monotonic()
        self.cpu0 = time.process_time()  # CPU time, as a measure that other programs' load moves less

    def add(self, epoch: int, k: int, loss: torch.Tensor, logits: torch.Tensor, y: torch.Tensor) -> None:
        b = len(y)
        self.samples += b
        self.batches += 1
        self.loss_sum += float(loss) * b
        self.correct += int((logits.detach().argmax(dim=1) == y).sum())
        self.seen += b
        if k % self.every == 0 or k == self.per_epoch:
            secs = time.monotonic() - self.t0
            say(f"{self.tag} epoch {epoch + 1}/{self.epochs} batch {k}/{self.per_epoch} "
                f"loss {self.loss_sum / self.seen:.4f} acc {self.correct / self.seen:.4f} "
                f"{self.samples / secs if secs > 0 else 0.0:.0f} samples/s")
            self.loss_sum, self.correct, self.seen = 0.0, 0, 0

    def seconds(self) -> float:
        return time.monotonic() - self.t0

    def cpu_seconds(self) -> float:
        """CPU time of this whole process (all its threads) since the start of training."""
        return time.process_time() - self.cpu0


def train(model: torch.nn.Module, train_set: Data, args, workers: int, rank: int, after_backward) -> Progress:
    """This rank's schedule: forward, backward, then `after_backward()` (a local optimizer step,
    or a push and a pull)."""
    per_epoch = batches_per_worker(len(train_set), args.batch, workers)
    if per_epoch == 0:
        raise ValueError(f"{len(train_set)} training images make no batch of {args.batch} for each of {workers} "
                         f"processes: lower --batch or raise --train-samples")
    prog = Progress(rank, workers, args.epochs, per_epoch, args.log_every)
    for epoch in range(args.epochs):
        factor = lr_factor(args, epoch)
        for k, idx in enumerate(epoch_batches(len(train_set), args.batch, workers, rank, epoch, args.seed), 1):
            ti = torch.from_numpy(idx)
            x, y = train_set.x[ti], train_set.y[ti]
            model.zero_grad(set_to_none=True)
            logits = model(x)
            loss = F.cross_entropy(logits, y)
            loss.backward()
            if factor != 1.0:
                # The schedule, the same way in every mode: the server's SGD (and the local one)
                # applies lr x the gradient it is given, so scaling the gradient scales the step.
                with torch.no_grad():
                    for p in model.parameters():
                        if p.grad is not None:
                            p.grad.mul_(factor)
            after_backward()
            prog.add(epoch, k, loss, logits, y)
    return prog


def lr_factor(args, epoch: int) -> float:
    """The learning rate's factor in this epoch: --last-epoch-lr in the last epoch of two or more
    (a constant learning rate leaves SGD wandering about its minimum: a last epoch at a tenth of
    it settles there, about +1 point of test accuracy here), else 1."""
    return args.last_epoch_lr if args.epochs > 1 and epoch == args.epochs - 1 else 1.0


def evaluate(model: torch.nn.Module, test_set: Data, chunk: int = 100) -> tuple[float, float]:
    """(mean loss, accuracy) over the test set, in chunks of 100 images: a layer's activations
    (5 MB) stay under tune_malloc's mmap threshold."""
    loss_sum, correct = 0.0, 0
    with torch.no_grad():
        for i in range(0, len(test_set), chunk):
            z = model(test_set.x[i:i + chunk])
            y = test_set.y[i:i + chunk]
            loss_sum += float(F.cross_entropy(z, y, reduction="sum"))
            correct += int((z.argmax(dim=1) == y).sum())
    return loss_sum / len(test_set), correct / len(test_set)


def print_trained(rank: int, workers: int, prog: Progress, seconds: float) -> None:
    rate = prog.samples / seconds if seconds > 0 else 0.0
    say(f"rank {rank}/{workers} trained {prog.batches} batches, {prog.samples} samples in {seconds:.2f} s: "
        f"{rate:.0f} samples/s")


def print_result(args, mode: str, processes: int | None, loss: float, accuracy: float, samples: int | None = None,
                 seconds: float | None = None) -> None:
    line = f"test accuracy {accuracy:.4f} loss {loss:.4f} ({args.test_samples or 10000} test images; {mode}"
    if processes:
        line += f", {processes} processes"
    if samples is not None and seconds:
        line += f"; {samples} training samples in {seconds:.2f} s: {samples / seconds:.0f} samples/s"
    print(line + ")", flush=True)
    if args.json:
        emit_json(kind="result", mode=mode, processes=processes, test_accuracy=round(accuracy, 4),
                  test_loss=round(loss, 4), test_images=args.test_samples or 10000, samples=samples,
                  seconds=None if seconds is None else round(seconds, 3),
                  samples_per_s=None if not seconds or samples is None else round(samples / seconds, 1))


def say(line: str) -> None:
    """A line to stdout in one write with its newline: the processes of hogwild and ddp share the
    same stdout, and print() writes the line and its end separately, so two lines could mix."""
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


def emit_json(**fields) -> None:
    """One line the bench reads: {"fashion_mnist": kind, ...}."""
    kind = fields.pop("kind")
    say(json.dumps({"fashion_mnist": kind, **fields}))


def describe(args, workers: int, mode: str, lr_note: str = "") -> str:
    return (f"{mode}: {workers} processes, {args.epochs} epoch(s) of {args.train_samples or 60000} images, "
            f"batch {args.batch}, SGD lr {args.lr:g}{f' momentum {args.momentum:g}' if args.momentum else ''}"
            f"{lr_note}{schedule(args)}, {args.threads} thread(s) a process, seed {args.seed}")


def schedule(args) -> str:
    return f" (x{args.last_epoch_lr:g} in the last epoch)" if lr_factor(args, args.epochs - 1) != 1.0 else ""


# ---- hogwild ----------------------------------------------------------------------------------

def _hogwild_worker(rank: int, workers: int, model: FashionCNN, args, ready, go, results) -> None:
    torch.set_num_threads(args.threads)
    train_set = Data("train", args.train_samples)
    # Its own optimizer (and momentum buffers, if any) over the shared parameters: the step
    # writes them in place, with no lock, while the other processes read and write them too.
    opt = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=args.momentum)
    ready.put(rank)
    go.wait()
    prog = train(model, train_set, args, workers, rank, opt.step)
    seconds = prog.seconds()
    print_trained(rank, workers, prog, seconds)
    if args.json:
        emit_json(kind="worker", mode="hogwild", rank=rank, samples=prog.samples, seconds=round(seconds, 3),
                  cpu_s=round(prog.cpu_seconds(), 3))
    results.put((rank, prog.samples, seconds))


def _child(target, malloc: bool, rank: int, *rest) -> None:
    """A spawned process's body: malloc as in the parent (tune_malloc), and our own errors (the
    data's) as one line, not a traceback."""
    if malloc:
        tune_malloc()
    try:
        target(rank, *rest)
    except (ValueError, FileNotFoundError) as e:
        print(f"{PROG}: rank {rank}: {e}", file=sys.stderr, flush=True)
        sys.exit(1)


def wait_ready(procs, ready, what: str) -> None:
    """Until every process has put itself in `ready`; a process that died before raises (instead
    of the others waiting for it for ever)."""
    import queue
    pending = len(procs)
    while pending:
        try:
            ready.get(timeout=1.0)
            pending -= 1
        except queue.Empty:
            if any(p.exitcode not in (None, 0) for p in procs):
                for p in procs:
                    p.kill()
                    p.join()
                raise RuntimeError(f"a {what} process failed before training (exit codes "
                                   f"{[p.exitcode for p in procs]}); its error is above")


def run_hogwild(args) -> None:
    mp = torch.multiprocessing.get_context("spawn")  # not fork: the parent's torch threads are not fork-safe
    model = make_model(args.seed)
    model.share_memory()  # the parameters move to shared memory, where every process writes them
    print(describe(args, args.workers, "hogwild"), flush=True)
    ready, go, results = mp.Queue(), mp.Event(), mp.SimpleQueue()
    procs = [mp.Process(target=_child, args=(_hogwild_worker, not args.default_malloc, r, args.workers, model, args,
                                             ready, go, results))
             for r in range(args.workers)]
    for p in procs:
        p.start()
    wait_ready(procs, ready, "Hogwild")
    go.set()  # every process started, its data loaded: the clocks start
    for p in procs:
        p.join()
    if any(p.exitcode != 0 for p in procs):
        raise RuntimeError(f"a Hogwild process failed (exit codes {[p.exitcode for p in procs]})")
    got = [results.get() for _ in procs]
    # The training time as in the other modes: the slowest process's loop, from the moment every
    # process was ready (not counting the processes' exit).
    samples, seconds = sum(s for _, s, _ in got), max(t for _, _, t in got)
    loss, acc = evaluate(model, Data("test", args.test_samples))
    print_result(args, "hogwild", args.workers, loss, acc, samples, seconds)


# ---- ddp --------------------------------------------------------------------------------------

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ddp_worker(rank: int, workers: int, port: int, args) -> None:
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    torch.set_num_threads(args.threads)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=workers)
    try:
        train_set = Data("train", args.train_samples)
        model = make_model(args.seed)
        ddp = DistributedDataParallel(model)  # broadcasts rank 0's values (the same anyway: same seed)
        # DDP averages the gradients of the N processes; N x lr makes a step lr x their sum, the
        # update of a BSP step or of N Hogwild/ASP updates (see the top of this file).
        opt = torch.optim.SGD(ddp.parameters(), lr=args.lr * workers, momentum=args.momentum)
        dist.barrier()  # every process set up: the clock starts
        prog = train(ddp, train_set, args, workers, rank, opt.step)
        dist.barrier()  # until the last process ends (they run in lock step: a few ms)
        seconds, cpu = prog.seconds(), prog.cpu_seconds()
        print_trained(rank, workers, prog, seconds)
        if args.json:
            emit_json(kind="worker", mode="ddp", rank=rank, samples=prog.samples, seconds=round(seconds, 3),
                      cpu_s=round(cpu, 3))
        if rank == 0:
            # Every rank holds the same model after each synchronous step: rank 0 scores it.
            loss, acc = evaluate(model, Data("test", args.test_samples))
            print_result(args, "ddp", workers, loss, acc, prog.samples * workers, seconds)
    finally:
        dist.destroy_process_group()


def run_ddp(args) -> None:
    mp = torch.multiprocessing.get_context("spawn")
    port = _free_port()  # a race with another program taking it is possible, and then reported by gloo
    print(describe(args, args.workers, "ddp", f" (x{args.workers} in the optimizer: DDP averages the gradients)"),
          flush=True)
    procs = [mp.Process(target=_child, args=(_ddp_worker, not args.default_malloc, r, args.workers, port, args))
             for r in range(args.workers)]
    for p in procs:
        p.start()
    # A process that fails leaves the others waiting for it in a collective (gloo's timeout is
    # 30 minutes): stop them all then.
    while any(p.is_alive() for p in procs):
        if any(p.exitcode not in (None, 0) for p in procs):
            for p in procs:
                p.kill()
            break
        time.sleep(0.2)
    for p in procs:
        p.join()
    if any(p.exitcode != 0 for p in procs):
        raise RuntimeError(f"a DDP process failed (exit codes {[p.exitcode for p in procs]}); its error is above")


# ---- shmps ------------------------------------------------------------------------------------

def import_shmps_torch():
    """shmps.torch, from the release build next to this checkout if shmps is not on the path."""
    try:
        try:
            import shmps
        except ImportError:  # run straight from a checkout: the release build's package
            sys.path.insert(0, str(HERE.parents[2] / "build" / "release" / "python"))
            sys.modules.pop("shmps", None)
            import shmps
        shmps.Worker
        import shmps.torch
    except (ImportError, AttributeError) as e:
        raise ValueError(f"shmps.torch is not importable ({e}): build shmps and run with "
                         f"PYTHONPATH=build/release/python, or train without a server with --mode hogwild "
                         f"or --mode ddp") from e
    return shmps


def world_size_from_env() -> int:
    s = os.environ.get("SHMPS_WORLD_SIZE", "")
    if s == "":
        return 1
    if not s.isdigit() or int(s) == 0:
        raise ValueError(f"SHMPS_WORLD_SIZE='{s}' is not a positive integer; unset it or pass --workers")
    return int(s)


def run_shmps(args) -> None:
    shmps = import_shmps_torch()
    train_set = Data("train", args.train_samples)
    model = make_model(args.seed)
    w = shmps.Worker(segment=args.segment or None, rank=args.rank, timeout=args.timeout)
    try:
        workers = args.workers_given or world_size_from_env()
        if w.rank < 0 or w.rank >= workers:
            raise ValueError(f"worker slot {w.rank} is not below the number of workers {workers}; "
                             f"pass --workers (or set SHMPS_WORLD_SIZE)")
        # With server groups the slot is the rank within the group; the data shard follows the
        # rank in the whole job.
        rank = int(os.environ.get("SHMPS_GLOBAL_RANK", w.rank))
        # Rank 0 puts its module's values (the spec's init = "put"), every rank pulls them.
        ps = shmps.torch.ParameterServer(model, worker=w)
        print(f"segment {w.segment} ({w.consistency}), rank {rank}/{workers}: {args.epochs} epoch(s) of "
              f"{len(train_set)} images, batch {args.batch}, "
              f"{batches_per_worker(len(train_set), args.batch, workers)} batches an epoch; the server's "
              f"optimizer{schedule(args)}", flush=True)
        # BSP from the start: every worker in step 0, however late its process starts (else the
        # first one up could end step 0 alone).
        if w.consistency == "bsp" and w.current_clock == 0:
            joining = min(workers, int(os.environ.get("SHMPS_GROUP_SIZE", workers)))
            print(f"rank {rank}/{workers} waiting for all {joining} workers to join step 0", flush=True)
            w.wait_for_workers(joining, timeout=120.0)

        spent = {"step": 0.0, "wait": 0.0, "pull": 0.0}  # seconds in ps.step(), ps.finish(), ps.pull()

        def push_and_pull():
            # Push every .grad and end the step (the server applies its optimizer), then pull
            # the values for the next batch (in BSP: once every worker has ended this step).
            t0 = time.monotonic()
            ps.step()
            t1 = time.monotonic()
            spent["step"] += t1 - t0
            if not args.no_wait_own and w.consistency != "bsp":
                # ASP: wait until the server has applied this worker's own push before the pull,
                # so that its next gradient is taken on values that include its last update, as a
                # Hogwild process's own step is in place at once (the others' may still be
                # missing, in both). An ASP pull does not wait for it otherwise, and the gradient
                # after it then misses the worker's own last step more often than not: 0.903-0.906
                # test accuracy in three runs here, 0.909 with the wait. A BSP pull waits anyway.
                ps.finish()
            t2 = time.monotonic()
            spent["wait"] += t2 - t1
            ps.pull()
            spent["pull"] += time.monotonic() - t2

        prog = train(model, train_set, args, workers, rank, push_and_pull)
        seconds, cpu = prog.seconds(), prog.cpu_seconds()
        ps.finish()  # every push of this worker applied
        result = None
        if rank == 0 and not args.no_eval:
            # In ASP the others may still be ending their last batches: the --evaluate step after
            # the job scores the final model. own_copy(): in BSP the module's parameters are views
            # of the segment, which go with the worker.
            ps.own_copy()
            result = evaluate(model, Data("test", args.test_samples))
    finally:
        w.leave()  # done: the others no longer wait for this worker
    print_trained(rank, workers, prog, seconds)
    # A push waits while the worker's ring is full, until the server has applied earlier pushes;
    # a BSP pull waits for the other workers' step: the time the job, not the model, costs.
    total = sum(spent.values())
    say(f"rank {rank}/{workers} in ps.step() (push, clock) {spent['step']:.2f} s, ps.finish() {spent['wait']:.2f} s, "
        f"ps.pull() {spent['pull']:.2f} s: {total / seconds * 100 if seconds > 0 else 0:.0f}% of its training time")
    if args.json:
        emit_json(kind="worker", mode="shmps", rank=rank, samples=prog.samples, seconds=round(seconds, 3),
                  cpu_s=round(cpu, 3), step_s=round(spent["step"], 3), wait_s=round(spent["wait"], 3),
                  pull_s=round(spent["pull"], 3))
    if result is not None:
        print(f"rank 0 at its end: test accuracy {result[1]:.4f} loss {result[0]:.4f}"
              f"{'' if w.consistency == 'bsp' else ' (the others may still be ending their last batches)'}",
              flush=True)


def run_evaluate(args) -> None:
    shmps = import_shmps_torch()
    if args.rank < 0:
        os.environ.pop("SHMPS_RANK", None)  # any free slot: SHMPS_RANK belongs to a training worker
    test_set = Data("test", args.test_samples)
    model = make_model(args.seed)
    w = shmps.Worker(segment=args.segment or None, rank=args.rank, timeout=args.timeout)
    try:
        consistency = w.consistency
        # put=False: the job's values are what is scored, even if this slot happens to be 0.
        ps = shmps.torch.ParameterServer(model, worker=w, put=False)
        ps.own_copy()  # values of the module's own (in BSP the pull gave views of the segment)
    finally:
        w.leave()
    loss, acc = evaluate(model, test_set)
    print_result(args, f"shmps {consistency}", args.workers_given or None, loss, acc)


# ---- command line -----------------------------------------------------------------------------

def parse_args(argv):
    ap = argparse.ArgumentParser(
        prog=PROG, description="Fashion-MNIST with a small CNN: as shmps workers, or PyTorch Hogwild or DDP "
                               "(the same model, batches and learning rate)")
    ap.add_argument("--mode", choices=("shmps", "hogwild", "ddp"), default="shmps",
                    help="shmps: a worker of a shmps job (shmps-launch); hogwild or ddp: --workers processes "
                         "of PyTorch alone (default shmps)")
    ap.add_argument("--evaluate", action="store_true",
                    help="score the model of a running shmps job on the test set (the --after step of shmps-launch)")
    ap.add_argument("--workers", type=int, default=0,
                    help="processes: hogwild and ddp start this many (default 2); shmps: the workers sharing the "
                         "schedule (default $SHMPS_WORLD_SIZE, which shmps-launch sets)")
    ap.add_argument("--epochs", type=int, default=4, help="passes over the training images (default 4)")
    ap.add_argument("--batch", type=int, default=32, help="images a batch, each process's batches (default 32)")
    ap.add_argument("--lr", type=float, default=0.1,
                    help="SGD learning rate of hogwild and ddp (shmps: the spec's optimizer has it; give the "
                         "same to shmps.spec; default 0.1)")
    ap.add_argument("--last-epoch-lr", type=float, default=0.1,
                    help="the last epoch's learning rate, as a fraction of --lr (every mode, shmps included: "
                         "the gradients are scaled; default 0.1, 1 for a constant rate; not with --epochs 1)")
    ap.add_argument("--momentum", type=float, default=0.0, help="SGD momentum of hogwild and ddp (default 0)")
    ap.add_argument("--train-samples", type=int, default=0,
                    help="train on the first N training images only (default: all 60000)")
    ap.add_argument("--test-samples", type=int, default=0,
                    help="score on the first N test images only (default: all 10000)")
    ap.add_argument("--seed", type=int, default=0, help="initial values and data order (default 0)")
    ap.add_argument("--log-every", type=int, default=200, help="a progress line every N batches (default 200)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads a process (default 1: one core each)")
    ap.add_argument("--default-malloc", action="store_true",
                    help="leave glibc's malloc settings as they are (see tune_malloc: each large tensor then gets "
                         "an mmap of its own, about 2-3x the CPU a batch on this machine)")
    ap.add_argument("--json", action="store_true", help="also print machine-readable result lines (JSON)")
    ap.add_argument("--no-wait-own", action="store_true",
                    help="shmps, ASP: pull at once after the push, without waiting until the server has applied "
                         "it (by default a worker's next gradient is taken on values with its own last step)")
    ap.add_argument("--no-eval", action="store_true",
                    help="shmps: rank 0 does not score the model at its end (use --evaluate after the job)")
    ap.add_argument("--segment", default="", help="shmps: job segment name (default $SHMPS_SEGMENT)")
    ap.add_argument("--rank", type=int, default=-1,
                    help="shmps: worker slot (default $SHMPS_RANK, else the first free slot)")
    ap.add_argument("--timeout", type=float, default=60.0,
                    help="shmps: seconds a push, pull or wait may block before failing (default 60)")
    args = ap.parse_args(argv)
    for name in ("epochs", "batch", "threads", "log_every"):
        if getattr(args, name) <= 0:
            ap.error(f"--{name.replace('_', '-')} must be positive")
    if not 0 < args.last_epoch_lr <= 1:
        ap.error("--last-epoch-lr must be in (0, 1]")
    if (args.workers < 0 or args.train_samples < 0 or args.test_samples < 0 or args.lr <= 0 or args.momentum < 0
            or args.rank < -1):
        ap.error("--workers, --train-samples, --test-samples and --momentum must not be negative, --lr must be "
                 "positive, --rank -1 or more")
    if args.train_samples > data.COUNTS["train"] or args.test_samples > data.COUNTS["test"]:
        ap.error(f"--train-samples, --test-samples: the training set has {data.COUNTS['train']} images, the test "
                 f"set {data.COUNTS['test']}")
    args.workers_given = args.workers
    if args.mode != "shmps" and args.workers == 0:
        args.workers = 2
    if args.mode == "shmps" and not args.evaluate and not (args.segment or os.environ.get("SHMPS_SEGMENT")):
        ap.error("no job to join: start it with shmps-launch (see the top of this file), pass --segment NAME, or "
                 "train without a server with --mode hogwild or --mode ddp")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if not args.default_malloc:
        tune_malloc()
    torch.set_num_threads(args.threads)
    try:
        if args.evaluate:
            run_evaluate(args)
        elif args.mode == "hogwild":
            run_hogwild(args)
        elif args.mode == "ddp":
            run_ddp(args)
        else:
            run_shmps(args)
    except (ValueError, FileNotFoundError, RuntimeError) as e:  # our own checks, the data's, a failed process
        print(f"{PROG}: {e}", file=sys.stderr)
        return 1
    except Exception as e:
        shmps = sys.modules.get("shmps")
        if shmps is not None and isinstance(e, getattr(shmps, "Error", ())):
            print(f"{PROG}: {e}", file=sys.stderr)
            return 1
        raise
    return 0


if __name__ == "__main__":
    sys.exit(main())
