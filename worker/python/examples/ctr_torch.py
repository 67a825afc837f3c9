#!/usr/bin/python3
"""Trains the sparse click-through model (docs/workloads.md section 4) with PyTorch: alone, as
lock-free (Hogwild) processes sharing one model, or as shmps workers on an embedding table.

    PYTHONPATH=build/release/python /usr/bin/python3 worker/python/examples/ctr_torch.py [options]

The model is an nn.EmbeddingBag(2^20, 16, mode="sum", sparse=True) named `emb` (the 8 rows of a
sample summed) and an nn.Linear(16, 1) named `head`, binary cross-entropy with logits averaged
over the batch, plain SGD at learning rate 1.0 for every parameter; 4,000,000 training samples in
order, batches of 256, worker r of P taking the global batches j = r (mod P). The data and the
initial values come from shmps.ctr (numpy).

Modes:
  --local        one process, torch.optim.SGD on the module (sparse gradients for the table).
  --hogwild P    P processes (torch.multiprocessing), model.share_memory(): each runs SGD on the
                 shared parameters with no lock, on its batches j = r (mod P).
  (default)      a shmps worker: $SHMPS_SEGMENT, or --segment NAME, of a server started with
                 models/ctr.toml. Per batch it pulls only the batch's distinct rows of the table
                 (Worker.pull_rows) and the head, runs forward and backward, pushes the rows'
                 gradients (Worker.push_rows) and the head's, and ends its step with
                 save_state(cursor) and clock(); the server applies SGD. Rank 0 evaluates at the end.
                 --max-unapplied N (default 0), as shmps-worker --model ctr's: before a step's
                 pulls it waits (Worker.wait_applied) until at most N of its own steps are not
                 yet applied by the server. In ASP a pull does not wait for the server, so it may
                 miss this worker's own last updates of the hot rows (row 0 is in nearly every
                 batch); at learning rate 1.0 two workers with no bound diverge
                 (--max-unapplied none shows it).
                 --grad compact (default): the pulled rows are a small leaf tensor [distinct, 16],
                 the batch's ids remapped to positions in it; its gradient is the push.
                 --grad sparse: a local nn.EmbeddingBag(sparse=True) holds the pulled rows, and
                 its sparse gradient is pushed as it is:
                     g = emb.weight.grad.coalesce(); w.push_rows("emb", g.indices()[0], g.values())
  --evaluate     attach to the job (any free slot), pull the model and evaluate it; for
                 shmps-launch --after.
  --check-data   print the data's fingerprints (docs/workloads.md) and check them.

Started by shmps-launch it needs no arguments:

    shmps-launch --spec models/ctr.toml --workers 2 \\
        -- /usr/bin/python3 worker/python/examples/ctr_torch.py

The shmps names are those of models/ctr.toml ("emb", "head.weight", "head.bias"); the module's
state_dict calls the table "emb.weight" (shmps.ctr.TORCH_NAMES maps them).
"""
from __future__ import annotations

import argparse
import collections
import importlib.util
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F


def _import_ctr():
    """shmps.ctr; from the source tree next to this file if the shmps package (with its compiled
    extension) is not importable, so that --local, --hogwild and --check-data run without a build."""
    try:
        from shmps import ctr
        return ctr
    except ImportError:
        path = Path(__file__).resolve().parent.parent / "shmps" / "ctr.py"
        spec = importlib.util.spec_from_file_location("shmps_ctr", path)
        if spec is None or not path.exists():
            raise
        mod = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = mod  # dataclasses look their module up there
        spec.loader.exec_module(mod)
        return mod


ctr = _import_ctr()
PROG = "ctr_torch.py"
GROUP = 64  # batches whose data is generated at a time


class CTR(torch.nn.Module):
    """emb: nn.EmbeddingBag(2^20, 16, mode="sum", sparse=True); head: nn.Linear(16, 1)."""

    def __init__(self, rows: int = ctr.ROWS):
        super().__init__()
        self.emb = torch.nn.EmbeddingBag(rows, ctr.DIM, mode="sum", sparse=True)
        self.head = torch.nn.Linear(ctr.DIM, 1)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        """ids [B, 8] int64 -> logits [B]."""
        return self.head(self.emb(ids)).squeeze(1)

    def load_reference_init(self) -> None:
        init = ctr.reference_init()
        state = {ctr.TORCH_NAMES[name]: torch.from_numpy(v) for name, v in init.items()}
        self.load_state_dict(state)

    def numpy_params(self) -> dict[str, np.ndarray]:
        """{shmps name: numpy array sharing the module's storage}."""
        return {ctr.SHMPS_NAMES[n]: p.detach().numpy() for n, p in self.state_dict().items()}


def data_stream(sched, start_batch: int = 0, group: int = GROUP):
    """This worker's batches in order as (epoch, k, j, ids [b, 8] int64, y [b] float32), the data
    generated `group` batches at a time."""
    pending = []

    def flush():
        rows = np.concatenate([np.arange(first, first + count) for (_, _, _, first, count) in pending])
        ids, y = ctr.samples_of(rows)
        at = 0
        for e, k, j, _, count in pending:
            yield e, k, j, ids[at:at + count], y[at:at + count]
            at += count
        pending.clear()

    for b in ctr.batches(sched, start_batch):
        pending.append(b)
        if len(pending) == group:
            yield from flush()
    if pending:
        yield from flush()


class Stats:
    def __init__(self):
        self.batches = 0
        self.samples = 0
        self.seconds = 0.0
        self.batches_done = 0
        self.loss_sum = 0.0
        self.correct = 0
        self.seen = 0  # samples of the running figures


def train(sched, step, start_batch: int = 0, tag: str = "") -> Stats:
    """Runs `step(ids, y) -> (loss, correct)` on each of this worker's batches; prints progress."""
    st = Stats()
    st.batches_done = start_batch
    total = sched.worker_total_batches()
    t0 = time.monotonic()
    last_print = t0
    next_decile = 1
    for e, k, j, ids, y in data_stream(sched, start_batch):
        loss, correct = step(ids, y)
        st.batches_done += 1
        st.batches += 1
        st.samples += len(y)
        st.loss_sum += loss * len(y)
        st.correct += correct
        st.seen += len(y)
        now = time.monotonic()
        if st.batches_done * 10 >= next_decile * total or now - last_print >= 2.0:
            while next_decile <= 10 and st.batches_done * 10 >= next_decile * total:
                next_decile += 1
            last_print = now
            secs = now - t0
            print(f"{tag}batch {st.batches_done}/{total} {st.batches_done * 100 // total:3d}% "
                  f"loss {st.loss_sum / st.seen:.4f} acc {st.correct / st.seen:.4f} "
                  f"{st.samples / secs if secs > 0 else 0.0:.0f} samples/s", flush=True)
            st.loss_sum, st.correct, st.seen = 0.0, 0, 0  # running figures since the last line
    st.seconds = time.monotonic() - t0
    return st


def bce(z: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, int]:
    loss = F.binary_cross_entropy_with_logits(z, y)
    correct = int(((z.detach() > 0) == (y > 0.5)).sum())
    return loss, correct


def print_trained(st: Stats, tag: str = "") -> None:
    rate = st.samples / st.seconds if st.seconds > 0 else 0.0
    print(f"{tag}trained {st.batches} batches, {st.samples} samples in {st.seconds:.2f} s: {rate:.0f} samples/s",
          flush=True)


def print_eval(r, what: str = "test") -> None:
    print(f"{what} loss {r.loss:.4f} acc {r.accuracy:.4f} ({r.rows} samples)", flush=True)


# ---- --local and --hogwild -------------------------------------------------------------------

def local_step(model: CTR, opt):
    def step(ids, y):
        opt.zero_grad(set_to_none=True)
        loss, correct = bce(model(torch.from_numpy(ids)), torch.from_numpy(y))
        loss.backward()
        opt.step()  # SGD with a sparse gradient for emb.weight: only its rows change
        return float(loss), correct
    return step


def run_local(args) -> None:
    model = CTR()
    model.load_reference_init()
    opt = torch.optim.SGD(model.parameters(), lr=args.lr)
    sched = ctr.schedule(samples=args.samples)
    print(f"local: {args.samples} samples, batch {sched.batch}, SGD lr {args.lr:g}, "
          f"{sched.worker_total_batches()} batches", flush=True)
    st = train(sched, local_step(model, opt))
    print_trained(st)
    print_eval(ctr.evaluate(model.numpy_params()))


def _hogwild_worker(rank: int, workers: int, model: CTR, args, barrier, results) -> None:
    torch.set_num_threads(args.threads)
    sched = ctr.schedule(samples=args.samples, workers=workers, rank=rank)
    opt = torch.optim.SGD(model.parameters(), lr=args.lr)  # updates the shared tensors in place
    barrier.wait()
    st = train(sched, local_step(model, opt), tag=f"[h{rank}] ")
    results.put((rank, st.batches, st.samples, st.seconds))


def run_hogwild(args) -> None:
    mp = torch.multiprocessing.get_context("spawn")
    model = CTR()
    model.load_reference_init()
    model.share_memory()  # the parameters move to shared memory; the processes write them lock-free
    print(f"hogwild: {args.hogwild} processes, {args.samples} samples, batch {ctr.BATCH}, SGD lr {args.lr:g}",
          flush=True)
    barrier = mp.Barrier(args.hogwild + 1)
    results = mp.SimpleQueue()
    procs = [mp.Process(target=_hogwild_worker, args=(r, args.hogwild, model, args, barrier, results))
             for r in range(args.hogwild)]
    for p in procs:
        p.start()
    barrier.wait()  # every process started and set up: the clock starts
    t0 = time.monotonic()
    for p in procs:
        p.join()
    wall = time.monotonic() - t0
    if any(p.exitcode != 0 for p in procs):
        raise RuntimeError(f"a Hogwild process failed (exit codes {[p.exitcode for p in procs]})")
    got = [results.get() for _ in procs]
    samples = sum(s for _, _, s, _ in got)
    print(f"trained {sum(b for _, b, _, _ in got)} batches, {samples} samples in {wall:.2f} s: "
          f"{samples / wall:.0f} samples/s ({args.hogwild} processes)", flush=True)
    print_eval(ctr.evaluate(model.numpy_params()))


# ---- shmps -----------------------------------------------------------------------------------

def import_shmps():
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
    return shmps


def check_model(w) -> None:
    """The segment must hold the click-through model: the table emb [2^20, 16] and the head."""
    have = {p.name: p for p in w.params()}
    want = "start the server with models/ctr.toml"
    emb = have.get(ctr.EMB)
    if emb is None or not emb.is_table or (emb.rows, emb.dim) != (ctr.ROWS, ctr.DIM):
        raise ValueError(f"segment '{w.segment}' has no table {ctr.EMB} of {ctr.ROWS} rows of {ctr.DIM} "
                         f"(it has {', '.join(have) or 'none'}); {want}")
    for name, shape in ctr.PARAMS:
        if name == ctr.EMB:
            continue
        if name not in have or have[name].is_table or have[name].size != int(np.prod(shape)):
            raise ValueError(f"segment '{w.segment}' has no parameter {name} of shape {shape}; {want}")


def pull_model_for(w, ids: np.ndarray, chunk: int = 1 << 16):
    """The model as the samples `ids` need it: (rows of their distinct ids, ids remapped to
    positions among them, head.weight, head.bias), pulled `chunk` rows at a time."""
    uniq, inv = np.unique(ids, return_inverse=True)
    rows = np.empty((len(uniq), ctr.DIM), np.float32)
    for b in range(0, len(uniq), chunk):
        w.pull_rows(ctr.EMB, uniq[b:b + chunk], out=rows[b:b + chunk])
    hw, _ = w.pull(ctr.HEAD_WEIGHT)
    hb, _ = w.pull(ctr.HEAD_BIAS)
    return rows, inv.reshape(ids.shape), hw, hb


def evaluate_pulled(w) -> "ctr.EvalResult":
    ids, y = ctr.test_set()
    rows, local_ids, hw, hb = pull_model_for(w, ids)
    return ctr.evaluate_on(rows, local_ids, y, hw, hb)


def run_evaluate(args) -> None:
    shmps = import_shmps()
    if args.rank < 0:
        os.environ.pop("SHMPS_RANK", None)  # any free slot: SHMPS_RANK belongs to a training worker
    with shmps.Worker(segment=args.segment or None, rank=args.rank, timeout=args.timeout) as w:
        check_model(w)
        t0 = time.monotonic()
        r = evaluate_pulled(w)
        w.leave()
    print_eval(r)
    print(f"evaluated in {time.monotonic() - t0:.2f} s", flush=True)


def world_size_from_env() -> int:
    s = os.environ.get("SHMPS_WORLD_SIZE", "")
    if s == "":
        return 1
    if not s.isdigit() or int(s) == 0:
        raise ValueError(f"SHMPS_WORLD_SIZE='{s}' is not a positive integer; unset it or pass --workers")
    return int(s)


def compact_step(w, head: torch.nn.Linear, timing: dict):
    """A batch with the pulled rows as a small leaf tensor: the batch's ids remapped to positions
    among its distinct ids, the bag sum taken over the [distinct, 16] block; that
    block's gradient (one row per distinct id, its occurrences summed) is what is pushed."""
    buf = np.empty((ctr.BATCH * ctr.FIELDS, ctr.DIM), np.float32)
    hw, hb = head.weight.detach().numpy(), head.bias.detach().numpy()

    def step(ids, y):
        uniq, inv = np.unique(ids, return_inverse=True)
        rows = buf[:len(uniq)]
        w.pull_rows(ctr.EMB, uniq, out=rows)
        w.pull(ctr.HEAD_WEIGHT, out=hw)
        w.pull(ctr.HEAD_BIAS, out=hb)
        head.zero_grad(set_to_none=True)
        block = torch.from_numpy(rows).requires_grad_()
        # The bag sum as a gather and a sum: its backward (a scatter-add into block.grad) is
        # faster here than F.embedding_bag's dense backward (about 0.4 against 0.7 ms a batch).
        bag = block[torch.from_numpy(inv.reshape(ids.shape))].sum(dim=1)
        loss, correct = bce(head(bag).squeeze(1), torch.from_numpy(y))
        loss.backward()
        w.push_rows(ctr.EMB, uniq, block.grad)
        w.push(ctr.HEAD_WEIGHT, head.weight.grad)
        timing["seq"] = w.push(ctr.HEAD_BIAS, head.bias.grad)
        return float(loss), correct
    return step


def sparse_step(w, model: CTR, timing: dict):
    """A batch through a real nn.EmbeddingBag(sparse=True): the batch's distinct rows are pulled
    and written into the module's (local, otherwise stale) table, and the table's sparse
    gradient is pushed as it is, coalesced: indices()[0] (int64) and values() [n, 16]."""
    buf = np.empty((ctr.BATCH * ctr.FIELDS, ctr.DIM), np.float32)
    hw, hb = model.head.weight.detach().numpy(), model.head.bias.detach().numpy()
    table = model.emb.weight.detach()

    def step(ids, y):
        uniq = np.unique(ids)
        rows = buf[:len(uniq)]
        w.pull_rows(ctr.EMB, uniq, out=rows)
        table[torch.from_numpy(uniq)] = torch.from_numpy(rows)
        w.pull(ctr.HEAD_WEIGHT, out=hw)
        w.pull(ctr.HEAD_BIAS, out=hb)
        model.zero_grad(set_to_none=True)
        loss, correct = bce(model(torch.from_numpy(ids)), torch.from_numpy(y))
        loss.backward()
        g = model.emb.weight.grad.coalesce()
        w.push_rows(ctr.EMB, g.indices()[0], g.values())
        w.push(ctr.HEAD_WEIGHT, model.head.weight.grad)
        timing["seq"] = w.push(ctr.HEAD_BIAS, model.head.bias.grad)
        return float(loss), correct
    return step


def run_worker(args) -> None:
    shmps = import_shmps()
    with shmps.Worker(segment=args.segment or None, rank=args.rank, timeout=args.timeout) as w:
        check_model(w)
        workers = args.workers if args.workers else world_size_from_env()
        if w.rank < 0 or w.rank >= workers:
            raise ValueError(f"worker slot {w.rank} is not below the number of workers {workers}; "
                             f"pass --workers (or set SHMPS_WORLD_SIZE)")
        job_rank = int(os.environ.get("SHMPS_GLOBAL_RANK", w.rank))
        sched = ctr.schedule(samples=args.samples, workers=workers, rank=job_rank)
        print(f"segment {w.segment} ({w.consistency}), worker {sched.rank}/{sched.workers}: {args.samples} samples, "
              f"batch {sched.batch}, {sched.worker_total_batches()} batches, --grad {args.grad}", flush=True)
        # Resume: the cursor this slot's previous process committed with its last step (the
        # bytes of shmps-worker's, shmps.reference.cursor_bytes).
        start_batch = ctr.resume_cursor(w.load_state(), sched, w.rank)
        if start_batch > 0:
            print(f"resuming: generation {w.generation} of slot {w.rank} continues at batch {start_batch + 1} of "
                  f"{sched.worker_total_batches()} ({w.published()} pushes committed before)", flush=True)
        if w.consistency == "bsp" and start_batch == 0 and w.current_clock == 0:
            joining = min(sched.workers, int(os.environ.get("SHMPS_GROUP_SIZE", sched.workers)))
            print(f"waiting for all {joining} workers to join step 0", flush=True)
            w.wait_for_workers(joining, timeout=120.0)

        last = {"seq": None}
        if args.grad == "sparse":
            inner = sparse_step(w, CTR(), last)
        else:
            inner = compact_step(w, torch.nn.Linear(ctr.DIM, 1), last)
        done = [start_batch]
        unapplied = collections.deque()  # the last push of each of this worker's recent steps
        waited = [0]  # steps that waited for the server before their pulls

        def step(ids, y):
            if args.max_unapplied is not None:
                # At most N of this worker's own steps pending: its previous steps' rows are hot
                # rows of this one too, and learning rate 1.0 on gradients computed from values
                # that miss them diverges.
                if len(unapplied) > args.max_unapplied and w.applied() < unapplied[-1 - args.max_unapplied]:
                    waited[0] += 1
                while len(unapplied) > args.max_unapplied:
                    w.wait_applied(unapplied.popleft())
            r = inner(ids, y)
            if args.max_unapplied is not None:
                unapplied.append(last["seq"])
            done[0] += 1
            # The end of the step: its pushes and the cursor past them, committed together.
            w.save_state(ctr.cursor_bytes(sched, done[0]))
            w.clock()
            return r

        st = train(sched, step, start_batch)
        if last["seq"] is not None:
            w.wait_applied(last["seq"])
        result = None
        if job_rank == 0 and not args.no_eval:
            # This worker's pushes are applied; in ASP and SSP the others may still be training.
            result = evaluate_pulled(w)
        w.leave()
    print_trained(st)
    if args.max_unapplied is not None:
        print(f"steps that waited for the server to apply this worker's earlier steps (--max-unapplied "
              f"{args.max_unapplied}): {waited[0]} of {st.batches}", flush=True)
    if result is not None:
        print_eval(result)


# ---- --check-data ----------------------------------------------------------------------------

EXPECTED = {"positive_share": 0.4275, "teacher_agreement": 0.9425, "distinct_rows": 740840}


def run_check_data(args) -> int:
    t0 = time.monotonic()
    fp = ctr.fingerprints(0, args.check_rows)
    print(f"first {fp.samples} training samples: positive share {fp.positive_share:.4f}, agreement with the "
          f"teacher {fp.teacher_agreement:.4f}, {fp.distinct_rows} distinct rows, "
          f"{fp.batch_distinct_rows:.1f} distinct rows a batch ({time.monotonic() - t0:.2f} s)")
    if args.check_rows != 1_000_000:
        return 0
    ok = (round(fp.positive_share, 4) == EXPECTED["positive_share"]
          and round(fp.teacher_agreement, 4) == EXPECTED["teacher_agreement"]
          and fp.distinct_rows == EXPECTED["distinct_rows"])
    print("fingerprints match docs/workloads.md" if ok else f"MISMATCH: expected {EXPECTED}")
    return 0 if ok else 1


def _unapplied(text: str):
    if text == "none":
        return None
    if not text.isdigit():
        raise argparse.ArgumentTypeError(f"expected a number of steps (0 or more) or 'none', got '{text}'")
    return int(text)


def parse_args(argv):
    ap = argparse.ArgumentParser(prog=PROG, description="shmps example in PyTorch: the sparse click-through "
                                                        "model (an embedding bag and a linear head)")
    mode = ap.add_mutually_exclusive_group()
    mode.add_argument("--local", action="store_true", help="one process, no parameter server")
    mode.add_argument("--hogwild", type=int, default=0, metavar="P",
                      help="P lock-free processes sharing the model, no parameter server")
    mode.add_argument("--evaluate", action="store_true",
                      help="evaluate the job's current model on the test set (any free slot)")
    mode.add_argument("--check-data", action="store_true", help="print and check the data's fingerprints")
    ap.add_argument("--segment", default="", help="job segment name (default: $SHMPS_SEGMENT)")
    ap.add_argument("--rank", type=int, default=-1, help="worker slot (default: $SHMPS_RANK, else the first free)")
    ap.add_argument("--workers", type=int, default=0,
                    help="P: workers sharing the schedule (default: $SHMPS_WORLD_SIZE, else 1)")
    ap.add_argument("--samples", type=int, default=ctr.TRAIN_ROWS, help="training samples over the whole run")
    ap.add_argument("--lr", type=float, default=ctr.LR, help="SGD learning rate of --local and --hogwild")
    ap.add_argument("--grad", choices=("compact", "sparse"), default="compact",
                    help="shmps mode: the pulled rows as a small leaf tensor (compact), or a local "
                         "nn.EmbeddingBag(sparse=True) whose coalesced gradient is pushed as it is (sparse)")
    ap.add_argument("--max-unapplied", type=_unapplied, default=0, metavar="N",
                    help="shmps mode: pull only once at most N of this worker's own steps are not yet applied by "
                         "the server (default 0: all of them applied; 'none': no bound)")
    ap.add_argument("--no-eval", action="store_true", help="shmps mode: rank 0 does not evaluate at the end")
    ap.add_argument("--check-rows", type=int, default=1_000_000, help="samples --check-data looks at")
    ap.add_argument("--threads", type=int, default=1, help="torch intra-op threads a process (default 1)")
    ap.add_argument("--timeout", type=float, default=30.0, help="seconds a shmps call may block before failing")
    args = ap.parse_args(argv)
    if args.samples <= 0 or args.threads <= 0 or args.hogwild < 0 or args.lr <= 0 or args.check_rows <= 0:
        ap.error("--samples, --threads, --lr, --check-rows must be positive, --hogwild P at least 1")
    if args.workers < 0 or args.rank < -1:
        ap.error("--workers must be positive, --rank -1 or more")
    if args.local or args.hogwild or args.check_data:
        pass
    elif not (args.evaluate or args.segment or os.environ.get("SHMPS_SEGMENT")):
        ap.error("no job to join: pass --segment NAME (or set SHMPS_SEGMENT), or train alone with --local "
                 "or --hogwild P")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    try:
        if args.check_data:
            return run_check_data(args)
        if args.local:
            run_local(args)
        elif args.hogwild:
            run_hogwild(args)
        elif args.evaluate:
            run_evaluate(args)
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
