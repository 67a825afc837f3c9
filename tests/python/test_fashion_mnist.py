"""Fashion-MNIST, the real-data workload (docs/workloads.md section 5): the IDX reader
worker/python/shmps/fashion_mnist.py against the files of Debian's package dataset-fashion-mnist,
its errors on damaged files, and the example worker/python/examples/fashion_mnist.py trained
through shmps by two workers under shmps-launch, in ASP and in BSP (docs/fashion-mnist.md).

The reader is loaded from the source tree by path (numpy only). Everything is skipped, saying
so, where the data package is not installed; the example's runs also where python3-torch is not.
"""
from __future__ import annotations

import gzip
import importlib.util
import json
import re
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from conftest import BIN_DIR, PYTHON, SOURCE_DIR, child_env

PYDIR = SOURCE_DIR / "worker" / "python"
EXAMPLE = PYDIR / "examples" / "fashion_mnist.py"


def _load(name: str, path: Path):
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod
    spec.loader.exec_module(mod)
    return mod


FM = _load("shmps_fashion_mnist_under_test", PYDIR / "shmps" / "fashion_mnist.py")

needs_data = pytest.mark.skipif(
    not all(p.is_file() for split in ("train", "test") for p in FM.files(split)),
    reason=f"dataset-fashion-mnist is not installed (apt-get install dataset-fashion-mnist; looked in "
           f"{FM.data_dir()}): the Fashion-MNIST tests are skipped")


# ---- the reader -------------------------------------------------------------------------------

@needs_data
@pytest.mark.parametrize("split,count", [("train", 60000), ("test", 10000)])
def test_reader_gives_the_files_images_and_labels_with_ten_balanced_classes(split, count):
    images, labels = FM.load(split)
    assert images.shape == (count, 28, 28) and images.dtype == np.uint8
    assert labels.shape == (count,) and labels.dtype == np.uint8
    # Fashion-MNIST is balanced: 6000 images of each class in the training set, 1000 in the test set.
    assert np.bincount(labels, minlength=10).tolist() == [count // 10] * 10
    # Real pictures, not zeros: grey levels over the whole range, about 0.286 x 255 on average
    # (the mean the example standardises with).
    assert images.min() == 0 and images.max() == 255
    assert 0.27 < images.mean() / 255 < 0.30


@needs_data
def test_the_directory_comes_from_the_environment_when_set(tmp_path, monkeypatch):
    for p in FM.files("test"):
        shutil.copy(p, tmp_path / p.name)
    monkeypatch.setenv(FM.ENV_DIR, str(tmp_path))
    assert FM.files("test")[0] == tmp_path / "t10k-images-idx3-ubyte.gz"
    images, labels = FM.load("test")
    expected_images, expected_labels = FM.load("test", FM.DEFAULT_DIR)
    assert np.array_equal(images, expected_images) and np.array_equal(labels, expected_labels)


def test_a_missing_directory_says_which_file_and_which_package(tmp_path):
    with pytest.raises(FileNotFoundError) as e:
        FM.load("test", tmp_path / "nowhere")
    message = str(e.value)
    assert "t10k-images-idx3-ubyte.gz" in message and "apt-get install dataset-fashion-mnist" in message
    assert FM.ENV_DIR in message


def test_an_unknown_split_is_refused():
    with pytest.raises(ValueError, match="unknown Fashion-MNIST split 'validation'"):
        FM.load("validation")


def _labels_file(count: int, magic: int = FM.LABELS_MAGIC, extra: bytes = b"", cut: int = 0) -> bytes:
    """The bytes of an IDX labels file of `count` labels (0..9), with a header of its own."""
    body = bytes(i % 10 for i in range(count))
    data = struct.pack(">II", magic, count) + body + extra
    return data[:len(data) - cut] if cut else data


def _damage(case: str, good: Path, tmp_path: Path) -> Path:
    """A copy of the test split in tmp_path with its labels file damaged as `case` says."""
    for p in FM.files("test", good):
        shutil.copy(p, tmp_path / p.name)
    labels = tmp_path / "t10k-labels-idx1-ubyte.gz"
    raw = gzip.decompress(labels.read_bytes())
    if case == "truncated data":
        labels.write_bytes(gzip.compress(raw[:-1]))
    elif case == "trailing data":
        labels.write_bytes(gzip.compress(raw + b"\0"))
    elif case == "truncated gzip":
        packed = labels.read_bytes()
        labels.write_bytes(packed[:len(packed) // 2])
    elif case == "not gzip":
        labels.write_bytes(raw)  # the IDX file itself, not compressed
    elif case == "images magic":
        labels.write_bytes(gzip.compress(struct.pack(">I", FM.IMAGES_MAGIC) + raw[4:]))
    elif case == "wrong count":
        labels.write_bytes(gzip.compress(_labels_file(9999)))
    elif case == "label 10":
        labels.write_bytes(gzip.compress(raw[:8 + 1234] + b"\x0a" + raw[8 + 1235:]))
    elif case == "empty":
        labels.write_bytes(gzip.compress(b""))
    return labels


@needs_data
@pytest.mark.parametrize("case,what", [
    ("truncated data", r"holds 10007 bytes once decompressed, expected 10008 .* it is truncated"),
    ("trailing data", r"holds 10009 bytes once decompressed, expected 10008 .* longer than its header says"),
    ("truncated gzip", r"is not a complete gzip file"),
    ("not gzip", r"is not a complete gzip file"),
    ("images magic", r"starts with IDX magic 0x00000803, expected 0x00000801"),
    ("wrong count", r"declares dimensions 9999, expected 10000"),
    ("label 10", r"label 10 at index 1234, but there are 10 classes"),
    ("empty", r"holds 0 bytes once decompressed, less than its 8-byte IDX header"),
])
def test_a_damaged_file_gives_a_clear_error_naming_it(case, what, tmp_path):
    labels = _damage(case, FM.data_dir(), tmp_path)
    with pytest.raises(ValueError) as e:
        FM.load("test", tmp_path)
    message = str(e.value)
    assert str(labels) in message, message
    assert re.search(what, message), message
    assert "apt-get install --reinstall dataset-fashion-mnist" in message, message  # what to do


@needs_data
def test_a_truncated_images_file_is_refused_too(tmp_path):
    for p in FM.files("test"):
        shutil.copy(p, tmp_path / p.name)
    images = tmp_path / "t10k-images-idx3-ubyte.gz"
    raw = gzip.decompress(images.read_bytes())
    images.write_bytes(gzip.compress(raw[:16 + 28 * 28 * 9999], compresslevel=1))  # one image short
    with pytest.raises(ValueError, match=r"holds 7839232 bytes once decompressed, expected 7840016 \(16-byte "
                                         r"header \+ 7840000 values of 10000x28x28\): it is truncated"):
        FM.load("test", tmp_path)


# ---- the example through shmps ----------------------------------------------------------------

# One epoch of the first 12,000 training images (6,000 a worker), batch 32, plain SGD at 0.1, scored
# on the first 2,000 test images: 1.5 s of training on this 2-core machine when it is quiet (6 s for
# the whole job; 15 s and 35 s with other builds running), and a test accuracy of 0.81-0.83 in ASP,
# 0.75 in BSP (whose steps sum the two gradients: half as many updates, twice as large); the
# untrained model is at chance, 0.1.
TRAIN_SAMPLES, TEST_SAMPLES, BATCH, LR = 12000, 2000, 32, 0.1


def spec_of_example(job, consistency: str) -> Path:
    """The job's spec, written from the example's module by shmps.spec, as tools/quickstart does."""
    out = subprocess.run([PYTHON, "-m", "shmps.spec", f"{EXAMPLE}:make_model", "--name", job.name,
                          "--optimizer", "sgd", "--lr", str(LR), "--consistency", consistency],
                         env=child_env(), capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    path = job.tmp_path / f"{job.name}.toml"
    path.write_text(out.stdout)
    return path


@needs_data
@pytest.mark.parametrize("consistency", ["asp", "bsp"])
def test_two_workers_train_the_cnn_through_shmps_and_the_after_step_scores_it(make_job, consistency):
    pytest.importorskip(
        "torch", reason="python3-torch is not installed (apt-get install python3-torch): the Fashion-MNIST example's "
                        "runs are skipped")
    job = make_job("", start=False, tag="fashion")  # shmps-launch starts the server; the job cleans up
    spec = spec_of_example(job, consistency)
    p = job.start([BIN_DIR / "shmps-launch", "--spec", spec, "--name", job.name,
                   "--worker", EXAMPLE, "--worker", EXAMPLE,
                   "--after", f"{EXAMPLE} --evaluate --json --test-samples {TEST_SAMPLES}",
                   # shmps-launch passes what it does not know to every worker (not to --after).
                   "--epochs", "1", "--train-samples", str(TRAIN_SAMPLES), "--batch", str(BATCH),
                   "--log-every", "50", "--no-eval"])
    assert p.wait(80) == 0, p.output()
    out = p.output()
    per_worker = TRAIN_SAMPLES // BATCH // 2
    for rank in range(2):
        # Progress lines with the rank, the loss and the speed, then the worker's total.
        assert re.search(rf"\[w{rank}\] rank {rank}/2 epoch 1/1 batch 50/{per_worker} loss [0-9.]+ acc [0-9.]+ "
                         rf"\d+ samples/s", out), out
        assert f"[w{rank}] rank {rank}/2 trained {per_worker} batches, {per_worker * BATCH} samples" in out, out
    assert f"({consistency})" in out, out
    # Every step's 8 gradients applied once, and rank 0's 8 puts of the initial values.
    assert int(re.search(r"records_applied=(\d+)", out).group(1)) == 2 * per_worker * 8 + 8, out
    result = json.loads(re.search(r'\[after\] (\{"fashion_mnist": "result".*\})', out).group(1))
    assert result["mode"] == f"shmps {consistency}" and result["test_images"] == TEST_SAMPLES, out
    assert result["test_accuracy"] > 0.7, out
    assert re.search(rf"\[after\] test accuracy {result['test_accuracy']:.4f} ", out), out
