"""The live server on loopback with the tiny model: the official `openai` client (plain, streaming,
explain, multi-turn), error format, path escapes, size limits, auth, 429 under a full queue, timeouts,
batching."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import os
import shutil
from pathlib import Path

import httpx
import openai
import pytest
from openai import OpenAI

from wsi_llava.infer.engine import SlideAssistant
from wsi_llava.infer.generation import GenerationSettings
from wsi_llava.serve.app import create_app

from serve_helpers import JSON, MODEL, one_thread, openai_error, running, serve_config, tiny_serving_cached


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """The shared tiny model with a private copy of its slides (these tests add files to the root)."""
    shared = tiny_serving_cached(tmp_path_factory.getbasetemp() / "serve_tiny")
    root = tmp_path_factory.mktemp("serve_api") / "slides"
    shutil.copytree(shared.slides_root, root)
    return dataclasses.replace(shared, slides_root=root)


@pytest.fixture(scope="module")
def assistant(tiny):
    return SlideAssistant.from_pretrained(tiny.model_dir)


@pytest.fixture(scope="module")
def server(tiny, assistant):
    app = create_app(serve_config(tiny, default_max_tokens=32, max_batch=4, queue_size=32), assistant)
    with running(app) as url:
        yield url, app


@pytest.fixture(scope="module")
def client(server):
    return OpenAI(base_url=server[0] + "/v1", api_key="unused", max_retries=0, timeout=60)


def _ask(slide: str, text: str) -> list[dict]:
    return [{"role": "user", "content": [{"type": "slide", "slide": slide}, {"type": "text", "text": text}]}]


# --------------------------------------------------------------------------------- happy paths


def test_models_health_and_slides(server, client, tiny):
    url, _ = server
    assert [m.id for m in client.models.list()] == [MODEL]
    assert client.models.retrieve(MODEL).id == MODEL
    health = httpx.get(url + "/health").json()
    assert health["status"] == "ok" and health["model"] == MODEL
    slides = httpx.get(url + "/v1/slides").json()
    assert [s["id"] for s in slides["data"]] == tiny.slide_ids and not slides["truncated"]
    tiles = httpx.get(f"{url}/v1/slides/{tiny.slide_ids[0]}/tiles").json()
    assert tiles["n_used"] == len(tiles["coords"]) > 0 and tiles["tile_size"] == 256.0
    info = httpx.get(f"{url}/v1/slides/{tiny.slide_ids[0]}.h5").json()
    assert info["id"] == tiny.slide_ids[0] and info["dim"] == 16


def test_plain_completion_matches_the_engine(client, assistant, tiny):
    slide = tiny.slide_ids[0]
    r = client.chat.completions.create(model=MODEL, messages=_ask(slide, "What is the diagnosis?"), max_tokens=40)
    text = r.choices[0].message.content
    assert text.startswith("the slide shows")  # what the tiny model was taught
    assert r.choices[0].finish_reason in ("stop", "length") and r.object == "chat.completion"
    image_tokens = assistant.model.config.num_image_tokens
    assert r.usage.prompt_tokens > image_tokens and r.usage.completion_tokens > 3
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
    with one_thread():
        ref = assistant.answer([assistant.load(tiny.slides_root / f"{slide}.h5")], ["What is the diagnosis?"],
                               settings=GenerationSettings(max_new_tokens=40))[0]
    assert text == ref.text and r.usage.prompt_tokens == ref.prompt_tokens


def test_streaming_equals_plain_and_reports_usage(client, tiny):
    messages = _ask(tiny.slide_ids[1], "Describe this slide.")
    plain = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=30)
    stream = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=30, stream=True,
                                            stream_options={"include_usage": True})
    chunks = list(stream)
    deltas = [c.choices[0].delta.content for c in chunks if c.choices and c.choices[0].delta.content]
    assert len(deltas) >= 3 and "".join(deltas) == plain.choices[0].message.content
    assert chunks[0].choices[0].delta.role == "assistant"
    finals = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finals == [plain.choices[0].finish_reason]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == plain.usage.completion_tokens


def test_explain_returns_tiles_and_scores(server, client, tiny, assistant):
    url, _ = server
    slide = tiny.slide_ids[2]
    r = client.chat.completions.create(model=MODEL, messages=_ask(slide, "Is there a tumor?"), max_tokens=5,
                                       extra_body={"explain": True})
    ex = r.explain
    tiles = httpx.get(f"{url}/v1/slides/{slide}/tiles").json()
    k = assistant.model.config.image_seq_length
    assert ex["slide"] == slide and ex["selector"] == "prompt_topk" and ex["n_tiles"] == tiles["n_used"]
    assert len(ex["tile_indices"]) == k and len(ex["scores"]) == ex["n_tiles"]
    assert ex["coords"] == [tiles["coords"][i] for i in ex["tile_indices"]]
    assert ex["tile_scores"] == [ex["scores"][i] for i in ex["tile_indices"]]
    top = sorted(range(len(ex["scores"])), key=lambda i: -ex["scores"][i])[:k]
    assert sorted(top) == sorted(ex["tile_indices"])  # prompt top-K keeps the best-scored tiles
    stream = client.chat.completions.create(model=MODEL, messages=_ask(slide, "Is there a tumor?"), max_tokens=5,
                                            stream=True, extra_body={"explain": True})
    explained = [c.explain for c in stream if getattr(c, "explain", None)]
    assert explained == [ex]


def test_extra_body_slide_multi_turn_and_system(client, tiny):
    def ask(messages):
        return client.chat.completions.create(model=MODEL, messages=messages, max_tokens=8,
                                              extra_body={"slide": tiny.slide_ids[0]})

    history = [{"role": "user", "content": "What is the diagnosis?"}, {"role": "assistant", "content": "A tumor."}]
    last = {"role": "user", "content": "What grade is it?"}
    one, two = ask([last]), ask([*history, last])
    three = ask([{"role": "system", "content": "Be terse."}, *history, last])
    assert one.choices[0].message.content and two.choices[0].message.content and three.choices[0].message.content
    assert two.usage.prompt_tokens > one.usage.prompt_tokens + 8  # the earlier turn is in the prompt
    assert three.usage.prompt_tokens < two.usage.prompt_tokens  # the short system prompt replaced the default


def test_stop_max_tokens_and_seed(client, tiny):
    messages = _ask(tiny.slide_ids[0], "What is the diagnosis?")
    full = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=40).choices[0].message.content
    assert "sheets" in full
    cut = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=40, stop=["sheets"])
    assert cut.choices[0].finish_reason == "stop" and full.startswith(cut.choices[0].message.content)
    assert "sheets" not in cut.choices[0].message.content
    short = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=3)
    assert short.choices[0].finish_reason == "length" and short.usage.completion_tokens == 3
    sampled = [client.chat.completions.create(model=MODEL, messages=messages, max_tokens=12, temperature=1.5,
                                              seed=seed).choices[0].message.content for seed in (7, 7, 8, 9)]
    assert sampled[0] == sampled[1] and len(set(sampled)) > 1


def test_concurrent_requests_are_batched_with_the_same_answers(server, client, tiny):
    url, app = server
    messages = _ask(tiny.slide_ids[3], "What is the diagnosis?")
    alone = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=20).choices[0].message.content
    before = app.state.server.worker.stats()

    async def burst():
        async with httpx.AsyncClient(base_url=url, timeout=60) as c:
            body = {"model": MODEL, "messages": messages, "max_tokens": 20}
            return await asyncio.gather(*[c.post("/v1/chat/completions", json=body) for _ in range(8)])

    responses = asyncio.run(burst())
    assert all(r.status_code == 200 for r in responses)
    assert {r.json()["choices"][0]["message"]["content"] for r in responses} == {alone}
    after = app.state.server.worker.stats()
    assert after["largest_batch"] > 1 and after["batches"] - before["batches"] < 8
    assert app.state.server.encoder.cache.stats()["hits"] > 0  # the slide was encoded once


# ---------------------------------------------------------------------------------- refusals


@pytest.mark.parametrize("slide,status", [
    ("../model/config", 400), ("/etc/passwd", 400), ("SYN-0000-0000/../../model/model", 400),
    ("..%2F..%2Fetc%2Fpasswd", 404), ("nope", 404), ("escape_link", 404), ("escape_dir/secret", 404),
])
def test_path_escapes_are_refused(server, tiny, slide, status):
    url, _ = server
    root = tiny.slides_root
    secret = root.parent / "secret.h5"
    secret.write_bytes((root / f"{tiny.slide_ids[0]}.h5").read_bytes())  # a valid slide outside the root
    for name, target in (("escape_link.h5", secret), ("escape_dir", root.parent)):
        if not (root / name).is_symlink():
            os.symlink(target, root / name)
    body = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "slide": slide}
    openai_error(httpx.post(url + "/v1/chat/completions", json=body), status)
    assert httpx.get(f"{url}/v1/slides/{slide}/tiles").status_code in (400, 404)
    listed = [s["id"] for s in httpx.get(url + "/v1/slides").json()["data"]]
    assert "escape_link" not in listed and not any(i.startswith("escape_dir") for i in listed)


def test_error_format_for_bad_requests(server, tiny):
    url, _ = server
    post = lambda body, **kw: httpx.post(url + "/v1/chat/completions", content=body, headers=JSON, **kw)  # noqa: E731
    ok_messages = [{"role": "user", "content": "hi"}]
    openai_error(post(b"{not json"), 400, "invalid_json")
    openai_error(post(b""), 400, "invalid_json")
    openai_error(post(b"[" * 5000 + b"]" * 5000), 400, "invalid_json")  # too deep to decode: not a 500
    assert openai_error(post(b"[]"), 400, "invalid_type")["param"] == "body"
    # FastAPI validates the body against the pydantic models; errors name the field as OpenAI does
    slide = tiny.slide_ids[0]
    for extra, param, code in (
            ({"temperature": "0.5"}, "temperature", "invalid_type"),  # JSON types as sent
            ({"stream": 1}, "stream", "invalid_type"),
            ({"top_p": 0}, "top_p", "invalid_value"),
            ({"n": 3}, "n", "unsupported_parameter"),
            ({"messages": [{"role": "user", "content": [{"type": "text", "text": 5}]}]},
             "messages[0].content[0].text", "invalid_type"),
            ({"messages": [{"role": "user", "content": [{"type": "video"}]}]}, "messages[0].content[0].type",
             "invalid_value"),
            ({"messages": [{"role": "user"}]}, "messages[0].content", "missing_required_parameter"),
            ({"model": None}, "model", "invalid_type")):
        body = {"model": MODEL, "messages": ok_messages, "slide": slide, **extra}
        err = openai_error(post(json.dumps(body)), 400, code)
        assert err["param"] == param and err["type"] == "invalid_request_error", err
    del body["model"]
    openai_error(post(json.dumps(body)), 400, "missing_required_parameter")
    openai_error(post(json.dumps({"model": "gpt-4", "messages": ok_messages, "slide": tiny.slide_ids[0]})), 404,
                     "model_not_found")
    openai_error(post(json.dumps({"model": MODEL, "messages": ok_messages})), 400, "missing_slide")
    err = openai_error(post(json.dumps({"model": MODEL, "messages": ok_messages, "slide": tiny.slide_ids[0],
                                            "max_tokens": 65})), 400, "invalid_value")
    assert err["param"] == "max_tokens"
    long = [{"role": "user", "content": "x" * 19_000}]  # more tokens than the model's cutoff_len (8192)
    openai_error(post(json.dumps({"model": MODEL, "messages": long, "slide": tiny.slide_ids[0]})), 400,
                     "context_length_exceeded")
    openai_error(httpx.get(url + "/v1/nothing"), 404, "not_found")
    openai_error(httpx.delete(url + "/v1/models"), 405)
    # a corrupt file inside the root: a clear message naming the slide id, no server path
    (tiny.slides_root / "broken.h5").write_bytes(b"not hdf5")
    err = openai_error(post(json.dumps({"model": MODEL, "messages": ok_messages, "slide": "broken"})), 400,
                           "invalid_slide_file")
    assert "broken" in err["message"] and str(tiny.slides_root) not in err["message"]


def test_oversize_requests_are_refused(server, client, tiny):
    url, _ = server
    big = {"model": MODEL, "slide": tiny.slide_ids[0], "messages": [{"role": "user", "content": "x" * 30_000}]}
    openai_error(httpx.post(url + "/v1/chat/completions", json=big), 413, "request_too_large")

    def chunked():  # no Content-Length: the limit is enforced while reading
        yield b'{"model": "tiny", "messages": [{"role": "user", "content": "'
        for _ in range(30):
            yield b"y" * 1000
        yield b'"}]}'

    openai_error(httpx.post(url + "/v1/chat/completions", content=chunked(), headers=JSON), 413,
                     "request_too_large")
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(model=MODEL, messages=_ask(tiny.slide_ids[0], "hi"), max_tokens=10_000)
    assert err.value.body["param"] == "max_tokens"


def test_auth_with_bearer_token(tiny, assistant):
    app = create_app(serve_config(tiny, default_max_tokens=32, api_key="s3cret"), assistant)
    with running(app) as url:
        body = {"model": MODEL, "messages": _ask(tiny.slide_ids[0], "hi"), "max_tokens": 2}
        openai_error(httpx.post(url + "/v1/chat/completions", json=body), 401, "invalid_api_key")
        openai_error(httpx.get(url + "/v1/slides", headers={"Authorization": "Bearer wrong"}), 401)
        openai_error(httpx.get(f"{url}/v1/slides/{tiny.slide_ids[0]}/tiles"), 401)
        with pytest.raises(openai.AuthenticationError):
            OpenAI(base_url=url + "/v1", api_key="wrong", max_retries=0).models.list()
        good = OpenAI(base_url=url + "/v1", api_key="s3cret", max_retries=0)
        assert good.chat.completions.create(**body).choices[0].message.content
        assert httpx.get(url + "/health").status_code == 200 and httpx.get(url + "/").status_code == 200


def test_full_queue_answers_429(tiny, assistant):
    app = create_app(serve_config(tiny, default_max_tokens=32, max_batch=1, queue_size=1), assistant)
    with running(app) as url:
        body = {"model": MODEL, "messages": _ask(tiny.slide_ids[0], "What is the diagnosis?"), "max_tokens": 64}
        assert httpx.post(url + "/v1/chat/completions", json=body, timeout=60).status_code == 200  # slide now cached

        async def burst():
            async with httpx.AsyncClient(base_url=url, timeout=60) as c:
                return await asyncio.gather(*[c.post("/v1/chat/completions", json=body) for _ in range(12)])

        responses = asyncio.run(burst())
        codes = sorted(r.status_code for r in responses)
        # one slot in the queue (plus the row being generated, if the worker took one in time): most are refused
        assert set(codes) <= {200, 429} and codes.count(429) >= 1 and codes.count(200) >= 1, codes
        busy = next(r for r in responses if r.status_code == 429)
        openai_error(busy, 429, "queue_full")
        assert busy.headers["retry-after"] == "1"


def test_request_timeout_answers_504(tiny, assistant):
    app = create_app(serve_config(tiny, default_max_tokens=32, request_timeout=0.001), assistant)
    with running(app) as url:
        body = {"model": MODEL, "messages": _ask(tiny.slide_ids[0], "hi"), "max_tokens": 64}
        openai_error(httpx.post(url + "/v1/chat/completions", json=body), 504, "timeout")
        with httpx.stream("POST", url + "/v1/chat/completions", json={**body, "stream": True}) as r:
            events = [line for line in r.iter_lines() if line.startswith("data:")]
        assert r.status_code == 200 and json.loads(events[-1][5:])["error"]["code"] == "timeout"
        assert "[DONE]" not in events[-1]


def test_viewer_files_are_served_with_a_strict_policy(server):
    url, _ = server
    page = httpx.get(url + "/")
    assert page.status_code == 200 and "<canvas id=\"heatmap\"" in page.text
    assert "default-src 'self'" in page.headers["content-security-policy"]
    assert "http" not in page.text.split("<body>")[1].replace("http-equiv", "")  # no CDN, nothing remote
    js = httpx.get(url + "/static/app.js")
    assert js.status_code == 200 and js.headers["content-type"].startswith("text/javascript")
    assert ".innerHTML" not in js.text and "eval(" not in js.text
    openai_error(httpx.get(url + "/static/../serve/app.py"), 404)
    openai_error(httpx.get(url + "/static/secret.py"), 404)


def test_tile_size_follows_the_one_rule(server, tiny):
    """The viewer's tile size is data/tile_size.py's rule: an attribute wins over the coordinate spacing
    and the answer says where it came from."""
    import h5py

    url, _ = server
    src = Path(tiny.slides_root) / f"{tiny.slide_ids[0]}.h5"
    copy = Path(tiny.slides_root) / "tile_attr_copy.h5"
    shutil.copy(src, copy)
    with h5py.File(copy, "a") as f:
        f.attrs["patch_size_level0"] = 512
    try:
        plain = httpx.get(f"{url}/v1/slides/{tiny.slide_ids[0]}/tiles").json()
        assert plain["tile_size"] == 256.0 and plain["tile_size_source"]
        tiles = httpx.get(f"{url}/v1/slides/tile_attr_copy/tiles").json()
        assert tiles["tile_size"] == 512.0 and "patch_size_level0" in tiles["tile_size_source"], tiles
        info = httpx.get(f"{url}/v1/slides/tile_attr_copy").json()
        assert info["tile_size"] == 512.0
    finally:
        copy.unlink()


def test_slides_named_by_stem_or_tcga_barcode(server, tiny):
    """A slide deep in a TRIDENT output folder answers to its bare stem and its TCGA barcode (the one
    resolver of data/resolve.py); two slides of one barcode are a 400 listing both; a near miss is a 404
    with a suggestion."""
    url, _ = server
    src = Path(tiny.slides_root) / f"{tiny.slide_ids[0]}.h5"
    deep = Path(tiny.slides_root) / "trident_job" / "20x_256px_0px_overlap" / "features_gigapath"
    deep.mkdir(parents=True)
    name = "TCGA-A1-A0SB-01Z-00-DX1.B34C267B-CAAA-4AB6-AD5C-276C26F3A3A9"
    shutil.copy(src, deep / f"{name}.h5")
    server[1].state.server.names.ttl = 0.0  # a name the index does not know rebuilds it at once
    try:
        full = f"trident_job/20x_256px_0px_overlap/features_gigapath/{name}"
        assert httpx.get(f"{url}/v1/slides/{full}/tiles").json()["id"] == full
        for alias in (name, "TCGA-A1-A0SB-01Z-00-DX1", "TCGA-A1-A0SB"):
            r = httpx.get(f"{url}/v1/slides/{alias}/tiles")
            assert r.status_code == 200 and r.json()["id"] == full, (alias, r.text)
        # the viewer's routes resolve names the same way (this slide has no raw image beside it)
        openai_error(httpx.get(f"{url}/v1/slides/TCGA-A1-A0SB-01Z-00-DX1/deepzoom.dzi"), 404, "slide_image_not_found")
        shutil.copy(src, deep / "TCGA-A1-A0SB-01Z-00-DX2.h5")  # a second slide of the patient
        server[1].state.server.names.index(refresh=True)  # the patient barcode is known: rebuild to see DX2
        err = openai_error(httpx.get(f"{url}/v1/slides/TCGA-A1-A0SB/tiles"), 400, "ambiguous_slide")
        assert name in err["message"] and "TCGA-A1-A0SB-01Z-00-DX2" in err["message"]
        miss = httpx.get(f"{url}/v1/slides/TCGA-A1-A0SB-01Z-00-DX3/tiles")
        assert miss.status_code == 404 and "did you mean" in openai_error(miss, 404, "slide_not_found")["message"]
    finally:
        shutil.rmtree(Path(tiny.slides_root) / "trident_job")
