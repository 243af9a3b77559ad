"""Safe loading: a crafted pickle that would run code is refused everywhere a weight file is read,
and the code never runs (the marker file it would write never appears)."""

from __future__ import annotations

import pickle
import re
from pathlib import Path

import pytest
import torch

from wsi_llava.train import checkpoint as ck

SRC = Path(__file__).resolve().parents[1] / "src" / "wsi_llava"


class Payload:
    """Unpickling this runs ``exec`` (writes the marker file)."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (exec, (f"open({str(self.marker)!r}, 'w').write('code ran')",))


def crafted(path: Path, marker: Path, *, bare: bool = False, wrap=lambda p: {"model": {"w": p}}) -> Path:
    """A weight file whose pickle calls ``exec``: ``torch.save`` format, or a bare pickle."""
    obj = wrap(Payload(marker))
    if bare:
        path.write_bytes(pickle.dumps(obj))
    else:
        torch.save(obj, path)
    return path


@pytest.fixture
def marker(tmp_path) -> Path:
    m = tmp_path / "PWNED"
    yield m
    assert not m.exists(), "the crafted pickle ran code"


def test_the_payload_is_live(tmp_path):
    """Control: unpickled without protection, the crafted file does run code."""
    live = tmp_path / "LIVE"
    torch.load(crafted(tmp_path / "x.pth", live), weights_only=False)
    assert live.read_text() == "code ran"


@pytest.mark.parametrize("bare", [False, True], ids=["torch.save", "bare-pickle"])
@pytest.mark.parametrize("suffix", [".pth", ".bin"])
def test_slide_encoder_refuses_crafted_pickle(tmp_path, marker, bare, suffix):
    from wsi_llava.model.slide_encoder import load_slide_encoder

    path = crafted(tmp_path / f"slide_encoder{suffix}", marker, bare=bare)
    with pytest.raises(ValueError, match=re.escape(str(path)) + r": cannot read slide encoder weights \(Unpickling"):
        load_slide_encoder(path)


def test_projector_file_refuses_crafted_pickle(tiny_llm, tmp_path, marker):
    from wsi_llava.model.wsi_llava import WsiLlavaForConditionalGeneration
    from wsi_llava.train.stages import load_projector

    model, _ = WsiLlavaForConditionalGeneration.from_llm(str(tiny_llm), mm_hidden_size=16, image_seq_length=4)
    before = {k: v.clone() for k, v in model.multi_modal_projector.state_dict().items()}
    for name, bare in (("projector.safetensors", False), ("projector.bin", True)):
        path = crafted(tmp_path / name, marker, bare=bare)
        with pytest.raises(ValueError, match=f"{name} is not a readable safetensors file"):  # never unpickled
            load_projector(model, path)
    after = model.multi_modal_projector.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


def sealed_checkpoint(run: Path, step: int, **files) -> Path:
    """A checkpoint folder with the given files and a valid manifest (as an attacker who rewrote the
    manifest would leave it)."""
    folder = run / f"checkpoint-{step}"
    folder.mkdir(parents=True)
    (folder / "model.safetensors").write_bytes(b"\0" * 8)
    torch.save({"state": {}, "param_groups": []}, folder / "optimizer.pt")
    torch.save({"last_epoch": 1}, folder / "scheduler.pt")
    torch.save({"cpu": torch.random.get_rng_state()}, folder / "rng_state.pth")
    for name, make in files.items():
        make(folder / name.replace("__", "."))
    ck.write_manifest(folder, step)
    return folder


@pytest.mark.parametrize("name", ["rng_state.pth", "optimizer.pt", "scheduler.pt", "scaler.pt"])
@pytest.mark.parametrize("bare", [False, True], ids=["torch.save", "bare-pickle"])
def test_checkpoint_with_crafted_file_is_refused_before_loading(tmp_path, marker, name, bare):
    run = tmp_path / "run"
    folder = sealed_checkpoint(run, 4, **{name.replace(".", "__"): lambda p: crafted(p, marker, bare=bare)})
    expect = re.escape(str(folder / name)) + ": refusing to load: the pickle references " + (
        r"<not a torch.save archive" if bare else "builtins.exec")
    with pytest.raises(ck.UnsafeCheckpointError, match=expect):
        ck.resolve_resume(str(folder), run)
    with pytest.raises(ck.UnsafeCheckpointError, match=expect):  # never silently skipped either
        ck.resolve_resume(True, run)


def test_a_clean_checkpoint_passes_the_scan(tmp_path):
    run = tmp_path / "run"
    folder = sealed_checkpoint(run, 2)
    import random

    import numpy as np

    # HF's RNG file holds numpy state: allowed, as HF's own weights_only loader allows it
    torch.save({"python": random.getstate(), "numpy": np.random.get_state(), "cpu": torch.random.get_rng_state()},
               folder / "rng_state.pth")
    ck.write_manifest(folder, 2)
    assert ck.resolve_resume(True, run) == str(folder)


def tiny_trainer(tmp_path):
    from transformers import TrainingArguments

    from wsi_llava.train.trainer import WsiTrainer

    args = TrainingArguments(output_dir=str(tmp_path / "run"), use_cpu=True, report_to="none", max_steps=1)
    data = [{"x": torch.zeros(2)}]
    trainer = WsiTrainer(model=torch.nn.Linear(2, 2), args=args, train_dataset=data)
    trainer.create_optimizer_and_scheduler(num_training_steps=1)
    return trainer


def test_trainer_refuses_crafted_checkpoint_and_hf_loaders_are_weights_only(tmp_path, marker):
    trainer = tiny_trainer(tmp_path)
    run = Path(trainer.args.output_dir)
    folder = sealed_checkpoint(run, 3, rng_state__pth=lambda p: crafted(p, marker, wrap=lambda x: {"cpu": x}),
                               optimizer__pt=lambda p: crafted(p, marker, wrap=lambda x: {"state": x}))
    # our resume path refuses before Hugging Face touches a file
    with pytest.raises(ck.UnsafeCheckpointError, match="optimizer.pt: refusing to load"):
        trainer.train(resume_from_checkpoint=str(folder))
    # and Hugging Face's own loaders (transformers 5) read these files with weights_only=True
    with pytest.raises(pickle.UnpicklingError, match="Weights only load failed"):
        trainer._load_rng_state(str(folder))
    with pytest.raises(pickle.UnpicklingError, match="Weights only load failed"):
        trainer._load_optimizer_and_scheduler(str(folder))


def test_source_reads_weights_only_safely():
    """Every ``torch.load`` in the package passes ``weights_only=True``; nothing unpickles directly."""
    loads, offenders = 0, []
    for path in sorted(SRC.rglob("*.py")):
        text = path.read_text(encoding="utf-8")
        for m in re.finditer(r"torch\.load\(", text):
            loads += 1
            call = text[m.start(): text.find("\n", m.start())]
            if "weights_only=True" not in call:
                offenders.append(f"{path.relative_to(SRC)}: {call.strip()}")
        for pat in (r"\bpickle\.loads?\(", r"allow_pickle\s*=\s*True", r"\bjoblib\.load\(", r"\bdill\.",
                    r"weights_only\s*=\s*False"):
            offenders += [f"{path.relative_to(SRC)}: {pat}" for _ in re.finditer(pat, text)]
    assert loads >= 1  # the slide encoder's .pth reader
    assert offenders == []
