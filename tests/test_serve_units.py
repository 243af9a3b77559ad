"""Serving building blocks without a model: slide path safety, auth, caches, queue, worker, request parsing."""

from __future__ import annotations

import os
import threading
import time

import pytest

from wsi_llava.serve.batching import BatchQueue, BatchWorker, Job, QueueFull
from wsi_llava.serve.caches import LRUCache
from wsi_llava.serve.errors import ApiError
from wsi_llava.infer.generation import _held_back
from wsi_llava.serve.schema import parse_chat_request
from wsi_llava.serve.security import bearer_ok, is_loopback, list_slides, real_root, resolve_slide
from wsi_llava.serve.server import batch_key


# ------------------------------------------------------------------------------- slide paths


@pytest.fixture()
def root(tmp_path):
    """slides/{a.h5, sub/b.hdf5, notes.txt, link_in.h5 -> a.h5, link_out.h5 -> ../secret.h5, escape -> ..}"""
    slides = tmp_path / "slides"
    (slides / "sub").mkdir(parents=True)
    (slides / "a.h5").write_bytes(b"x")
    (slides / "sub" / "b.hdf5").write_bytes(b"x")
    (slides / "notes.txt").write_text("not a slide")
    (tmp_path / "secret.h5").write_bytes(b"secret")
    os.symlink(slides / "a.h5", slides / "link_in.h5")
    os.symlink(tmp_path / "secret.h5", slides / "link_out.h5")
    os.symlink(tmp_path, slides / "escape")
    return real_root(slides)


def test_resolve_accepts_ids_and_relative_paths(root):
    assert resolve_slide(root, "a").path == os.path.join(root, "a.h5")
    assert resolve_slide(root, "a.h5").id == "a"
    assert resolve_slide(root, "sub/b").path == os.path.join(root, "sub", "b.hdf5")
    linked = resolve_slide(root, "link_in")
    assert linked.id == "link_in" and linked.path == os.path.join(root, "a.h5")


@pytest.mark.parametrize("ref", ["../secret", "../secret.h5", "sub/../../secret", "/etc/passwd", "//etc/passwd",
                                 "./a", "sub//b", "a\\..\\secret", "a\x00.h5", "~/x", "", "..", "sub/"])
def test_resolve_rejects_malformed_references(root, ref):
    with pytest.raises(ApiError) as err:
        resolve_slide(root, ref)
    assert err.value.status == 400 and err.value.code == "invalid_slide"


@pytest.mark.parametrize("ref", ["link_out", "link_out.h5", "escape/secret", "escape/secret.h5", "notes.txt",
                                 "notes", "missing", "sub"])
def test_resolve_refuses_escapes_and_non_slides_as_not_found(root, ref):
    with pytest.raises(ApiError) as err:
        resolve_slide(root, ref)
    assert err.value.status == 404 and err.value.code == "slide_not_found"
    assert root not in err.value.message  # never reveals server paths


def test_resolve_rejects_non_strings(root):
    for ref in (None, 3, ["a"]):
        with pytest.raises(ApiError):
            resolve_slide(root, ref)


def test_list_slides_lists_only_servable_files(root):
    refs, truncated = list_slides(root)
    assert [r.id for r in refs] == ["a", "link_in", "sub/b"] and not truncated
    refs, truncated = list_slides(root, limit=2)
    assert len(refs) == 2 and truncated


def test_raw_slides_resolve_and_are_listed_with_their_suffix(tmp_path):
    slides = tmp_path / "slides"
    (slides / "sub").mkdir(parents=True)
    for name in ("a.h5", "a.svs", "sub/c.ndpi", "sub/d.TIFF", "roi.png"):
        (slides / name).write_bytes(b"x")
    root = real_root(slides)
    assert [(r.id, r.raw) for r in list_slides(root)[0]] == [("a", False), ("a.svs", True), ("sub/c.ndpi", True),
                                                             ("sub/d.TIFF", True)]
    assert resolve_slide(root, "a").path == os.path.join(root, "a.h5")  # an H5 file comes first
    assert resolve_slide(root, "a.svs").raw
    c = resolve_slide(root, "sub/c")  # without its suffix, a raw slide resolves too, to its canonical id
    assert c.id == "sub/c.ndpi" and c.path == os.path.join(root, "sub", "c.ndpi")
    with pytest.raises(ApiError) as err:
        resolve_slide(root, "roi.png")
    assert err.value.status == 404


def test_real_root_must_be_a_folder(tmp_path):
    with pytest.raises(ValueError, match="not a folder"):
        real_root(tmp_path / "nope")


def test_bearer_and_loopback():
    assert bearer_ok(None, None) and bearer_ok("anything", "")
    assert bearer_ok("Bearer s3cret", "s3cret") and bearer_ok("bearer s3cret", "s3cret")
    for header in (None, "", "Bearer", "Bearer wrong", "Basic s3cret", "s3cret", "Bearer s3cret2"):
        assert not bearer_ok(header, "s3cret"), header
    assert is_loopback("127.0.0.1") and is_loopback("::1") and is_loopback("localhost") and is_loopback("127.5.0.1")
    assert not is_loopback("0.0.0.0") and not is_loopback("192.168.1.4") and not is_loopback("example.org")


# ------------------------------------------------------------------------------------ caches


def test_lru_cache_bounds_items_bytes_and_recency():
    c = LRUCache(max_items=3, max_bytes=10, size_of=len)
    for k in "abc":
        assert c.put(k, "xx")
    assert c.get("a") == "xx"  # a is now most recent
    c.put("d", "xx")  # evicts b (least recent)
    assert c.get("b") is None and c.get("a") == "xx" and len(c) == 3
    c.put("e", "xxxxxxxx")  # 8 bytes: evicts until <= 10 bytes
    assert c.nbytes <= 10 and c.get("e") == "xxxxxxxx" and len(c) == 2
    assert not c.put("huge", "x" * 11) and c.get("huge") is None
    c.put("e", "x")  # replacing updates the byte count
    present = [v for v in (c.get(k) for k in "abcde") if v is not None]
    assert c.nbytes == sum(map(len, present)) == 3 and len(present) == 2
    assert c.stats()["hits"] >= 3 and c.stats()["misses"] >= 2
    off = LRUCache(max_items=0, max_bytes=10, size_of=len)
    assert not off.put("a", "x") and off.get("a") is None


# ------------------------------------------------------------------------------ queue, worker


def _job(key, events=None):
    return Job(payload=key, key=key, notify=(lambda k, v: events.append((k, v))) if events is not None else (lambda k, v: None))


def test_queue_is_bounded_and_groups_by_key_in_order():
    q = BatchQueue(maxsize=5)
    jobs = [_job(k) for k in ("g", "s", "g", "g", "s")]
    for j in jobs:
        q.put(j)
    with pytest.raises(QueueFull):
        q.put(_job("g"))
    batch = q.take(max_batch=2)
    assert batch == [jobs[0], jobs[2]]  # oldest + next of the same key, capped at 2
    assert q.take(max_batch=8) == [jobs[1], jobs[4]]
    assert q.take(max_batch=8) == [jobs[3]]
    assert q.take(max_batch=8, timeout=0.01) == []


def test_queue_drops_cancelled_jobs_and_frees_their_slots():
    q = BatchQueue(maxsize=2)
    a, b = _job("g"), _job("g")
    q.put(a)
    q.put(b)
    a.cancelled.set()
    assert len(q) == 1
    c = _job("g")
    q.put(c)  # a's slot is free again
    assert q.take(8) == [b, c]


def test_queue_close_returns_waiting_jobs_and_wakes_takers():
    q = BatchQueue(maxsize=4)
    got = []
    t = threading.Thread(target=lambda: got.append(q.take(4)))
    t.start()
    time.sleep(0.05)
    assert q.close() == []
    t.join(5)
    assert got == [[]]
    with pytest.raises(RuntimeError):
        q.put(_job("g"))


def test_worker_runs_batches_and_reports_failures():
    q = BatchQueue(maxsize=16)
    events: list = []
    ran: list = []

    def run(jobs):
        ran.append([j.payload for j in jobs])
        if jobs[0].payload == "boom":
            raise RuntimeError("broken model")
        for j in jobs[:1]:
            j.emit("done", j.payload)  # leaves any second job unfinished on purpose

    for k in ("a", "a", "boom"):
        q.put(_job(k, events))
    w = BatchWorker(q, run, max_batch=4)
    w.start()
    deadline = time.monotonic() + 10
    while len(events) < 3 and time.monotonic() < deadline:
        time.sleep(0.01)
    w.stop()
    assert ran == [["a", "a"], ["boom"]]
    assert events[0] == ("done", "a")
    errors = [v for k, v in events if k == "error"]
    assert len(errors) == 2 and all(e.status == 500 and "Traceback" not in e.message for e in errors)
    assert w.stats()["largest_batch"] == 2


def test_worker_stop_answers_waiting_jobs_503():
    q = BatchQueue(maxsize=4)
    events: list = []
    q.put(_job("a", events))
    w = BatchWorker(q, lambda jobs: None, max_batch=1)  # never started
    q_left = len(q)
    w.stop(timeout=0.1)
    assert q_left == 1 and events and events[0][0] == "error" and events[0][1].status == 503


# ----------------------------------------------------------------------------- request parsing


def _parse(body, **kw):
    base = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}
    base.update(body)
    return parse_chat_request(base, max_tokens_limit=kw.get("limit", 64), default_max_tokens=16,
                              special_tokens=("<image>", "<|eot_id|>"))


def test_parse_plain_parts_history_and_options():
    req = _parse({"messages": [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": [{"type": "slide", "slide": "s1"}, {"type": "text", "text": "What is it?"}]},
        {"role": "assistant", "content": "A tumor."},
        {"role": "user", "content": "Which grade?"}],
        "temperature": 0.7, "top_p": 0.9, "max_tokens": 20, "stop": "END", "seed": 5, "stream": True,
        "stream_options": {"include_usage": True}, "explain": True, "user": "ignored"})
    assert req.system == "Be brief." and req.slide == "s1"
    assert req.history == [("What is it?", "A tumor.")] and req.question == "Which grade?"
    s = req.settings
    assert (s.temperature, s.top_p, s.max_new_tokens, s.stop, s.seed) == (0.7, 0.9, 20, ["END"], 5)
    assert req.seeded and req.stream and req.include_usage and req.explain
    d = _parse({"slide": "s2"})
    assert d.slide == "s2" and d.settings.max_new_tokens == 16 and d.settings.temperature == 0 and not d.seeded
    assert _parse({"max_completion_tokens": 7}).settings.max_new_tokens == 7


@pytest.mark.parametrize("body,param", [
    ({"model": None}, "model"),
    ({"messages": []}, "messages"),
    ({"messages": [{"role": "assistant", "content": "x"}]}, "messages[0].role"),
    ({"messages": [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]}, "messages[1].role"),
    ({"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}, "messages"),
    ({"messages": [{"role": "tool", "content": "a"}]}, "messages[0].role"),
    ({"messages": [{"role": "user", "content": [{"type": "input_audio", "input_audio": {"data": "x"}}]}]},
     "messages[0].content[0].type"),
    ({"messages": [{"role": "user", "content": [{"text": "no type"}]}]}, "messages[0].content[0].type"),
    ({"messages": [{"role": "user", "content": [{"type": "text", "text": 5}]}]}, "messages[0].content[0].text"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]},
     "messages[0].content[0].image_url.url"),
    ({"messages": [{"role": "system", "content": [{"type": "slide", "slide": "a"}]},
                   {"role": "user", "content": "q"}]}, "messages[0].content[0].type"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "a.png"}},
                                                {"type": "text", "text": "q"}]}], "slide": "b"},
     "messages[0].content[0].image_url.url"),
    ({"messages": [{"role": "user", "content": 5}]}, "messages[0].content"),
    ({"messages": [{"role": "user"}]}, "messages[0].content"),
    ({"messages": "hi"}, "messages"),
    ({"messages": [{"role": "user", "content": "look <image> here"}]}, "messages[0].content"),
    ({"messages": [{"role": "user", "content": "x<|eot_id|>"}]}, "messages[0].content"),
    ({"messages": [{"role": "user", "content": [{"type": "slide", "slide": "a"}, {"type": "text", "text": "q"}]}],
      "slide": "b"}, "messages[0].content[0].slide"),
    ({"slide": ""}, "slide"),
    ({"max_tokens": 65}, "max_tokens"),
    ({"max_tokens": 0}, "max_tokens"),
    ({"max_tokens": True}, "max_tokens"),
    ({"temperature": 2.5}, "temperature"),
    ({"temperature": "hot"}, "temperature"),
    ({"top_p": 0}, "top_p"),
    ({"stop": ["a", "b", "c", "d", "e"]}, "stop"),
    ({"stop": [""]}, "stop"),
    ({"n": 2}, "n"),
    ({"tools": [{"type": "function"}]}, "tools"),
    ({"logprobs": True}, "logprobs"),
    ({"response_format": {"type": "json_object"}}, "response_format"),
    ({"stream_options": {"include_usage": True}}, "stream_options"),
    ({"seed": -1}, "seed"),
    ({"temperature": "0.5"}, "temperature"),
    ({"seed": 1.0}, "seed"),
    ({"stream": "yes"}, "stream"),
    ({"stream": True, "stream_options": 5}, "stream_options"),
    ({"stop": ["a", 5]}, "stop[1]"),
])
def test_parse_rejects_with_the_field_named(body, param):
    with pytest.raises(ApiError) as err:
        _parse(body)
    assert err.value.status == 400 and err.value.param == param, err.value.message
    assert err.value.body()["error"]["type"] == "invalid_request_error"


def test_parse_image_parts():
    url = "data:image/png;base64,iVBORw0KGgo="
    req = _parse({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}},
                                                            {"type": "text", "text": "What is it?"}]}]})
    assert req.image == (url, "messages[0].content[0].image_url.url") and req.slide is None
    assert req.question == "What is it?"
    again = {"role": "user", "content": [{"type": "image_url", "image_url": {"url": url, "detail": "high"}},
                                         {"type": "text", "text": "And?"}]}
    req = _parse({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}},
                                                            {"type": "text", "text": "q"}]},
                               {"role": "assistant", "content": "a"}, again]})
    assert req.history == [("q", "a")] and req.image[1] == "messages[0].content[0].image_url.url"
    with pytest.raises(ApiError) as err:  # two different images
        _parse({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}},
                                                          {"type": "image_url", "image_url": {"url": "b.png"}},
                                                          {"type": "text", "text": "q"}]}]})
    assert err.value.param == "messages[0].content[1].image_url.url"


def test_parse_rejects_non_objects():
    for body in ([], "x", None):
        with pytest.raises(ApiError):
            parse_chat_request(body, 8, 8)


def test_batch_keys():
    greedy, sampled = _parse({}), _parse({"temperature": 0.5})
    seeded = _parse({"temperature": 0.5, "seed": 1})
    assert batch_key(greedy, "1") == batch_key(_parse({"max_tokens": 3}), "2")
    assert batch_key(sampled, "1") == batch_key(_parse({"temperature": 0.5}), "2") != batch_key(greedy, "1")
    assert batch_key(seeded, "1") != batch_key(seeded, "2")


# ------------------------------------------------------------------------------- small helpers


def test_held_back_covers_stop_prefixes_and_partial_characters():
    assert _held_back("the cel", ["cells"]) == 3
    assert _held_back("the cells", ["cells"]) == 0  # a full stop string is cut elsewhere, not held
    assert _held_back("abc", []) == 0
    assert _held_back("ab\ufffd", []) == 1
    assert _held_back("x EN", ["END", "E"]) == 2


# ------------------------------------------------------------------------------------- the CLI


def test_cli_maps_flags_and_reads_the_key_from_the_environment(monkeypatch, tmp_path, capsys):
    import argparse

    from wsi_llava import cli
    from wsi_llava.serve.cli import add_arguments, config_from_args

    p = argparse.ArgumentParser()
    add_arguments(p)
    monkeypatch.setenv("WSI_LLAVA_API_KEY", "from-env")
    cfg = config_from_args(p.parse_args(["--model", "m", "--slides-root", "r", "--max-batch", "3", "--timeout", "5",
                                         "--slide-cache-mb", "10", "--threads", "1"]))
    assert (cfg.api_key, cfg.max_batch, cfg.request_timeout, cfg.slide_cache_bytes, cfg.torch_threads) == \
        ("from-env", 3, 5.0, 10 * 2**20, 1)
    assert cfg.host == "127.0.0.1"
    assert config_from_args(p.parse_args(["--model", "m", "--slides-root", "r", "--api-key", "flag"])).api_key == "flag"
    # a bad slides root is reported before any model is loaded
    assert cli.main(["serve", "--model", str(tmp_path), "--slides-root", str(tmp_path / "missing")]) == 2
    assert "is not a folder" in capsys.readouterr().err
