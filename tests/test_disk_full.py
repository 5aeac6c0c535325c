"""A full disk names the path, the free space and what the write needed, and leaves no temporary file behind:
on a real small file system (a tmpfs, mounted here as root) and with the failure emulated where a library's
own error text is the point."""

import errno
import os
import subprocess

import numpy as np
import pytest
import torch
from accelerate import Accelerator
from helpers import tiny_deeplab

from stpp_hf.data import PseudoLabelStore
from stpp_hf.disk_full import DiskFullError
from stpp_hf.file_io import atomic_write_bytes, temporary_path_for
from stpp_hf.training import trainer


@pytest.fixture
def small_disk(tmp_path):
    """A 4 MiB tmpfs. Mounting needs root: without it the test fails (a skipped full-disk test proves nothing)."""
    mount_point = tmp_path / "small_disk"
    mount_point.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(mount_point)], capture_output=True)
    if mounted.returncode != 0:
        pytest.fail(f"cannot mount a small tmpfs (root needed): {mounted.stderr.decode().strip()}")
    try:
        yield mount_point
    finally:
        subprocess.run(["umount", str(mount_point)], check=True)


def test_an_atomic_write_on_a_full_disk_names_path_free_space_and_size_and_removes_its_temporary(small_disk):
    path = small_disk / "results.json"
    with pytest.raises(DiskFullError) as error:
        atomic_write_bytes(path, b"x" * (6 << 20))
    message = str(error.value)
    assert error.value.errno == errno.ENOSPC
    assert str(path) in message and "MiB free" in message and "needed 6.0 MiB" in message, message
    assert os.listdir(small_disk) == []


def test_a_model_save_on_a_full_disk_removes_its_temporary_directory(small_disk):
    with pytest.raises(DiskFullError, match=r"writing .*best: the file system of .* has \d+\.\d MiB free") as error:
        trainer._save_model_dir(tiny_deeplab(num_labels=3), small_disk / "best")
    needed = sum(tensor.numel() * 4 for tensor in tiny_deeplab(num_labels=3).state_dict().values()) / 2**20
    assert f"the write needed {needed:.1f} MiB" in str(error.value)
    assert type(error.value.__cause__).__name__ == "SafetensorError"
    assert os.listdir(small_disk) == []


def test_a_checkpoint_on_a_full_disk_removes_its_temporary_directory(small_disk):
    accelerator = Accelerator(cpu=True)
    model = tiny_deeplab(num_labels=3)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model, optimizer = accelerator.prepare(model, optimizer)
    checkpoint = small_disk / "checkpoint"
    with pytest.raises(DiskFullError, match=rf"writing {checkpoint}: "):
        trainer._save_checkpoint(accelerator, checkpoint, {"epoch": 1})
    assert not temporary_path_for(checkpoint).exists() and os.listdir(small_disk) == []


def test_a_pseudo_label_on_a_full_disk_names_its_file_and_leaves_no_temporary(small_disk):
    store = PseudoLabelStore(small_disk / "store", fingerprint="f" * 64)
    store.put("first", np.zeros((8, 8), dtype=np.uint8))
    with open(small_disk / "filler", "wb", buffering=0) as stream:  # what other jobs leave: no space at all
        while True:
            try:
                stream.write(b"x" * 4096)
            except OSError:
                break
    noise = np.random.default_rng(0).integers(0, 21, size=(512, 512), dtype=np.uint8)  # a PNG of ~200 KiB
    with pytest.raises(DiskFullError, match=r"writing .*labels/second\.png: .* MiB free, the write needed"):
        store.put("second", noise)
    leftovers = [path.name for path in (small_disk / "store" / "labels").iterdir()]
    assert leftovers == ["first.png"], leftovers


@pytest.mark.parametrize(
    "failure",
    [
        OSError(errno.ENOSPC, "No space left on device"),
        RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 576 vs 534"),
    ],
)
def test_the_bare_errors_of_a_full_disk_become_named_ones(tmp_path, monkeypatch, failure):
    """torch's zip writer reports a full disk only as a file position mismatch; a bare errno 28 names nothing."""

    def save_state(output_dir, **kwargs):
        (tmp_path / output_dir / "optimizer.bin").write_bytes(b"x" * 2048)
        raise failure

    accelerator = Accelerator(cpu=True)
    monkeypatch.setattr(accelerator, "save_state", save_state)
    checkpoint = tmp_path / "checkpoint"
    with pytest.raises(DiskFullError, match=r"needed more than the 0\.0 MiB written when it filled") as error:
        trainer._save_checkpoint(accelerator, checkpoint, {"epoch": 1})
    assert error.value.__cause__ is failure and not temporary_path_for(checkpoint).exists()


def test_other_write_errors_pass_unchanged(tmp_path, monkeypatch):
    def fsync(descriptor):
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(os, "fsync", fsync)
    with pytest.raises(OSError) as error:
        atomic_write_bytes(tmp_path / "a.json", b"{}")
    assert not isinstance(error.value, DiskFullError) and os.listdir(tmp_path) == []
