"""shmps for PyTorch: bind an nn.Module to a shmps job, and train it like with an optimizer.

    import shmps.torch
    model = make_model()                              # every rank builds the same module
    ps = shmps.torch.ParameterServer(model)           # rank 0 puts it; every rank pulls the job's values
    for x, y in loader:                               # a DataLoader with worker processes is fine
        ps.zero_grad()
        loss_fn(model(x), y).backward()
        ps.step()                                     # push every .grad, end the step (clock)
        ps.pull()                                     # the job's values into the module
    ps.finish()                                       # wait until this worker's pushes are applied

The job's spec comes from the module too: `python3 -m shmps.spec MODULE:FACTORY > model.toml`, or
`shmps.torch.spec(model, ...)` (shmps.spec). The server's optimizer (the spec's [optimizer])
updates the values; there is no local optimizer.

What a pull gives, by consistency model:
- BSP: the module's parameters become the job's values themselves (zero-copy views of the shared
  segment, read-only: never write to them, nor step a local optimizer). They are exactly the
  values after the previous step of every worker, and stay so until this worker's next step()
  ends its step. After step() and before the next pull() they may be mid-update: pull first.
- ASP and SSP: a copy into the module's own storage (the server writes under a view at any time,
  so a forward pass over views would read a model changing mid-batch). SSP waits as its bound
  requires.
The mode is read at every pull, so a live switch (shmps-ctl set-consistency) takes effect there.

Sparse embeddings (nn.Embedding / nn.EmbeddingBag with sparse=True) are tables: step() pushes
their sparse gradients as rows (only the rows the batch touched), and pull(ids={name: ids})
pulls only the given rows of a table (pull() without ids pulls all of it).

Buffers (batch-norm running statistics) are not served: each worker keeps its own.

bfloat16 and float16 modules: the spec stores such parameters in that type (dtype = "bf16" /
"fp16", half the memory and traffic); pulls and views hand out the stored values as they are,
gradients are pushed as float32, and the server's optimizer computes in float32 and rounds each
update once. A float32 module may also bind to a 2-byte job: its pulls convert (no views then).
"""

import warnings

import numpy as np
import torch

from . import _core
from .spec import SpecError, sparse_tables
from .spec import spec as _spec

__all__ = ["ParameterServer", "spec", "SpecError"]


def spec(model, **options):
    """The shmps model spec (TOML text) of `model`; see shmps.spec.spec for the options."""
    return _spec(model, **options)


class ParameterServer:
    """A module bound to a shmps job through one worker (see the module docstring).

    ParameterServer(model, worker=None, put="auto", timeout=30.0)
      worker   a shmps.Worker already attached, or None: attach one, with the segment and rank
               from $SHMPS_SEGMENT / $SHMPS_RANK (shmps-launch sets them)
      put      "auto": rank 0 puts the module's values of every init = "put" parameter not yet
               put (a restarted rank 0 does not put over trained values); True: put every
               parameter now (ps.put()); False: never
      timeout  seconds a call may wait for the server, when the worker is attached here
    Then it pulls, so every rank starts from the job's values.
    """

    def __init__(self, model, worker=None, put="auto", timeout=30.0):
        if not isinstance(model, torch.nn.Module):
            raise _core.Error(f"ParameterServer takes a torch.nn.Module, got {type(model).__name__}")
        self.model = model
        self._own_worker = worker is None
        self.worker = _core.Worker(timeout=timeout) if worker is None else worker
        try:
            self._bind(model)
            if put is True:
                self.put()
            elif put == "auto" and self.worker.rank == 0:
                self._put_first()
            elif put not in (False, "auto"):
                raise _core.Error(f"put must be 'auto', True or False, got {put!r}")
            self._last_seq = 0
            self._on_segment = set()  # names whose module parameter is a view of the segment (BSP)
            self.pull()
        except BaseException:
            if self._own_worker:
                self.worker.leave()
            raise

    @property
    def rank(self):
        return self.worker.rank

    def _bind(self, model):
        """Pairs each module parameter with the job's parameter of the same name, checking shapes."""
        job = {p.name: p for p in self.worker.params()}
        sparse = sparse_tables(model)
        self._dense, self._tables = [], []
        hint = "write the spec from this module: python3 -m shmps.spec MODULE:FACTORY > model.toml"
        for name, p in model.named_parameters():
            info = job.get(name)
            where = f"the module's parameter {name!r} {tuple(p.shape)}"
            if info is None:
                raise _core.Error(f"{where} is not in job {self.worker.segment!r}, whose parameters are "
                                  f"{', '.join(sorted(job))}; {hint}")
            stored = _STORED.get(p.dtype)
            if p.device.type != "cpu" or stored is None:
                raise _core.Error(f"{where} is {p.dtype} on {p.device}; shmps serves float32, bfloat16 and float16 "
                                  f"parameters on the CPU")
            if stored != info.dtype_name and p.dtype != torch.float32:
                raise _core.Error(f"{where} is {p.dtype}, but the job stores {name!r} as {info.dtype_name}; {hint}")
            if info.is_table:
                if tuple(p.shape) != (info.rows, info.dim):
                    raise _core.Error(f"{where} does not match the job's table {name!r} of {info.rows} rows of "
                                      f"{info.dim}; {hint}")
                self._tables.append((name, p))
            else:
                if p.numel() != info.size or (p.dim() > 0 and tuple(p.shape) != tuple(info.shape)):
                    raise _core.Error(f"{where} does not match the job's {name!r} {tuple(info.shape)}; {hint}")
                if name in sparse:
                    raise _core.Error(f"{where} is a sparse embedding, but the job serves it as a dense parameter; "
                                      f"{hint} (it makes it a [[table]])")
                self._dense.append((name, p))
        self._job = job

    # -- put ---------------------------------------------------------------------------------

    def put(self):
        """Puts every parameter's values of the module (SINGA's Put). Allowed before the first
        update, for the first rank that puts; raises shmps.Error otherwise (see Worker.put)."""
        with torch.no_grad():
            for name, p in self._dense + self._tables:
                self.worker.put(name, _flat(p.float()))  # exact: a bf16/fp16 value is a float32 one

    def _put_first(self):
        with torch.no_grad():
            for name, p in self._dense + self._tables:
                if not self._job[name].init_put or self.worker.is_put(name):
                    continue
                if self.worker.put_rank(name) not in (-1, self.worker.rank):
                    continue  # another rank put it first; the pull waits for the rest of its put
                self.worker.put(name, _flat(p.float()))

    # -- pull --------------------------------------------------------------------------------

    def pull(self, ids=None):
        """The job's values into the module's parameters (see the module docstring for what each
        consistency model gives). ids: {table name: row ids} pulls only those rows of a table."""
        ids = ids or {}
        for name in ids:
            if name not in dict(self._tables):
                raise _core.Error(f"pull(ids=...): {name!r} is not a table of this module; tables: "
                                  f"{', '.join(n for n, _ in self._tables) or 'none'}")
        if self.worker.consistency == "bsp":
            self._bind_views()
        else:
            for name, p in self._dense:
                self._own_storage(name, p)
                self.worker.pull(name, out=_out(p))
        for name, p in self._tables:
            rows = ids.get(name)
            if rows is None:
                _pull_table(self.worker, name, p)
            else:
                rows = _ids(rows)
                if len(rows):
                    values, _ = self.worker.pull_rows(name, rows)
                    with torch.no_grad():
                        p[torch.from_numpy(rows)] = torch.from_numpy(values).to(p.dtype)

    def _bind_views(self):
        # A float32 module over a 2-byte job cannot alias the segment: it pulls a converted copy.
        viewed = [(n, p) for n, p in self._dense if _STORED[p.dtype] == self._job[n].dtype_name]
        viewed_names = {n for n, _ in viewed}
        arrays = [self.worker.view(name) for name, _ in viewed]
        with warnings.catch_warnings():
            # torch has no read-only tensors and warns about the read-only arrays. Nothing writes
            # to them: autograd writes p.grad, and the server's optimizer does the update.
            warnings.simplefilter("ignore", UserWarning)
            for (name, p), a in zip(viewed, arrays):
                if name in self._on_segment and p.data_ptr() == a.__array_interface__["data"][0]:
                    continue  # view() gives the same memory every step: bound once
                if p.dtype == torch.bfloat16:  # uint16 bit patterns; torch takes no uint16 array
                    t = torch.from_numpy(a.view(np.int16)).view(torch.bfloat16)
                else:
                    t = torch.from_numpy(a)
                p.data = t.view(p.shape)
                self._on_segment.add(name)
        for name, p in self._dense:
            if name not in viewed_names:
                self._own_storage(name, p)
                self.worker.pull(name, out=_out(p))

    def _own_storage(self, name, p):
        """A parameter of its own again (after views) to pull into."""
        if name in self._on_segment:
            p.data = torch.empty(p.shape, dtype=p.dtype)
            self._on_segment.discard(name)
        elif not p.data.is_contiguous():
            p.data = p.data.contiguous()

    # -- step --------------------------------------------------------------------------------

    def zero_grad(self):
        """Drops every parameter's gradient (model.zero_grad(set_to_none=True))."""
        self.model.zero_grad(set_to_none=True)

    def step(self, state=None):
        """Pushes every parameter's .grad (those that have one; a table's as rows) and ends this
        worker's step (clock). state: bytes committed with the step (Worker.save_state), which a
        restarted process of this rank gets from load_state() — e.g. its place in the data."""
        w = self.worker
        with torch.no_grad():
            for name, p in self._dense:
                g = p.grad
                if g is None:
                    continue
                if g.is_sparse:
                    g = g.to_dense()
                self._last_seq = w.push(name, _grad(g))
            for name, p in self._tables:
                g = p.grad
                if g is None:
                    continue
                if g.is_sparse:
                    g = g.coalesce()
                    rows, values = g.indices()[0].numpy(), g.values()
                else:  # a dense gradient of a table: push the rows it touches
                    rows = torch.nonzero(g.abs().sum(dim=1)).flatten().numpy()
                    values = g[torch.from_numpy(rows)]
                if len(rows):
                    self._last_seq = w.push_rows(name, rows, _grad(values))
        if state is not None:
            w.save_state(state)
        w.clock()

    def load_state(self):
        """What this rank's last step() committed as state (b"" if none): where to resume."""
        return self.worker.load_state()

    def finish(self):
        """Waits until the server has applied every push of this worker."""
        if self._last_seq:
            self.worker.wait_applied(self._last_seq)

    def own_copy(self):
        """Gives every parameter storage of its own again holding the job's values (a pull into a
        copy, also in BSP): for evaluating or saving the module after the job, or while others train."""
        for name, p in self._dense:
            self._own_storage(name, p)
            self.worker.pull(name, out=_out(p))
        for name, p in self._tables:  # tables are always copies
            _pull_table(self.worker, name, p)

    def close(self):
        """Leaves the job if this ParameterServer attached the worker itself. The module keeps
        values of its own (own_copy) when it was bound to the segment."""
        try:
            if self._on_segment:
                self.own_copy()
        finally:
            if self._own_worker:
                self.worker.leave()

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        if exc_type is None:
            self.close()
            return
        # Leaving while an exception propagates: never hide it behind a failed pull.
        try:
            self.close()
        except Exception:  # noqa: BLE001 - the propagating exception is the one that matters
            pass


# How the segment stores a parameter of each torch dtype (Param.dtype_name).
_STORED = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}


def _out(p):
    """A pull's `out` over the parameter's own storage: float32 as it is (the job's 2-byte values
    converted), a bfloat16 or float16 parameter's stored bits as they are."""
    t = p.detach()
    if t.dtype == torch.bfloat16:
        return t.view(torch.int16).numpy().reshape(-1)
    return t.numpy().reshape(-1)


def _pull_table(worker, name, p):
    """Every row of table `name` into the embedding's weight p, in place: float32 rows (a 2-byte
    table's widened), or a bfloat16 / float16 table's stored values as they are."""
    ids = np.arange(p.shape[0], dtype=np.int64)
    worker.pull_rows(name, ids, out=p.detach() if p.dtype == torch.bfloat16 else p.detach().numpy())


def _grad(g):
    """A gradient as push() takes it: a bfloat16 / float16 one as it is (the worker widens its bits
    exactly to float32 on the way into the ring), any other as a flat float32 array."""
    if g.dtype in (torch.bfloat16, torch.float16):
        return g.detach().contiguous().reshape(-1)
    return _flat(g.float())


def _flat(t):
    """A C-contiguous float32 numpy view of a CPU tensor (a copy only if it is not contiguous)."""
    return t.detach().contiguous().numpy().reshape(-1)


def _ids(rows):
    if isinstance(rows, torch.Tensor):
        rows = rows.detach().cpu().numpy()
    return np.ascontiguousarray(np.asarray(rows, dtype=np.int64).reshape(-1))
