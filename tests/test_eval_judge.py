"""Optional LLM judge against a fake OpenAI-compatible server on 127.0.0.1 (eval/judge.py)."""

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from wsi_llava.cli import main as cli_main
from wsi_llava.eval.judge import JudgeConfig, ask, build_messages, endpoint, judge_items, parse_judgement
from wsi_llava.eval.metrics import EvalConfig
from wsi_llava.eval.rows import prepare_items


class FakeJudge(BaseHTTPRequestHandler):
    """Replies 1.0/1.0 when the answer equals the reference, 0.25/0.5 otherwise, garbage for 'GARBAGE'."""

    requests: list = []

    def do_POST(self):  # noqa: N802
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        FakeJudge.requests.append({"path": self.path, "body": body, "auth": self.headers.get("Authorization")})
        text = body["messages"][-1]["content"]
        reference = text.split("Reference answer:\n", 1)[1].split("\n\nAssistant's answer:", 1)[0]
        answer = text.split("Assistant's answer:\n", 1)[1].split("\n\n1.", 1)[0]
        if "GARBAGE" in answer:
            content = "I refuse to give numbers."
        elif answer == reference:
            content = 'All claims supported.\n{"precision": 1.0, "relevance": 1.0}'
        else:
            content = 'Some claims unsupported.\n{"precision": 0.25, "relevance": 0.5}'
        payload = json.dumps({"choices": [{"message": {"role": "assistant", "content": content}}]}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)

    def log_message(self, *args):
        pass


@pytest.fixture()
def server():
    FakeJudge.requests = []
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), FakeJudge)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}/v1"
    httpd.shutdown()
    httpd.server_close()


def rows():
    base = {"slide_id": "s", "question": "Describe the slide.", "choices": None, "kind": "vqa", "category": None, "dataset": None}
    return [
        {**base, "key": "a", "row": 2, "reference": "Acinar adenocarcinoma.", "prediction": "Acinar adenocarcinoma."},
        {**base, "key": "b", "row": 3, "reference": "Squamous cell carcinoma.", "prediction": "Adenocarcinoma."},
        {**base, "key": "c", "row": 4, "reference": "Benign.", "prediction": "GARBAGE"},
        {**base, "key": "d", "row": 5, "reference": "Yes", "prediction": "Yes", "kind": "vqa"},  # closed: not judged
    ]


def test_parse_judgement():
    assert parse_judgement('x {"precision": 0.5, "relevance": 1} y') == {"precision": 0.5, "relevance": 1.0}
    assert parse_judgement('{"precision": 0.1, "relevance": 0.1} then {"precision": 0.9, "relevance": 0.8}')["precision"] == 0.9
    assert parse_judgement('{"precision": 7, "relevance": 1}') is None
    assert parse_judgement("no json") is None
    assert endpoint("http://h/v1/") == "http://h/v1/chat/completions"
    assert endpoint("http://h/v1/chat/completions") == "http://h/v1/chat/completions"


def test_judge_items_against_fake_server(server):
    items = prepare_items(rows())
    out = judge_items(items, JudgeConfig(url=server, model="fake", api_key="k123"), EvalConfig(bootstrap=100))
    assert out["n_judged"] == 2 and out["n_failed"] == 1
    assert out["precision"] == pytest.approx((1.0 + 0.25) / 2)
    assert out["relevance"] == pytest.approx((1.0 + 0.5) / 2)
    assert out["failures"][0]["key"] == "c" and "unreadable" in out["failures"][0]["error"]
    # two judged items (1.0 and 0.25): every bootstrap mean is 0.25, 0.625 or 1.0, and the 95 % percentile
    # interval over 100 resamples reaches both ends
    assert tuple(out["precision_ci"]) == (0.25, 1.0)
    sent = FakeJudge.requests[0]
    assert sent["path"] == "/v1/chat/completions" and sent["body"]["model"] == "fake"
    assert sent["auth"] == "Bearer k123" and sent["body"]["temperature"] == 0.0
    assert len(FakeJudge.requests) == 3  # the closed yes/no item is not sent


def test_unreachable_judge_fails_cleanly():
    with pytest.raises(RuntimeError, match="judge request"):
        ask(JudgeConfig(url="http://127.0.0.1:9/v1", retries=0, timeout=2), build_messages("q", "r", "p"))


def test_eval_command_with_judge(server, tmp_path, capsys):
    p = tmp_path / "preds.jsonl"
    p.write_text("".join(json.dumps(r) + "\n" for r in rows()), encoding="utf-8")
    out = tmp_path / "ev"
    assert cli_main(["eval", "--predictions", str(p), "--out", str(out), "--bootstrap", "50", "--judge-url", server]) == 0
    m = json.loads((out / "metrics.json").read_text())
    assert m["judge"]["n_judged"] == 2 and m["judge"]["precision"] == pytest.approx(0.625)
    report = (out / "report.md").read_text()
    assert "## LLM judge" in report and "1 item(s) not judged" in report
    assert "Judge precision" in capsys.readouterr().out
