#!/usr/bin/python3
"""Trains the reference MLP with PyTorch as a shmps worker: the Python twin of shmps-worker.

    PYTHONPATH=build/release/python /usr/bin/python3 worker/python/examples/train_mlp_torch.py [options]

The model, data, schedule and output are those of worker/trainer/main.cpp
(docs/workloads.md): the 784-256-10 MLP (Linear, ReLU, Linear, softmax
cross-entropy averaged over the batch) on the reference synthetic data; worker r of P takes the
global batches j = r (mod P). Per batch it reads the four parameters (BSP: the module's parameters
are the segment's values themselves, through Worker.view, with no private copy; ASP and SSP: a
pull straight into the module's own parameter storage), runs forward and backward, pushes the
four gradients and ends its step with save_state(cursor) and clock(); the server applies its
optimizer. The cursor has the same bytes
as shmps-worker's, so C++ and Python workers can share a job, and a restarted slot continues
where its previous process stopped, in either language.

Started by shmps-launch it needs no arguments ($SHMPS_SEGMENT, $SHMPS_RANK, $SHMPS_WORLD_SIZE):

    shmps-launch --spec models/mlp.toml --workers 2 --after "shmps-worker --evaluate" \\
        -- /usr/bin/python3 worker/python/examples/train_mlp_torch.py

--local trains with no parameter server: plain SGD on a local module, the single-process
reference, to compare with `shmps-worker --local`.
"""
from __future__ import annotations

import argparse
import importlib.util
import os
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F


def _import_reference():
    """shmps.reference; from the source tree next to this file if the shmps package (with its
    compiled extension) is not importable, so that --local runs without a build."""
    try:
        from shmps import reference
        return reference
    except ImportError:
        path = Path(__file__).resolve().parent.parent / "shmps" / "reference.py"
        spec = importlib.util.spec_from_file_location("shmps_reference", path)
        if spec is None or not path.exists():
            raise
        mod = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = mod  # dataclasses look their module up there
        spec.loader.exec_module(mod)
        return mod


ref = _import_reference()
PROG = "train_mlp_torch.py"


class MLP(torch.nn.Module):
    """784-256-10: Linear, ReLU, Linear. The parameters are those of nn.Linear (weight[out, in],
    row-major, contiguous) named fc1.weight, fc1.bias, fc2.weight, fc2.bias: the segment's
    parameters (models/mlp.toml) with the same shapes and layout, so a pull can write straight
    into them and their gradients can be pushed as they are.

    onednn: compute fc1 as a 1x1 convolution, which PyTorch runs with oneDNN. The same
    arithmetic (the results differ only in float rounding), but Debian's torch does its matrix
    products with the generic reference BLAS, about 5x slower here for training and 13x for
    evaluation. fc2 (1% of the work) stays a plain linear layer either way."""

    def __init__(self, onednn: bool = True):
        super().__init__()
        self.fc1 = torch.nn.Linear(ref.FEATURES, ref.HIDDEN)
        self.fc2 = torch.nn.Linear(ref.HIDDEN, ref.CLASSES)
        self.onednn = onednn

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.onednn:
            b = x.shape[0]
            w = self.fc1.weight
            h = F.conv2d(x.view(b, -1, 1, 1), w.view(w.shape[0], w.shape[1], 1, 1), self.fc1.bias).view(b, -1)
        else:
            h = self.fc1(x)
        return self.fc2(torch.relu(h))

    def named(self) -> list[tuple[str, torch.nn.Parameter]]:
        """The parameters in the order used everywhere (pull/push, weights hash, checkpoints)."""
        params = dict(self.named_parameters())
        return [(name, params[name]) for name, _ in ref.PARAMS]

    def load_reference_init(self) -> None:
        """The reference initial model (docs/workloads.md section 2), as shmps-worker --local starts."""
        init = ref.reference_init()
        with torch.no_grad():
            for name, p in self.named():
                p.copy_(torch.from_numpy(init[name]))

    def bind(self, tensors: dict[str, torch.Tensor]) -> None:
        """Make these tensors (of the parameters' shapes) the module's parameters, sharing their
        memory: no copy."""
        for name, tensor in tensors.items():
            layer, attr = name.split(".")
            setattr(getattr(self, layer), attr, torch.nn.Parameter(tensor))

    def numpy_params(self) -> dict[str, np.ndarray]:
        """The parameters as numpy arrays sharing the module's storage."""
        return {name: p.detach().numpy() for name, p in self.named()}


def loss_and_correct(logits: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Mean softmax cross-entropy over the batch, and the rows whose first argmax of the logits
    is the label (as mlp.cpp)."""
    loss = F.cross_entropy(logits, y)
    correct = int((logits.detach().argmax(dim=1) == y).sum())
    return loss, correct


def evaluate(model: MLP, first: int, count: int, chunk: int = 4096) -> "ref.EvalResult":
    """Loss and accuracy over the data rows first .. first+count-1, as mlp::evaluate."""
    loss_sum, correct = 0.0, 0
    with torch.no_grad():
        for _, x, y in ref.chunks(first, count, chunk):
            z = model(torch.from_numpy(x))
            yt = torch.from_numpy(y)
            loss_sum += float(F.cross_entropy(z, yt, reduction="sum").double())
            correct += int((z.argmax(dim=1) == yt).sum())
    if count == 0:
        return ref.EvalResult(0.0, 0.0, 0)
    return ref.EvalResult(loss_sum / count, correct / count, count)


class TrainStats:
    def __init__(self):
        self.batches = 0
        self.samples = 0
        self.seconds = 0.0
        # Running figures over the last epoch this worker trained in (mean over its samples).
        self.last_epoch_loss = 0.0
        self.last_epoch_acc = 0.0
        self.last_epoch_samples = 0
        self.batches_done = 0  # of this worker's schedule, including those skipped on resume


def train(sched: "ref.Schedule", model: MLP, fetch, apply, start_batch: int = 0) -> TrainStats:
    """The reference schedule for one worker, as train() in main.cpp. `fetch()` fills the
    module's parameters before each batch (a pull, or nothing for a local model); `apply(done)`
    consumes the gradients in p.grad (a push, or a local SGD step) and is told how many of this
    worker's batches are then done. The first `start_batch` batches are skipped (a resume)."""
    epochs = sched.epochs()
    total = sched.worker_total_batches()
    st = TrainStats()
    t0 = time.monotonic()
    last_print = t0
    next_decile = 1
    for e in range(epochs):
        js = sched.worker_batches(e)
        if len(js) == 0:
            continue
        order = None  # computed once a batch of this epoch is left to train
        loss_sum, correct, seen = 0.0, 0, 0
        for k, j in enumerate(js, 1):
            if st.batches_done < start_batch:  # done by this slot's previous process
                st.batches_done += 1
                continue
            if order is None:
                order = ref.epoch_order(e, sched.n)
            rows = ref.global_batch(order, sched.batch, j)
            b = len(rows)
            x = ref.features(rows)
            y = ref.labels(rows, x)
            fetch()
            model.zero_grad(set_to_none=True)  # fetch() may have bound new parameters: ask the module
            loss, c = loss_and_correct(model(torch.from_numpy(x)), torch.from_numpy(y))
            loss.backward()
            st.batches_done += 1
            apply(st.batches_done)
            loss_sum += float(loss) * b
            correct += c
            seen += b
            st.batches += 1
            st.samples += b

            now = time.monotonic()
            decile = st.batches_done * 10 >= next_decile * total
            if decile or now - last_print >= 2.0:
                while next_decile <= 10 and st.batches_done * 10 >= next_decile * total:
                    next_decile += 1
                last_print = now
                secs = now - t0
                print(f"epoch {e + 1}/{epochs} batch {k}/{len(js)} {st.batches_done * 100 // total:3d}% "
                      f"loss {loss_sum / seen:.3f} acc {correct / seen:.3f} "
                      f"{st.samples / secs if secs > 0 else 0.0:.0f} samples/s", flush=True)
        if seen == 0:  # the whole epoch was done before a restart
            continue
        st.last_epoch_loss = loss_sum / seen
        st.last_epoch_acc = correct / seen
        st.last_epoch_samples = seen
    st.seconds = time.monotonic() - t0
    return st


def print_eval(what: str, r, first: int) -> None:
    print(f"{what} loss {r.loss:.4f} acc {r.accuracy:.4f} (rows {first}..{first + r.rows - 1})")


def print_final(st: TrainStats, model: MLP, eval_train: bool, eval_rows: int) -> None:
    """The C++ trainer's final lines, so the same tools read either."""
    rate = st.samples / st.seconds if st.seconds > 0 else 0.0
    print(f"trained {st.batches} batches, {st.samples} samples in {st.seconds:.2f} s: {rate:.0f} samples/s")
    if st.last_epoch_samples > 0:
        print(f"running train loss {st.last_epoch_loss:.4f} acc {st.last_epoch_acc:.4f} "
              f"(this worker's last epoch, {st.last_epoch_samples} samples)")
    limit = (lambda n: n) if eval_rows == 0 else (lambda n: min(n, eval_rows))
    if eval_train:
        print_eval("train", evaluate(model, 0, limit(ref.TRAIN_ROWS)), 0)
    print_eval("test", evaluate(model, ref.TEST_FIRST_ROW, limit(ref.TEST_ROWS)), ref.TEST_FIRST_ROW)
    print(f"weights-hash 0x{ref.weights_hash(model.numpy_params()):016x}", flush=True)


def world_size_from_env() -> int:
    s = os.environ.get("SHMPS_WORLD_SIZE", "")
    if s == "":
        return 1
    if not s.isdigit() or int(s) == 0:
        raise ValueError(f"SHMPS_WORLD_SIZE='{s}' is not a positive integer; unset it or pass --workers")
    return int(s)


def check_model(w) -> None:
    """The segment must hold the reference MLP's four parameters with their sizes."""
    have = {p.name: p for p in w.params()}
    for name, shape in ref.PARAMS:
        size = int(np.prod(shape))
        if name not in have:
            raise ValueError(f"segment '{w.segment}' has no parameter {name} (it has {', '.join(have) or 'none'}); "
                             f"start the server with the MLP model spec")
        if have[name].size != size:
            raise ValueError(f"segment '{w.segment}': parameter {name} has {have[name].size} elements, the "
                             f"784-256-10 MLP needs {size}; start the server with the MLP model spec")


def run_local(args, sched) -> None:
    model = MLP(onednn=args.matmul == "onednn")
    model.load_reference_init()
    # torch's SGD without momentum or weight decay is p -= lr * g, the C++ sgd_update.
    opt = torch.optim.SGD(model.parameters(), lr=args.lr)
    print(f"local: {args.samples} samples, batch {args.batch}, SGD lr {args.lr:g}, {sched.epochs()} epoch(s), "
          f"worker {sched.rank}/{sched.workers}, {sched.worker_total_batches()} batches", flush=True)
    st = train(sched, model, lambda: None, lambda _done: opt.step())
    print_final(st, model, True, args.eval_rows)


def run_worker(args) -> None:
    try:
        try:
            import shmps
        except ImportError:  # run straight from a checkout: the release build's package
            sys.path.insert(0, str(Path(__file__).resolve().parents[3] / "build" / "release" / "python"))
            sys.modules.pop("shmps", None)
            import shmps
        shmps.Worker
    except (ImportError, AttributeError) as e:
        raise ValueError(f"the shmps extension is not importable ({e}): build it and run with "
                         f"PYTHONPATH=build/release/python, or train without a server with --local") from e

    with shmps.Worker(segment=args.segment or None, rank=args.rank, timeout=args.timeout) as w:
        check_model(w)
        workers = args.workers if args.workers else world_size_from_env()
        if w.rank < 0 or w.rank >= workers:
            raise ValueError(f"worker slot {w.rank} is not below the number of workers {workers}; "
                             f"pass --workers (or set SHMPS_WORLD_SIZE)")
        # With server groups (shmps-launch --server-groups) the slot is the rank within the
        # worker's group's replica; the data shard follows the rank in the whole job.
        job_rank = int(os.environ.get("SHMPS_GLOBAL_RANK", w.rank))
        sched = ref.Schedule(batch=args.batch, samples=args.samples, workers=workers, rank=job_rank)
        if args.consistency and args.consistency != w.consistency:
            raise ValueError(f"--consistency {args.consistency} asked, but the job runs {w.consistency} (set it on "
                             f"the server: shmps-server --consistency, or shmps-ctl set {w.segment} "
                             f"consistency={args.consistency})")
        print(f"segment {w.segment} ({w.consistency}), worker {sched.rank}/{sched.workers}: {args.samples} samples, "
              f"batch {args.batch}, {sched.epochs()} epoch(s), {sched.worker_total_batches()} batches", flush=True)

        # Resume: the data cursor the slot's previous process committed with its last step.
        start_batch = ref.resume_cursor(w.load_state(), sched, w.rank)
        if start_batch > 0:
            print(f"resuming: generation {w.generation} of slot {w.rank} continues at batch {start_batch + 1} of "
                  f"{sched.worker_total_batches()} ({w.published()} pushes committed before)", flush=True)
        # BSP from the start: every worker in step 0, however late its process starts (else the
        # first one up could finish step 0 alone). A restarted worker joins at once.
        if w.consistency == "bsp" and start_batch == 0 and w.current_clock == 0:
            # With server groups, the step is the group's: wait for the workers of this replica.
            joining = min(sched.workers, int(os.environ.get("SHMPS_GROUP_SIZE", sched.workers)))
            print(f"waiting for all {joining} workers to join step 0", flush=True)
            w.wait_for_workers(joining, timeout=120.0)

        model = MLP(onednn=args.matmul == "onednn")
        names = [name for name, _ in model.named()]
        on_segment = False  # whether the module's parameters are the segment's values (BSP)
        last_seq = None

        def own_storage():
            """Give the module parameters of its own again (after views), to pull into."""
            nonlocal on_segment
            if on_segment:
                model.bind({name: torch.zeros(p.shape) for name, p in model.named()})
                on_segment = False

        def pull_into_module():
            own_storage()
            for name, p in model.named():
                w.pull(name, out=p.detach().numpy())  # a numpy view of the parameter's storage: no copy

        def fetch():
            nonlocal on_segment
            if w.consistency == "bsp":
                # BSP: the module's parameters are the segment's values themselves, no private copy.
                # Each view() waits for the previous step as a pull would, and the values cannot
                # change before this worker's clock() in apply(), after forward and backward: the
                # server never takes a step a live worker is still in. view() gives the same memory
                # every step, so the parameters are bound once (again only if it moved).
                arrays = [w.view(name) for name in names]
                bound = [p.data_ptr() for _, p in model.named()]
                if not on_segment or bound != [a.__array_interface__["data"][0] for a in arrays]:
                    with warnings.catch_warnings():
                        # torch has no read-only tensors and warns about the read-only arrays. Nothing
                        # writes to them: autograd writes the gradients to p.grad, and there is no
                        # local optimizer step (the server applies the gradients).
                        warnings.simplefilter("ignore", UserWarning)
                        model.bind({name: torch.from_numpy(a) for name, a in zip(names, arrays)})
                    on_segment = True
                return
            # ASP and SSP: the server writes under a view, so one forward and backward would read a
            # model changing mid-batch (Hogwild), unlike the reference trainer: pull a copy instead.
            # The mode is read at every batch, so a live switch takes effect at the next one.
            pull_into_module()

        def apply(batches_done):
            nonlocal last_seq
            for name, p in model.named():
                last_seq = w.push(name, p.grad.numpy())
            # The end of this worker's step: its four pushes and the cursor past them are
            # committed together (in BSP the step counts whole or not at all).
            w.save_state(ref.cursor_bytes(sched, batches_done))
            w.clock()

        st = train(sched, model, fetch, apply, start_batch)
        if last_seq is not None:
            w.wait_applied(last_seq)
        # The model as it stands once this worker's last push is applied, in the module's own
        # storage (a pull, not a view): it is evaluated after leave(), while others may train on.
        pull_into_module()
        w.leave()  # done: the others no longer wait for this worker
    print_final(st, model, args.eval_train, args.eval_rows)


def parse_args(argv):
    ap = argparse.ArgumentParser(
        prog=PROG, description="shmps example trainer in PyTorch: the reference 784-256-10 MLP on the "
                               "reference synthetic data")
    ap.add_argument("--segment", default="", help="job segment name (default: $SHMPS_SEGMENT)")
    ap.add_argument("--rank", type=int, default=-1,
                    help="worker slot (default: $SHMPS_RANK, else the first free slot)")
    ap.add_argument("--samples", type=int, default=400000, help="training samples over the whole run (all workers)")
    ap.add_argument("--batch", type=int, default=64, help="global batch size")
    ap.add_argument("--workers", type=int, default=0,
                    help="P: workers sharing the schedule; this one takes the batches j = rank (mod P) "
                         "(default: $SHMPS_WORLD_SIZE, else 1)")
    ap.add_argument("--consistency", default="",
                    help="the consistency the job must run (bsp, ssp:N, asp); the server sets it, this checks it")
    ap.add_argument("--local", action="store_true", help="no parameter server: train a local model with plain SGD")
    ap.add_argument("--lr", type=float, default=0.05, help="learning rate of --local")
    ap.add_argument("--eval-train", action="store_true",
                    help="at the end also evaluate the final model on the whole training set (always with --local)")
    ap.add_argument("--eval-rows", type=int, default=0,
                    help="evaluate on the first N rows of the training and of the test set only (default: all)")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch intra-op threads (default 1: one core per worker, like shmps-worker)")
    ap.add_argument("--matmul", choices=("onednn", "blas"),
                    default="onednn" if torch.backends.mkldnn.is_available() else "blas",
                    help="how fc1 is computed: a 1x1 convolution run by oneDNN (default when available), or "
                         "nn.Linear's matrix product through torch's BLAS")
    ap.add_argument("--timeout", type=float, default=30.0,
                    help="seconds a push, pull or wait_applied may block before failing")
    args = ap.parse_args(argv)
    for name in ("samples", "batch", "threads"):
        if getattr(args, name) <= 0:
            ap.error(f"--{name} must be positive")
    if args.workers < 0 or args.eval_rows < 0 or args.lr <= 0 or args.rank < -1:
        ap.error("--workers, --eval-rows and --lr must be positive, --rank -1 or more")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    try:
        if args.local:
            workers = args.workers if args.workers else 1
            rank = args.rank if args.rank >= 0 else 0
            if rank >= workers:
                raise ValueError(f"--rank {rank} must be below --workers {workers}")
            run_local(args, ref.Schedule(batch=args.batch, samples=args.samples, workers=workers, rank=rank))
        else:
            run_worker(args)
    except ValueError as e:  # our own checks, and a resume cursor of another schedule
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
