"""Server hardening: invalid Unicode is a 400, an abandoned request stops generating, Host and
Content-Type checks without an API key, and slide reads that never block the server (a stuck read
times out while /health and other slides keep answering)."""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import json
import logging
import os
import shutil
import threading
import time

import httpx
import pytest

import wsi_llava.serve.server as server_module
from wsi_llava.infer.engine import SlideAssistant
from wsi_llava.serve.app import create_app
from wsi_llava.serve.config import ServeConfig
from wsi_llava.serve.guard import default_allowed_hosts, host_name
from wsi_llava.serve.server import file_loader

from blocking_loaders import open_fifo_instead  # tests/: importable by the reader processes too
from serve_helpers import JSON, MODEL, openai_error, running, serve_config, tiny_serving_cached

pytestmark = pytest.mark.timeout(240)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """The shared tiny model with a private copy of its slides plus ``slow.h5`` (a copy of the first)."""
    shared = tiny_serving_cached(tmp_path_factory.getbasetemp() / "serve_tiny")
    root = tmp_path_factory.mktemp("serve_hardening") / "slides"
    shutil.copytree(shared.slides_root, root)
    shutil.copy(root / f"{shared.slide_ids[0]}.h5", root / "slow.h5")
    return dataclasses.replace(shared, slides_root=root)


@pytest.fixture(scope="module")
def assistant(tiny):
    return SlideAssistant.from_pretrained(tiny.model_dir)


@pytest.fixture(scope="module")
def server(tiny, assistant):
    with running(create_app(serve_config(tiny), assistant)) as url:
        yield url


def _body(tiny, content: str = "What is the diagnosis?", **kw) -> dict:
    return {"model": MODEL, "slide": tiny.slide_ids[0], "messages": [{"role": "user", "content": content}],
            "max_tokens": 4, **kw}


# ----------------------------------------------------------------------------------- Unicode
def test_a_lone_surrogate_is_a_400_not_a_500(server, tiny, caplog):
    caplog.set_level(logging.ERROR, logger="wsi_llava.serve")
    raw = json.dumps(_body(tiny, "hi \ud800 there"))  # json.dumps writes the lone surrogate as "\ud800"
    assert "\\ud800" in raw
    err = openai_error(httpx.post(server + "/v1/chat/completions", content=raw, headers=JSON), 400, "invalid_unicode")
    assert err["param"] == "messages[0].content" and err["type"] == "invalid_request_error"
    key = raw.replace('"max_tokens"', '"\\udfff"')  # in a key
    openai_error(httpx.post(server + "/v1/chat/completions", content=key, headers=JSON), 400, "invalid_unicode")
    slide = json.dumps(_body(tiny, slide="SYN\udc80"))
    assert openai_error(httpx.post(server + "/v1/chat/completions", content=slide, headers=JSON), 400,
                        "invalid_unicode")["param"] == "slide"
    # a proper surrogate pair is an ordinary character
    ok = httpx.post(server + "/v1/chat/completions", content=json.dumps(_body(tiny, "what is \U0001F52C?")),
                    headers=JSON, timeout=60)
    assert ok.status_code == 200, ok.text
    # percent-encoded garbage in a path is a plain 4xx too
    for path in ("/v1/slides/%ED%A0%80", "/v1/slides/%FF%FE/tiles"):
        assert httpx.get(server + path).status_code in (400, 404)
    assert not [r for r in caplog.records if "unhandled" in r.getMessage()]


# --------------------------------------------------------------------------- abandoned requests
def test_an_abandoned_request_stops_generating(tiny, assistant, monkeypatch):
    """The client gives up (closes the connection) long before the request timeout: the row is cancelled
    at once instead of generating until the timeout."""
    real = server_module.generate_rows
    seen: dict = {}

    def generate_when_cancelled(model, tokenizer, rows, visuals):  # a generation that takes "forever"
        start = time.monotonic()
        while not rows[0].cancelled() and time.monotonic() - start < 30:
            time.sleep(0.01)
        seen.update(cancelled=rows[0].cancelled(), waited=time.monotonic() - start)
        return real(model, tokenizer, rows, visuals)

    monkeypatch.setattr(server_module, "generate_rows", generate_when_cancelled)
    app = create_app(serve_config(tiny, request_timeout=60), assistant)
    with running(app) as url:
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(url + "/v1/chat/completions", json=_body(tiny), timeout=1.5)
        deadline = time.monotonic() + 20
        while "cancelled" not in seen and time.monotonic() < deadline:
            time.sleep(0.05)
        assert seen.get("cancelled") is True and seen["waited"] < 15, seen
        deadline = time.monotonic() + 10
        while app.state.server.rows_cancelled < 1 and time.monotonic() < deadline:
            time.sleep(0.05)
        worker = httpx.get(url + "/health").json()["worker"]
        assert worker["abandoned"] == 1 and worker["rows_cancelled"] == 1, worker


# ------------------------------------------------------------------------ Host and Content-Type
def test_host_header_parsing_and_defaults():
    assert host_name("localhost:8000") == "localhost" and host_name("LOCALHOST") == "localhost"
    assert host_name("[::1]:8000") == "[::1]" and host_name("[::1]") == "[::1]"
    assert host_name("127.0.0.1") == "127.0.0.1" and host_name(None) is None and host_name("") is None
    assert default_allowed_hosts("127.0.0.1") == ("localhost", "127.0.0.1", "[::1]")
    assert default_allowed_hosts("0.0.0.0") == ("localhost", "127.0.0.1", "[::1]")
    assert default_allowed_hosts("10.1.2.3")[-1] == "10.1.2.3" and default_allowed_hosts("fe80::1")[-1] == "[fe80::1]"


def test_without_a_key_host_and_content_type_are_checked(server, tiny):
    port = server.rsplit(":", 1)[1]
    for path in ("/health", "/v1/models", "/", "/v1/slides"):
        err = openai_error(httpx.get(server + path, headers={"Host": "attacker.example"}), 403, "host_not_allowed")
        assert "attacker.example" in err["message"]
    openai_error(httpx.get(server + "/health", headers={"Host": f"rebind.attacker.example:{port}"}), 403,
                 "host_not_allowed")
    for host in (f"localhost:{port}", f"127.0.0.1:{port}", f"[::1]:{port}", "localhost"):
        assert httpx.get(server + "/health", headers={"Host": host}).status_code == 200, host
    # what a cross-origin page can send without a preflight: text/plain, a form, multipart; and no type at all
    body = json.dumps(_body(tiny))
    for ctype in ("text/plain", "application/x-www-form-urlencoded", "multipart/form-data; boundary=x", None):
        headers = {"Content-Type": ctype} if ctype else {}
        openai_error(httpx.post(server + "/v1/chat/completions", content=body, headers=headers), 415,
                     "unsupported_media_type")
    ok = httpx.post(server + "/v1/chat/completions", content=body,
                    headers={"Content-Type": "application/json; charset=utf-8"}, timeout=60)
    assert ok.status_code == 200, ok.text


def test_allowed_hosts_option_and_api_key(tiny, assistant):
    app = create_app(serve_config(tiny, allowed_hosts=("Slides.Lab", "localhost")), assistant)
    with running(app) as url:
        assert httpx.get(url + "/health", headers={"Host": "slides.lab:8000"}).status_code == 200
        openai_error(httpx.get(url + "/health"), 403, "host_not_allowed")  # 127.0.0.1 was not listed
    with running(create_app(serve_config(tiny, allowed_hosts=("*",)), assistant)) as url:
        assert httpx.get(url + "/health", headers={"Host": "anything.example"}).status_code == 200
    # with a key, DNS rebinding gains nothing (the page cannot know the key): no Host check, and the
    # key itself needs a CORS preflight, so the body type is not checked either
    with running(create_app(serve_config(tiny, api_key="k3y"), assistant)) as url:
        auth = {"Authorization": "Bearer k3y", "Host": "anything.example"}
        assert httpx.get(url + "/v1/models", headers=auth).status_code == 200
        r = httpx.post(url + "/v1/chat/completions", content=json.dumps(_body(tiny)),
                       headers={**auth, "Content-Type": "text/plain"}, timeout=60)
        assert r.status_code == 200, r.text


def test_cli_flags_for_hosts_and_slide_reads(tmp_path):
    import argparse

    from wsi_llava.serve import cli

    parser = argparse.ArgumentParser()
    cli.add_arguments(parser)
    args = parser.parse_args(["--model", "m", "--slides-root", str(tmp_path), "--allowed-hosts", "a.lab, b.lab",
                              "--slide-timeout", "5", "--slide-readers", "3", "--slide-reader", "thread"])
    cfg = cli.config_from_args(args)
    assert cfg.allowed_hosts == ("a.lab", "b.lab") and cfg.slide_timeout == 5.0
    assert cfg.slide_readers == 3 and cfg.slide_reader == "thread"
    assert cli.config_from_args(parser.parse_args(["--model", "m", "--slides-root", "x"])).allowed_hosts is None
    with pytest.raises(ValueError, match="slide_reader"):
        ServeConfig(model="m", slides_root="x", slide_reader="fork")


# -------------------------------------------------------------------------------- slide reads
async def _stuck_read_scenario(url: str, other: str, timeout: float) -> None:
    """While ``slow`` is being read: /health and another slide answer at once; ``slow`` gets a 504 after
    about ``timeout`` s, and a retry is refused at once."""
    async with httpx.AsyncClient(base_url=url, timeout=60) as c:
        start = time.monotonic()
        stuck = asyncio.ensure_future(c.get("/v1/slides/slow/tiles"))
        await asyncio.sleep(0.3)
        for _ in range(3):
            t = time.monotonic()
            health = await c.get("/health")
            assert health.status_code == 200 and time.monotonic() - t < 1.0
            await asyncio.sleep(0.1)
        other_tiles = await c.get(f"/v1/slides/{other}/tiles")
        assert other_tiles.status_code == 200 and not stuck.done()
        resp = await stuck
        took = time.monotonic() - start
        err = openai_error(resp, 504, "slide_timeout")
        assert "slow" in err["message"] and err["type"] == "timeout_error"
        assert timeout * 0.8 < took < timeout + 20, took
        t = time.monotonic()
        openai_error(await c.get("/v1/slides/slow"), 504, "slide_timeout")  # remembered: not read again
        assert time.monotonic() - t < 1.0


def test_a_blocked_slide_read_does_not_block_the_server(tiny, assistant):
    """Thread mode: a loader blocked on an Event (it releases the GIL)."""
    release = threading.Event()
    real = file_loader(assistant)

    def loader(path):
        if path.endswith("slow.h5"):
            release.wait(60)
        return real(path)

    app = create_app(serve_config(tiny, slide_reader="thread", slide_timeout=1.5), assistant, slide_loader=loader)
    try:
        with running(app) as url:
            asyncio.run(_stuck_read_scenario(url, tiny.slide_ids[1], 1.5))
            assert httpx.get(url + "/health").json()["slide_reader"]["timeouts"] == 1
    finally:
        release.set()


def test_a_read_stuck_inside_hdf5_is_killed_at_the_timeout(tiny, assistant, tmp_path):
    """Process mode (the default) against a read that holds the GIL: the worker process is killed at the
    timeout and replaced; the server never stops answering."""
    fifo = tmp_path / "never_written.h5"
    os.mkfifo(fifo)
    loader = functools.partial(open_fifo_instead, fifo=str(fifo), real=file_loader(assistant))
    app = create_app(serve_config(tiny, slide_timeout=3.0, slide_readers=2), assistant, slide_loader=loader)
    with running(app) as url:
        async def warm():  # two reads at once: both reader processes started
            async with httpx.AsyncClient(base_url=url, timeout=120) as c:
                return await asyncio.gather(*[c.get(f"/v1/slides/{i}") for i in tiny.slide_ids[2:4]])

        assert [r.status_code for r in asyncio.run(warm())] == [200, 200]
        asyncio.run(_stuck_read_scenario(url, tiny.slide_ids[1], 3.0))
        stats = httpx.get(url + "/health").json()["slide_reader"]
        assert stats["mode"] == "process" and stats["timeouts"] == 1 and stats["crashes"] == 0
        # the killed process was replaced
        assert httpx.get(f"{url}/v1/slides/{tiny.slide_ids[0]}/tiles", timeout=120).status_code == 200
