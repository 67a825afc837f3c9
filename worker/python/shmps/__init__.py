"""shmps: join a shmps job (a shared-memory parameter server on one machine) as a worker.

    import shmps
    with shmps.Worker("mlp", rank=0) as w:
        for p in w.params():
            print(p.name, p.shape, p.dtype)
        values, version = w.pull("fc1.weight")
        seq = w.push("fc1.weight", grad)      # grad: C-contiguous float32, of the same size
        w.wait_applied(seq)
        rows, version = w.pull_rows("emb", ids)   # a table's rows: float32 (len(ids), dim)
        w.push_rows("emb", ids, row_grads)        # ids int64/uint64; a repeated id is summed

The Worker is the C++ worker library (<shmps/worker.hpp>) itself, built with pybind11: a pull
copies straight from shared memory into your array, a push straight from your array into the
worker's ring. Errors raise shmps.Error. See help(shmps.Worker) and
docs/python.md. The reference workloads' data, in numpy: shmps.reference (the MLP) and
shmps.ctr (the sparse click-through model on an embedding table).
"""

from ._core import Error, Param, Worker

__all__ = ["Error", "Param", "Worker"]
