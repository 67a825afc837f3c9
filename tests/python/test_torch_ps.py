"""PyTorch-native use: a spec written from a module (shmps.spec), Put from rank 0, and
shmps.torch.ParameterServer pulling and pushing a module with several layer kinds."""

import signal
import subprocess
import sys
import time

import numpy as np
import pytest

torch = pytest.importorskip(
    "torch", reason="python3-torch is not installed (apt-get install python3-torch): the shmps.torch tests are skipped")

import shmps  # noqa: E402
import shmps.torch  # noqa: E402
from conftest import HERE, PYTHON, child_env  # noqa: E402
from torch_ps_model import EMBEDDINGS, batches, make_model  # noqa: E402


def job_spec(model, **options):
    """The module's spec without its name line (the test's Job names the segment)."""
    text = shmps.torch.spec(model, name="unused", **options)
    assert 'name = "unused"\n' in text
    return text.replace('name = "unused"\n', "", 1)


def spec_cli(*args, cwd=HERE):
    return subprocess.run([PYTHON, "-m", "shmps.spec", *args], cwd=cwd, env=child_env(), capture_output=True,
                          text=True, timeout=60)


def test_the_spec_names_every_parameter_with_its_shape_and_makes_sparse_embeddings_tables(tmp_path):
    out = spec_cli("torch_ps_model.py:factory", "--name", "mixed", "--optimizer", "momentum", "--lr", "0.1",
                   "--momentum", "0.5", "--consistency", "bsp")
    assert out.returncode == 0, out.stderr
    text = out.stdout
    import tomllib

    spec = tomllib.loads(text)
    model = make_model()
    dense = {n: list(p.shape) for n, p in model.named_parameters() if n != "emb.weight"}
    assert {p["name"]: p["shape"] for p in spec["param"]} == dense
    assert all(p["init"] == "put" for p in spec["param"] + spec["table"])
    assert spec["table"] == [{"name": "emb.weight", "rows": EMBEDDINGS, "dim": 8, "init": "put"}]
    assert spec["optimizer"] == {"kind": "momentum", "lr": 0.1, "momentum": 0.5}
    assert spec["name"] == "mixed" and spec["consistency"] == "bsp"
    assert "bn.running_mean" in text and "not served" in text  # the buffers stay local, and it says so
    assert shmps.torch.spec(model, name="mixed", optimizer="momentum", lr=0.1, momentum=0.5,
                            consistency="bsp") == text


@pytest.mark.parametrize("args, message", [
    (["no_such_module:f"], "cannot import module 'no_such_module'"),
    (["torch_ps_model.py:nothing"], "has no 'nothing'; it defines"),
    (["torch_ps_model.py:not_a_module"], "returned a dict, not a torch.nn.Module"),
    (["torch_ps_model.py:batches"], "the factory must build the module with no arguments"),
    (["torch_ps_model.py"], "is not MODULE:FACTORY"),
    (["missing/file.py:f"], "no such file: missing/file.py"),
    (["torch_ps_model.py:factory", "--momentum", "0.9"], "'momentum' is not used by 'sgd'"),
    (["torch_ps_model.py:factory", "--name", "a/b"], "cannot be a segment name"),
])
def test_spec_errors_say_what_is_wrong(args, message):
    out = spec_cli(*args)
    assert out.returncode == 2 and out.stdout == ""
    assert message in out.stderr, out.stderr
    assert out.stderr.startswith("shmps.spec: error: ")


def sgd_reference(lr, steps, fused):
    """The same module trained locally on the same batches: p <- p - lr * g per element in float32,
    as the server's SGD (the sparse embedding's untouched rows stay as they are). The server's
    build (-march=native) lets the compiler fuse the multiply and the subtraction where the CPU has
    FMA, rounding once: `fused` computes it so (lr * g is exact in float64, and the one rounding of
    the difference to float32 is the FMA's but for double-rounding ties, which these values do not
    hit); else lr * g is rounded first."""
    model = make_model(0)
    lr32 = torch.tensor(lr, dtype=torch.float32)
    for x, ids, offsets, y in batches(7, steps):
        model.zero_grad(set_to_none=True)
        torch.nn.functional.cross_entropy(model(x, ids, offsets), y).backward()
        with torch.no_grad():
            for p in model.parameters():
                g = p.grad.coalesce().to_dense() if p.grad.is_sparse else p.grad
                if fused:
                    p.copy_((p.double() - lr32.double() * g.double()).float())
                else:
                    p.copy_(p - lr32 * g)
    return model


def differences(model, reference):
    return {name: (got - want).abs().max().item()
            for (name, got), (_, want) in zip(model.named_parameters(), reference.named_parameters())
            if not torch.equal(got, want)}


@pytest.mark.parametrize("consistency", ["bsp", "asp"])
def test_n_steps_through_the_server_equal_n_local_sgd_steps_exactly(make_job, consistency):
    lr, steps = 0.05, 12
    job = make_job(job_spec(make_model(0), lr=lr, consistency=consistency))
    model = make_model(0)
    with shmps.Worker(job.name, rank=0) as w:
        ps = shmps.torch.ParameterServer(model, worker=w)
        assert ps.rank == 0 and all(w.is_put(p.name) for p in w.params())
        for x, ids, offsets, y in batches(7, steps):
            ps.zero_grad()
            torch.nn.functional.cross_entropy(model(x, ids, offsets), y).backward()
            ps.step()
            if consistency == "asp":
                ps.finish()  # one worker in ASP: wait for the push, so that the next pull sees it
            ps.pull()
        if consistency == "bsp":  # the module's parameters are the segment's values (views)
            fc = dict(model.named_parameters())["fc.weight"]
            assert np.shares_memory(fc.detach().numpy(), w.view("fc.weight"))
        ps.finish()
        ps.close()  # gives the module storage of its own again (BSP) before the worker leaves
        # Bit for bit equal to one of the two ways float32 SGD can round (see sgd_reference).
        reference = sgd_reference(lr, steps, fused=True)
        if differences(model, reference):
            unfused = sgd_reference(lr, steps, fused=False)
            assert not differences(model, unfused), (differences(model, reference), differences(model, unfused))
            reference = unfused
        # The embedding rows no batch touched still hold rank 0's initial values.
        untouched = make_model(0).emb.weight[EMBEDDINGS // 2:]
        assert torch.equal(model.emb.weight[EMBEDDINGS // 2:], untouched)
        # The buffers stayed in the module, and were updated there.
        assert model.bn.num_batches_tracked.item() == steps
        rows, _ = w.pull_rows("emb.weight", np.arange(EMBEDDINGS))
        assert np.array_equal(rows, reference.emb.weight.detach().numpy())


def test_rank_0_puts_the_others_wait_and_a_restarted_rank_0_does_not_put_again(make_job):
    job = make_job(job_spec(make_model(0), lr=0.05, consistency="asp"))
    # Rank 1 first, with another seed: it waits for rank 0's put, then holds rank 0's values.
    r1 = job.python("torch_ps_worker.py", "init", "--seed", "1", env={"SHMPS_RANK": "1"})
    time.sleep(1.0)
    assert r1.running(), r1.output()
    r0 = job.python("torch_ps_worker.py", "init", "--seed", "0", env={"SHMPS_RANK": "0"})
    assert r0.wait(60) == 0, r0.output()
    assert r1.wait(60) == 0, r1.output()
    values = [line for line in r0.output().splitlines() if line.startswith("values ")]
    assert values and values == [line for line in r1.output().splitlines() if line.startswith("values ")]
    # Train a few steps (rank 0, with a DataLoader of 2 worker processes), then a fresh rank 0 with
    # another seed: it must not put its new module over the trained values.
    t0 = job.python("torch_ps_worker.py", "train", "--seed", "0", "--steps", "5", "--loader-workers", "2",
                    env={"SHMPS_RANK": "0"})
    assert t0.wait(90) == 0, t0.output()
    assert "trained 5" in t0.output()
    with shmps.Worker(job.name, rank=2) as w:
        trained, _ = w.pull("fc.weight")
    again = job.python("torch_ps_worker.py", "init", "--seed", "5", env={"SHMPS_RANK": "0"})
    assert again.wait(60) == 0, again.output()
    with shmps.Worker(job.name, rank=2) as w:
        after, _ = w.pull("fc.weight")
        assert w.put_rank("fc.weight") == 0
    assert np.array_equal(trained, after)
    assert not np.array_equal(after, make_model(5).fc.weight.detach().numpy())


def test_a_module_that_does_not_match_the_job_is_refused_and_nothing_is_put(make_job):
    job = make_job(job_spec(make_model(0), lr=0.05))
    other = torch.nn.Sequential(torch.nn.Linear(3, 2))
    with shmps.Worker(job.name, rank=0) as w:
        with pytest.raises(shmps.Error, match=r"'0.weight' \(2, 3\) is not in job .*python3 -m shmps.spec"):
            shmps.torch.ParameterServer(other, worker=w)
        assert not any(w.is_put(p.name) for p in w.params())


def test_ctrl_c_interrupts_a_wait(make_job):
    job = make_job(job_spec(make_model(0), lr=0.05))
    p = job.python("torch_ps_worker.py", "wait-forever", env={"SHMPS_RANK": "3"})
    deadline = time.monotonic() + 30
    while "waiting" not in p.output():
        assert p.running() and time.monotonic() < deadline, p.output()
        time.sleep(0.05)
    time.sleep(0.5)  # inside the pull's wait
    p.popen.send_signal(signal.SIGINT)
    start = time.monotonic()
    code = p.wait(10)
    assert code is not None, "the wait was not interrupted within 10 s"
    assert time.monotonic() - start < 2.0
    assert code != 0 and "KeyboardInterrupt" in p.output(), p.output()


def bf16_model():
    torch.manual_seed(3)
    return torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.ReLU(), torch.nn.Linear(8, 3)).to(torch.bfloat16)


def bf16_batches(count):
    g = torch.Generator().manual_seed(11)
    for _ in range(count):
        yield torch.randn(5, 6, generator=g).to(torch.bfloat16), torch.randint(0, 3, (5,), generator=g)


@pytest.mark.parametrize("consistency", ["bsp", "asp"])
def test_a_bfloat16_module_is_served_in_bf16_and_updated_as_float32_rounded_once(make_job, consistency):
    """lr = 1/8 makes lr * g exact in float32, so the server's step is p - lr * g rounded to
    float32 (with or without FMA alike), then to bf16 once: the local reference does the same."""
    lr, steps = 0.125, 8
    text = job_spec(bf16_model(), lr=lr, consistency=consistency)
    assert text.count('dtype = "bf16"') == 4
    job = make_job(text)
    model = bf16_model()
    with shmps.Worker(job.name, rank=0) as w:
        assert {p.name: p.dtype_name for p in w.params()} == {n: "bfloat16" for n, _ in model.named_parameters()}
        ps = shmps.torch.ParameterServer(model, worker=w)
        for x, y in bf16_batches(steps):
            ps.zero_grad()
            torch.nn.functional.cross_entropy(model(x).float(), y).backward()
            ps.step()
            if consistency == "asp":
                ps.finish()
            ps.pull()
        if consistency == "bsp":  # bf16 views: the module's bfloat16 parameters are the segment's 2-byte values
            assert model[0].weight.dtype == torch.bfloat16
            assert np.shares_memory(model[0].weight.detach().view(torch.int16).numpy(), w.view("0.weight"))
        ps.finish()
        ps.close()
    reference = bf16_model()
    for x, y in bf16_batches(steps):
        reference.zero_grad(set_to_none=True)
        torch.nn.functional.cross_entropy(reference(x).float(), y).backward()
        with torch.no_grad():
            for p in reference.parameters():
                p.copy_((p.float() - lr * p.grad.float()).to(torch.bfloat16))
    assert not differences(model, reference), differences(model, reference)
    assert not torch.equal(model[0].weight, bf16_model()[0].weight)  # it did train


class Bf16Embedded(torch.nn.Module):
    """A bfloat16 sparse nn.Embedding (a bf16 table: torch 1.13 has no bfloat16 EmbeddingBag on
    the CPU) summed per sample, then a bfloat16 linear layer."""

    def __init__(self):
        super().__init__()
        self.emb = torch.nn.Embedding(16, 6, sparse=True)
        self.fc = torch.nn.Linear(6, 3)

    def forward(self, ids):
        return self.fc(self.emb(ids).sum(1))


def bf16_embedded_model():
    torch.manual_seed(5)
    return Bf16Embedded().to(torch.bfloat16)


@pytest.mark.parametrize("consistency", ["bsp", "asp"])
def test_a_bfloat16_sparse_embedding_is_a_bf16_table_updated_as_float32_rounded_once(make_job, consistency):
    """The table's rows and the linear layer in bf16; its sparse gradient, coalesced (repeated ids
    summed by torch, as the local reference sums them), is pushed as bf16 rows (the worker widens
    them exactly); each row's step
    is p - lr * g in float32 (lr = 1/8: exact), rounded to bf16 once, as the reference does."""
    lr, steps = 0.125, 6
    text = job_spec(bf16_embedded_model(), lr=lr, consistency=consistency)
    assert "[[table]]" in text and text.count('dtype = "bf16"') == 3, text
    job = make_job(text)
    model = bf16_embedded_model()
    g = torch.Generator().manual_seed(2)
    batches = [(torch.randint(0, 8, (4, 3), generator=g), torch.randint(0, 3, (4,), generator=g)) for _ in range(steps)]
    with shmps.Worker(job.name, rank=0) as w:
        info = {p.name: p for p in w.params()}
        assert info["emb.weight"].is_table and info["emb.weight"].dtype_name == "bfloat16"
        ps = shmps.torch.ParameterServer(model, worker=w)
        for ids, y in batches:
            ps.zero_grad()
            torch.nn.functional.cross_entropy(model(ids).float(), y).backward()
            assert model.emb.weight.grad.is_sparse
            ps.step()
            if consistency == "asp":
                ps.finish()
            ps.pull()
        ps.finish()
        ps.own_copy()
        ps.close()
    reference = bf16_embedded_model()
    for ids, y in batches:
        reference.zero_grad(set_to_none=True)
        torch.nn.functional.cross_entropy(reference(ids).float(), y).backward()
        with torch.no_grad():
            grad = reference.emb.weight.grad.coalesce()
            rows, values = grad.indices()[0], grad.values()
            reference.emb.weight[rows] = (reference.emb.weight[rows].float() - lr * values.float()).to(torch.bfloat16)
            for p in reference.fc.parameters():
                p.copy_((p.float() - lr * p.grad.float()).to(torch.bfloat16))
    assert not differences(model, reference), differences(model, reference)
    assert not torch.equal(model.emb.weight, bf16_embedded_model().emb.weight)  # it did train
    assert torch.equal(model.emb.weight[8:], bf16_embedded_model().emb.weight[8:])  # rows no batch touched


def test_the_sparse_embedding_takes_its_own_row_wise_adagrad_and_the_dense_layers_the_jobs_sgd(make_job):
    """table_optimizer: the spec gives every sparse embedding its own optimizer (here row-wise
    AdaGrad: one accumulator per row, s += mean(g^2), row -= lr g / (sqrt(s) + eps)), the dense
    layers keep the job's SGD. Trained in BSP through shmps.torch, against the same steps taken
    locally (float64 accumulators, as the server keeps them)."""
    lr, table_lr, eps, steps = 0.05, 0.5, 1e-6, 8
    text = job_spec(make_model(0), lr=lr, consistency="bsp",
                    table_optimizer={"kind": "rowwise_adagrad", "lr": table_lr, "eps": eps})
    import tomllib

    spec = tomllib.loads(text)
    assert spec["optimizer"] == {"kind": "sgd", "lr": lr}
    assert spec["table"][0]["optimizer"] == {"kind": "rowwise_adagrad", "lr": table_lr, "eps": eps}
    job = make_job(text)
    model = make_model(0)
    with shmps.Worker(job.name, rank=0) as w:
        ps = shmps.torch.ParameterServer(model, worker=w)
        for x, ids, offsets, y in batches(7, steps):
            ps.zero_grad()
            torch.nn.functional.cross_entropy(model(x, ids, offsets), y).backward()
            ps.step()
            ps.pull()
        ps.finish()
        ps.close()
        rows, _ = w.pull_rows("emb.weight", np.arange(EMBEDDINGS))
    reference = make_model(0)
    acc = np.zeros(EMBEDDINGS)
    for x, ids, offsets, y in batches(7, steps):
        reference.zero_grad(set_to_none=True)
        torch.nn.functional.cross_entropy(reference(x, ids, offsets), y).backward()
        with torch.no_grad():
            grad = reference.emb.weight.grad.coalesce()
            for row, g in zip(grad.indices()[0].tolist(), grad.values().double()):
                acc[row] += float((g * g).mean())
                factor = np.float32(table_lr / (np.sqrt(acc[row]) + eps))
                reference.emb.weight[row] -= factor * g.float()
            for name, p in reference.named_parameters():
                if name != "emb.weight":
                    p -= lr * p.grad
    want = reference.emb.weight.detach().numpy()
    assert np.allclose(rows, want, rtol=0, atol=1e-5), np.abs(rows - want).max()
    assert np.array_equal(rows[EMBEDDINGS // 2:], make_model(0).emb.weight.detach().numpy()[EMBEDDINGS // 2:])
    # Row-wise AdaGrad's first step of a row moves each element by lr * g / sqrt(mean(g^2)): far
    # more than the job's SGD would (lr * g, with lr a tenth of table_lr and small gradients).
    first = make_model(0).emb.weight.detach().numpy()
    moved = np.abs(rows[:EMBEDDINGS // 2] - first[:EMBEDDINGS // 2]).max()
    assert moved > 0.1, moved
    for name, p in model.named_parameters():
        if name != "emb.weight":
            assert torch.allclose(p, dict(reference.named_parameters())[name], rtol=0, atol=1e-5), name


@pytest.mark.parametrize("args, message", [
    (["torch_ps_model.py:factory", "--table-lr", "0.1"], "give --table-optimizer too"),
    (["torch_ps_model.py:factory", "--table-optimizer", "rowwise_adagrad"], "table_optimizer needs an lr"),
])
def test_table_optimizer_errors_say_what_is_wrong(args, message):
    out = spec_cli(*args)
    assert out.returncode == 2 and out.stdout == "", out.stdout
    assert message in out.stderr, out.stderr


def test_the_spec_cli_writes_the_tables_own_optimizer():
    out = spec_cli("torch_ps_model.py:factory", "--optimizer", "adam", "--lr", "0.001", "--table-optimizer",
                   "rowwise_adagrad", "--table-lr", "0.1")
    assert out.returncode == 0, out.stderr
    import tomllib

    spec = tomllib.loads(out.stdout)
    assert spec["optimizer"] == {"kind": "adam", "lr": 0.001}
    assert spec["table"][0]["optimizer"] == {"kind": "rowwise_adagrad", "lr": 0.1}
    # A module without sparse embeddings has nothing for a table optimizer.
    with pytest.raises(shmps.spec.SpecError, match="has none"):
        shmps.torch.spec(torch.nn.Linear(2, 2), table_optimizer={"kind": "rowwise_adagrad", "lr": 0.1})
    with pytest.raises(shmps.spec.SpecError, match="one dtype per job"):
        shmps.torch.spec(make_model(0), table_optimizer={"kind": "adam", "lr": 0.1, "state_dtype": "bf16"})
