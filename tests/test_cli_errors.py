"""User errors reach the `wsi-llava` command line as one `error: …` message and exit code 2;
`--debug` shows the traceback instead (issue #12)."""

from __future__ import annotations

import csv
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from wsi_llava.cli import main
from wsi_llava.config import ConfigError
from wsi_llava.data.manifest_writer import write_manifest_csv
from wsi_llava.errors import MissingFileError, WsiLlavaError


@pytest.fixture()
def config(tmp_path, tiny_llm, cohort) -> Path:
    """A valid stage-2 config on the shared cohort; each case breaks one thing with an override."""
    cfg = {"llm_name_or_path": str(tiny_llm), "vision_mode": "none", "image_seq_length": 4, "stage": "sft",
           "finetuning_type": "full", "freeze_language_model": True, "dataset": str(cohort.train_csv),
           "output_dir": str(tmp_path / "out"), "per_device_train_batch_size": 2, "max_steps": 1,
           "report_to": "none", "use_cpu": True}
    path = tmp_path / "stage2.yaml"
    path.write_text(yaml.safe_dump(cfg), encoding="utf-8")
    return path


def _duplicated_manifest(tmp_path: Path, cohort) -> Path:
    """The cohort's training manifest with its first row repeated at the end (line 2 and the last line)."""
    with open(cohort.train_csv, encoding="utf-8", newline="") as f:
        rows = list(csv.DictReader(f))
    for r in rows:
        r["h5_path"] = str(cohort.root / r["h5_path"])
    return write_manifest_csv(tmp_path / "dup.csv", rows + [rows[0]], fields=list(rows[0]))


def _case(name: str, tmp_path: Path, cohort) -> tuple[list[str], list[str]]:
    """``(overrides, strings the message must contain)`` besides the config file name."""
    if name == "unknown_key":
        return ["learnin_rate=0.1"], ["unknown config key", "'learnin_rate'", "did you mean 'learning_rate'"]
    if name == "missing_dataset":
        return [f"dataset={tmp_path / 'nope.csv'}"], ["dataset", "nope.csv", "not found", "Give a manifest path"]
    if name == "missing_projector":
        return [f"projector_path={tmp_path / 'nope.safetensors'}"], [
            "projector_path", "nope.safetensors", "does not exist", "stage-2 run"]
    if name == "missing_tower":
        return ["vision_mode=wsi", f"vision_tower={tmp_path / 'tower.pth'}"], [
            "vision_tower", "tower.pth", "does not exist", "remove the key"]
    if name == "missing_llm":
        return [f"llm_name_or_path={tmp_path / 'no_llm'}"], ["llm_name_or_path", "no_llm", "does not exist"]
    if name == "duplicate_rows":
        dup = _duplicated_manifest(tmp_path, cohort)
        n_lines = len(dup.read_text(encoding="utf-8").splitlines())
        return [f"dataset={dup}"], [f"{dup} line {n_lines} [question]", "duplicate", f"already at {dup} line 2",
                                    "skip_invalid"]
    raise AssertionError(name)


CASES = ["unknown_key", "missing_dataset", "missing_projector", "missing_tower", "missing_llm", "duplicate_rows"]


@pytest.mark.parametrize("name", CASES)
def test_user_error_is_one_message_and_exit_2(name, config, tmp_path, cohort, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    overrides, wanted = _case(name, tmp_path, cohort)
    assert main(["train", str(config), *overrides]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert err.startswith(f"error: {config}: "), err
    assert len(err.strip().splitlines()) <= 2, err  # the message, plus the one bad row for data problems
    for text in wanted:
        assert text in err, (text, err)


@pytest.mark.parametrize("where", ["before", "after"])
def test_debug_reraises(where, config, tmp_path, cohort, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for name, kind in [("unknown_key", ConfigError), ("missing_projector", ConfigError)]:
        overrides, _ = _case(name, tmp_path, cohort)
        argv = ["--debug", "train", str(config), *overrides] if where == "before" else \
            ["train", "--debug", str(config), *overrides]
        with pytest.raises(kind):
            main(argv)


def test_debug_at_the_end(config, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError, match="projector_path"):
        main(["train", str(config), f"projector_path={tmp_path / 'x.safetensors'}", "--debug"])


def test_missing_file_error_is_both():
    """Converted FileNotFoundErrors stay catchable as such."""
    e = MissingFileError("projector_path /x does not exist")
    assert isinstance(e, WsiLlavaError) and isinstance(e, FileNotFoundError) and str(e) == "projector_path /x does not exist"


@pytest.mark.parametrize("debug", [False, True])
def test_console_output(debug, config, tmp_path):
    """What a user sees in a terminal: one line and code 2, or the traceback with --debug."""
    cmd = [sys.executable, "-m", "wsi_llava.cli", *(["--debug"] if debug else []), "train", str(config),
           "learnin_rate=0.1"]
    proc = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONWARNINGS": "ignore"})
    if debug:
        assert proc.returncode == 1 and "Traceback" in proc.stderr and "ConfigError" in proc.stderr
    else:
        assert proc.returncode == 2, proc.stderr
        assert proc.stderr.strip().splitlines() == [
            f"error: {config}: unknown config key(s): 'learnin_rate' (did you mean 'learning_rate'?)"]
