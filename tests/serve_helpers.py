"""Serving test helpers: a tiny served model with a few synthetic slides (seconds on a CPU), and
:func:`running`, which serves an app in a background thread. Used by the serving tests and
``bench/serve_load.py`` (which puts this folder on ``sys.path``).

The tiny model is a random-init tiny Llama wrapped as WSI-LLaVA with the ``prompt_topk`` selector
(so answers come with per-tile scores for the heatmap), taught for a few optimizer steps to answer
every question with :data:`TINY_ANSWER` — a real sentence rather than the random tokens of an
untrained model. It is not a pathology model.
"""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx
import torch

from wsi_llava.serve.config import ServeConfig

MODEL = "tiny"
"""The model id the serving tests serve."""
JSON = {"Content-Type": "application/json"}

#: what the tiny model learns to answer (several tokens, so streaming shows several deltas)
TINY_ANSWER = "the slide shows sheets of atypical cells with prominent nucleoli and frequent mitoses."
_QUESTIONS = ("What is the diagnosis?", "Describe this slide.", "Is there a tumor?", "What grade is it?")


@dataclass
class TinyServing:
    """Where :func:`build_tiny_serving` wrote things."""

    model_dir: Path
    """The saved model folder (``--model``)."""
    slides_root: Path
    """Folder of the synthetic slide files (``--slides-root``)."""
    slide_ids: list[str]
    """Ids of the slides (file names without ``.h5``)."""


def build_tiny_serving(out: str | Path, n_slides: int = 4, feature_dim: int = 16, image_seq_length: int = 6,
                       steps: int = 150, seed: int = 0) -> TinyServing:
    """Write ``out/model`` (tiny WSI-LLaVA + tokenizer) and ``out/cohort/slides/*.h5``.

    Trains on one intra-op thread (tiny matrices: faster, and no spinning on a busy machine)."""
    from wsi_llava.data.prompts import DEFAULT_SYSTEM_PROMPT, PromptBuilder
    from wsi_llava.data.slides import load_slide
    from wsi_llava.data.synthetic import SynthConfig, make_cohort
    from wsi_llava.model.wsi_llava import WsiLlavaForConditionalGeneration
    from wsi_llava.tiny import build_tiny_llm

    out = Path(out)
    llm = build_tiny_llm(out / "llm")
    torch.manual_seed(seed)
    model, tok = WsiLlavaForConditionalGeneration.from_llm(
        llm, mm_hidden_size=feature_dim, image_seq_length=image_seq_length, vision_feature_select_mode="prompt_topk")
    cohort = make_cohort(out / "cohort", SynthConfig(n_train=n_slides, n_test=0, feature_dim=feature_dim,
                                                     min_tiles=40, max_tiles=120, seed=seed))
    builder = PromptBuilder(tok, model.config.num_image_tokens, 1024, DEFAULT_SYSTEM_PROMPT)
    slides = [load_slide(str(p), 2048) for p in cohort.slides]
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.0)
    model.train()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        _teach(model, builder, slides, opt, steps)
    finally:
        torch.set_num_threads(threads)
    model.eval()
    model_dir = out / "model"
    model.save_pretrained(model_dir)
    tok.save_pretrained(model_dir)
    root = out / "cohort" / "slides"
    return TinyServing(model_dir, root, sorted(p.stem for p in cohort.slides))


def _teach(model, builder, slides, opt, steps: int) -> None:
    for step in range(steps):
        slide = slides[step % len(slides)]
        ex = builder.build_train(_QUESTIONS[step % len(_QUESTIONS)], TINY_ANSWER)
        ids = torch.tensor([ex.input_ids])
        out_ = model(input_ids=ids, attention_mask=torch.ones_like(ids), labels=torch.tensor([ex.labels]),
                     features=torch.from_numpy(slide.features)[None], coords=torch.from_numpy(slide.coords)[None],
                     tile_mask=torch.ones(1, len(slide.features), dtype=torch.bool),
                     question_mask=torch.tensor([ex.question_mask]))
        opt.zero_grad()
        out_.loss.backward()
        opt.step()


def tiny_serving_cached(folder: str | Path) -> TinyServing:
    """:func:`build_tiny_serving` into ``folder`` once; later calls (other test modules, other
    benchmark runs) reuse it. A ``READY`` marker is written last, so an interrupted build is redone."""
    folder = Path(folder)
    if not (folder / "READY").exists():
        import shutil

        shutil.rmtree(folder, ignore_errors=True)
        build_tiny_serving(folder)
        (folder / "READY").write_text("ok\n")
    root = folder / "cohort" / "slides"
    return TinyServing(folder / "model", root, sorted(p.stem for p in root.glob("*.h5")))


@contextmanager
def running(app, host: str = "127.0.0.1", start_timeout: float = 60.0) -> Iterator[str]:
    """Serve ``app`` with uvicorn on ``host`` and a free port; yields ``http://host:port``; stops the
    server (and the app's batch worker) on exit."""
    import uvicorn

    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, 0))
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="on", server_header=False))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, name="wsi-llava-uvicorn", daemon=True)
    thread.start()
    deadline = time.monotonic() + start_timeout
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            server.should_exit = True
            sock.close()
            raise RuntimeError("the server did not start (see the log above)")
        time.sleep(0.02)
    try:
        yield f"http://{'[' + host + ']' if ':' in host else host}:{port}"
    finally:
        server.should_exit = True
        thread.join(30)
        sock.close()


def serve_config(tiny: TinyServing, **kw) -> ServeConfig:
    """The tests' :class:`ServeConfig` of ``tiny`` (model id :data:`MODEL`, one worker thread, small limits)."""
    base = dict(model=str(tiny.model_dir), slides_root=str(tiny.slides_root), model_name=MODEL, torch_threads=1,
                max_tokens_limit=64, default_max_tokens=16, max_body_bytes=20_000)
    return ServeConfig(**{**base, **kw})


@contextmanager
def one_thread() -> Iterator[None]:
    """torch on one intra-op thread (as the server's worker), restored afterwards."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)


def openai_error(resp: httpx.Response, status: int, code: str | None = None) -> dict:
    """Asserts ``resp`` is an OpenAI-shaped error with ``status`` (and ``code``) that reveals no stack
    trace or server path; returns its ``error`` object."""
    assert resp.status_code == status, resp.text
    err = resp.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]
    assert "Traceback" not in resp.text and "/tmp" not in resp.text
    if code is not None:
        assert err["code"] == code, err
    return err
