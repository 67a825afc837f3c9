"""Values stored in bf16 or fp16 (the spec's dtype) from Python: Param.dtype and dtype_name, pull()
converting into float32 or copying the stored 2-byte values into a uint16 / float16 array (or a
torch.bfloat16 tensor), view() over the stored values, exact small-integer sums, and an exported
safetensors file that torch and safetensors load as bfloat16 / float16."""

import json
import struct
import subprocess

import numpy as np
import pytest

import shmps
from conftest import BIN_DIR

SPEC = """slice_bytes = 1024
max_workers = 4
[optimizer]
kind = "sgd"
lr = 1.0
[[param]]
name = "w"
shape = [3, 500]
dtype = "bf16"
init = { kind = "constant", value = 0.1 }
[[param]]
name = "h"
shape = [700]
dtype = "fp16"
init = { kind = "constant", value = 0.1 }
[[param]]
name = "f"
shape = [7]
"""


def bf16_bits(values):
    """float32 -> bfloat16 bit patterns, rounded to nearest even (numpy has no bfloat16)."""
    u = np.ascontiguousarray(values, dtype=np.float32).view(np.uint32).astype(np.uint64)
    return ((u + 0x7FFF + ((u >> 16) & 1)) >> 16).astype(np.uint16)


def from_bf16_bits(bits):
    return (bits.astype(np.uint32) << 16).view(np.float32)


def test_params_say_their_stored_dtype(make_job):
    job = make_job(SPEC)
    with shmps.Worker(job.name, rank=0) as w:
        p = {x.name: x for x in w.params()}
        assert p["w"].dtype_name == "bfloat16" and p["w"].dtype == np.uint16  # numpy has no bfloat16: its bits
        assert p["h"].dtype_name == "float16" and p["h"].dtype == np.float16
        assert p["f"].dtype_name == "float32" and p["f"].dtype == np.float32
        assert "dtype=bfloat16" in repr(p["w"])


def test_pull_converts_or_copies_the_stored_values_and_view_is_the_segment(make_job):
    job = make_job(SPEC)
    with shmps.Worker(job.name, rank=0) as w:
        # The initial 0.1, rounded to nearest even when the segment was made.
        values, version = w.pull("w")
        assert values.dtype == np.float32 and values.shape == (3, 500) and version == 0
        assert np.all(values == from_bf16_bits(bf16_bits(np.float32(0.1)))) and values[0, 0] != np.float32(0.1)
        h, _ = w.pull("h")
        assert np.all(h == np.float16(0.1).astype(np.float32))
        # Small integers: exact sums (lr 1), pushed as float32.
        grad = np.random.default_rng(5).integers(-4, 5, size=(3, 500)).astype(np.float32)
        for _ in range(3):
            w.push("w", grad)
        w.wait_applied(w.push("h", np.arange(700, dtype=np.float32) % 9 - 4))
        expect = from_bf16_bits(bf16_bits(np.full((3, 500), 0.1, dtype=np.float32)))
        for _ in range(3):  # each optimizer step computed in float32, then rounded to nearest even
            expect = from_bf16_bits(bf16_bits(expect - grad))
        values, version = w.pull("w")
        np.testing.assert_array_equal(values, expect)
        assert version == 3
        # The stored bits, as they are: into uint16, float16 (fp16 only) or a torch.bfloat16 tensor.
        raw = np.empty((3, 500), dtype=np.uint16)
        out, _ = w.pull("w", out=raw)
        assert out is raw
        np.testing.assert_array_equal(raw, bf16_bits(values))
        h16 = np.empty(700, dtype=np.float16)
        w.pull("h", out=h16)
        np.testing.assert_array_equal(h16.astype(np.float32), w.pull("h")[0])
        part = np.empty(10, dtype=np.uint16)
        w.pull("w", out=part, offset=495)
        np.testing.assert_array_equal(part, raw.reshape(-1)[495:505])
        with pytest.raises(shmps.Error, match="uint16 .bfloat16 bit patterns."):
            w.pull("w", out=np.empty(1500, dtype=np.float16))  # fp16 bits are not bf16's
        with pytest.raises(shmps.Error, match="float32"):
            w.pull("f", out=np.empty(7, dtype=np.uint16))
        # view(): read-only, over the segment's 2-byte values.
        v = w.view("w")
        assert v.dtype == np.uint16 and v.shape == (3, 500) and not v.flags.writeable
        np.testing.assert_array_equal(v, raw)
        vh = w.view("h")
        assert vh.dtype == np.float16
        np.testing.assert_array_equal(vh, h16)
        assert w.view("w", offset=100, count=5).shape == (5,)
        try:
            import torch
        except ImportError:
            return
        # The documented line: the view as torch.bfloat16, sharing the memory (no copy). (torch
        # takes no uint16 array in from_numpy: its int16 view, the same bits, is taken instead.)
        with pytest.warns(UserWarning):  # torch warns that the array is not writeable
            t = torch.from_numpy(v.view(np.int16)).view(torch.bfloat16)
        assert t.data_ptr() == v.__array_interface__["data"][0]
        assert t.dtype == torch.bfloat16 and t.shape == (3, 500)
        assert torch.equal(t.float(), torch.from_numpy(values))
        tb = torch.empty((3, 500), dtype=torch.bfloat16)
        w.pull("w", out=tb)
        assert torch.equal(tb.float(), torch.from_numpy(values))


def read_safetensors_header(path):
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        return json.loads(f.read(n))


def test_export_writes_bf16_and_f16_tensors_that_torch_loads(make_job, tmp_path):
    job = make_job(SPEC)
    with shmps.Worker(job.name, rank=0) as w:
        w.wait_applied(w.push("w", np.full((3, 500), 2.0, dtype=np.float32)))
        values, _ = w.pull("w")
        h, _ = w.pull("h")
    path = tmp_path / "export.safetensors"
    subprocess.run([BIN_DIR / "shmps-ctl", "export", job.name, path], check=True, capture_output=True)
    header = read_safetensors_header(path)
    assert header["w"]["dtype"] == "BF16" and header["h"]["dtype"] == "F16" and header["f"]["dtype"] == "F32"
    try:
        import torch
    except ImportError:
        pytest.skip("python3-torch is not installed")
    try:
        from safetensors.torch import load_file
    except ImportError:  # the format by hand, as safetensors.torch reads it: little-endian tensors
        def load_file(name):
            head = read_safetensors_header(name)
            raw = open(name, "rb").read()
            (n,) = struct.unpack("<Q", raw[:8])
            data = raw[8 + n:]
            dtypes = {"BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32, "I64": torch.int64}
            out = {}
            for key, t in head.items():
                if key == "__metadata__":
                    continue
                lo, hi = t["data_offsets"]
                out[key] = torch.frombuffer(bytearray(data[lo:hi]), dtype=dtypes[t["dtype"]]).reshape(t["shape"])
            return out
    loaded = load_file(str(path))
    assert loaded["w"].dtype == torch.bfloat16 and loaded["h"].dtype == torch.float16
    assert torch.equal(loaded["w"].float(), torch.from_numpy(values))
    assert torch.equal(loaded["h"].float(), torch.from_numpy(h))


TABLE_SPEC = SPEC + """[[table]]
name = "t"
rows = 16
dim = 4
dtype = "bf16"
"""


def test_a_2_byte_gradient_is_pushed_in_the_parameters_own_type(make_job):
    """bf16 bits (uint16), float16 values, and a bf16 table's rows: each widened exactly, so SGD at
    lr 1 from 0.1 gives 0.1 - g rounded once, as a float32 push of the same values; a NaN's bits are
    refused and change nothing; 2-byte gradients for a float32 parameter are refused with a hint."""
    job = make_job(TABLE_SPEC)

    def pulled(w, name):
        return w.pull(name)[0].reshape(-1)

    with shmps.Worker(job.name, rank=0) as w:
        g = np.arange(1500, dtype=np.float32).reshape(3, 500) % 7 - 3  # small integers: exact in bf16
        w.wait_applied(w.push("w", bf16_bits(g)))
        start = from_bf16_bits(bf16_bits(np.full(1500, 0.1, dtype=np.float32)))
        assert np.array_equal(pulled(w, "w"), from_bf16_bits(bf16_bits(start - g.reshape(-1))))
        h = (np.arange(700) % 5 - 2).astype(np.float16) * np.float16(0.25)
        w.wait_applied(w.push("h", h))
        want = (np.full(700, 0.1, dtype=np.float16).astype(np.float32) - h.astype(np.float32)).astype(np.float16)
        assert np.array_equal(pulled(w, "h"), want.astype(np.float32))
        w.wait_applied(w.push("h", h.view(np.uint16)))  # the same values as their bits
        want = (want.astype(np.float32) - h.astype(np.float32)).astype(np.float16)
        assert np.array_equal(pulled(w, "h"), want.astype(np.float32))

        before = pulled(w, "w")
        bad = bf16_bits(g).reshape(-1)
        bad[777] = 0x7FC0  # a bf16 NaN
        with pytest.raises(shmps.Error, match=r"push to 'w'.*element 777"):
            w.push("w", bad)
        with pytest.raises(shmps.Error, match=r"'f' stores float32 values \(dtype f32\): pass a float32 gradient"):
            w.push("f", np.zeros(7, dtype=np.float16))
        w.wait_applied(w.push("f", np.ones(7, dtype=np.float32)))
        assert np.array_equal(pulled(w, "w"), before), "a refused push changes nothing"

        ids = np.array([3, 3, 9], dtype=np.int64)
        rows = np.array([[1, 2, 3, 4], [0.5, 0.5, 0.5, 0.5], [-8, 0, 8, 16]], dtype=np.float32)
        w.wait_applied(w.push_rows("t", ids, bf16_bits(rows)))
        got, _ = w.pull_rows("t", np.array([3, 9, 0], dtype=np.int64))
        assert np.array_equal(got, np.array([[-1.5, -2.5, -3.5, -4.5], [8, 0, -8, -16], [0, 0, 0, 0]],
                                            dtype=np.float32))
        raw = np.empty((3, 4), dtype=np.uint16)
        out, _ = w.pull_rows("t", np.array([3, 9, 0], dtype=np.int64), out=raw)
        assert out is raw and np.array_equal(raw, bf16_bits(got))  # the stored bits, as they are
        with pytest.raises(shmps.Error, match=r"pull_rows\('t', ids, out=...\): out has 8 elements, 3 rows of 4 need 12"):
            w.pull_rows("t", np.array([3, 9, 0], dtype=np.int64), out=np.empty(8, dtype=np.uint16))


BIG_SPEC = """slice_bytes = 65536
max_workers = 2
{ring}[optimizer]
kind = "sgd"
lr = 1.0
[[param]]
name = "big"
shape = [300000]
dtype = "bf16"
[[param]]
name = "half"
shape = [8]
dtype = "fp16"
"""


@pytest.mark.parametrize("ring", ["", "ring_bytes = 262144\n"], ids=["one-record", "streamed"])
def test_a_big_2_byte_push_is_checked_whole_and_lands_exactly(make_job, ring):
    """300,000 bf16 elements (1.2 MB as float32): one ring record written with streaming stores,
    or, in a 256 KiB ring, a push streamed in chunks. A NaN far into it (element 250,001) refuses
    the whole push; then the same gradient without it lands exactly. A torch.bfloat16 tensor for
    an fp16 parameter, or an int16 array as a gradient, is refused rather than read as bits."""
    job = make_job(BIG_SPEC.format(ring=ring))
    with shmps.Worker(job.name, rank=0) as w:
        g = (np.arange(300000) % 9 - 4).astype(np.float32)
        bits = bf16_bits(g)
        bad = bits.copy()
        bad[250001] = 0x7F80  # +inf in bf16
        with pytest.raises(shmps.Error, match=r"push to 'big' rejected: element 250001 is infinite"):
            w.push("big", bad)
        w.wait_applied(w.push("big", bits))
        values, version = w.pull("big")
        assert version == 1 and np.array_equal(values, -g)
        try:
            import torch
        except ImportError:  # the rest needs no torch
            torch = None
        if torch is not None:
            with pytest.raises(shmps.Error, match=r"is a torch.bfloat16 tensor, but the parameter stores float16"):
                w.push("half", torch.zeros(8, dtype=torch.bfloat16))
        with pytest.raises(shmps.Error, match=r"must have dtype float16 or uint16"):
            w.push("half", np.zeros(8, dtype=np.int16))
