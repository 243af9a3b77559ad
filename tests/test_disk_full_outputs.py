"""A full disk while writing a user's output (``export-tower``, ``encode``, ``embed``) says
``disk full while writing PATH`` as one error line (exit 2) and leaves no temporary file. A real
full disk: a 1 MiB tmpfs filled up (skips with the reason where mounting is not allowed)."""

from __future__ import annotations

import errno
import shutil
from pathlib import Path

import pytest
import torch

from wsi_llava.cli import main as cli
from wsi_llava.errors import WsiLlavaError
from wsi_llava.fileio import atomic_write_text, disk_full_error
from wsi_llava.model.export import save_tower
from wsi_llava.model.slide_encoder import SlideEncoder, SlideEncoderConfig

pytestmark = pytest.mark.timeout(300)

ENC = dict(embed_dim=32, depth=2, num_heads=4, segment_lengths=[32, 64], dilations=[1, 2])


@pytest.fixture(scope="module")
def tower(tmp_path_factory) -> Path:
    torch.manual_seed(5)
    return save_tower(SlideEncoder(SlideEncoderConfig(in_dim=16, **ENC)),
                      tmp_path_factory.mktemp("tower") / "tower.safetensors")


@pytest.fixture()
def full_disk(small_tmpfs):
    """A 1 MiB tmpfs holding one file that fills it: every further write fails with ENOSPC."""
    where = small_tmpfs("1m")
    (where / "filler").write_bytes(b"\0" * shutil.disk_usage(where).free)
    return where


def only_filler(disk: Path) -> None:
    """Nothing left behind: no output, no temporary file, only the filler (and empty folders)."""
    assert sorted(p.relative_to(disk).as_posix() for p in disk.rglob("*") if p.is_file()) == ["filler"]


def error_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    return err[0]


@pytest.mark.parametrize("name", ["tower.safetensors", "tower.pth"])
def test_export_tower_on_a_full_disk(full_disk, tower, capsys, name):
    out = full_disk / "out" / name
    capsys.readouterr()
    assert cli(["export-tower", str(tower), "--out", str(out)]) == 2
    line = error_line(capsys)
    assert line.startswith(f"error: could not write {out}: disk full while writing {out.parent}"), line
    only_filler(full_disk)


def test_encode_on_a_full_disk(full_disk, tower, cohort, capsys):
    out = full_disk / "cache"
    capsys.readouterr()
    assert cli(["encode", "--vision-tower", str(tower), "--data", str(cohort.test_csv), "--out", str(out),
                "--device", "cpu", "--no-progress"]) == 2
    line = error_line(capsys)
    assert "disk full while writing " + str(out) in line, line
    only_filler(full_disk)


def test_embed_on_a_full_disk(full_disk, tower, cohort, capsys):
    out = full_disk / "emb.h5"
    capsys.readouterr()
    assert cli(["embed", "--vision-tower", str(tower), "--data", str(cohort.test_csv), "--out", str(out),
                "--patches-per-wsi", "16", "--no-progress"]) == 2
    line = error_line(capsys)
    assert f"could not write {out}: disk full while writing " in line, line
    only_filler(full_disk)


def test_atomic_write_text_leaves_no_temp_file(full_disk):
    target = full_disk / "metrics.json"
    with pytest.raises(OSError) as info:
        atomic_write_text(target, "x" * 100_000)
    assert info.value.errno == errno.ENOSPC
    only_filler(full_disk)


def test_disk_full_error_only_for_a_full_disk(tmp_path):
    enospc = OSError(errno.ENOSPC, "No space left on device", str(tmp_path / ".x.tmp"))
    e = disk_full_error(enospc, tmp_path / ".x.tmp", tmp_path / "x")
    assert isinstance(e, WsiLlavaError)
    assert str(e).startswith(f"could not write {tmp_path / 'x'}: disk full while writing {tmp_path / '.x.tmp'}")
    assert disk_full_error(OSError(errno.EACCES, "Permission denied"), tmp_path, tmp_path / "x") is None
    assert disk_full_error(ValueError("bad"), tmp_path, tmp_path / "x") is None  # plenty of space here
