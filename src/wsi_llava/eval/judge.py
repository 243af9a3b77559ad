"""Optional LLM-judge scores for open-ended answers through any OpenAI-compatible chat endpoint.

In the style of WSI-LLaVA's WSI-Precision / WSI-Relevance (not a reproduction of their prompts):

* ``precision`` — of the pathology claims in the model's answer, the fraction the reference supports
  (low when the answer invents findings);
* ``relevance`` — of the key findings in the reference, the fraction the answer addresses.

The judge replies with one JSON object ``{"precision": p, "relevance": r}`` (each in [0, 1]). A
reply that cannot be read, or a failed request, is recorded as a failure and left out of the means
(listed, never turned into zeros). Only the Python standard library is used (``urllib``); nothing
is contacted unless ``--judge-url`` is given.
"""

from __future__ import annotations

import json
import re
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from .metrics import EvalConfig
from .rows import Item
from .stats import mean_with_ci, stable_seed

SYSTEM_PROMPT = (
    "You are an expert pathologist grading an AI assistant's answer about a whole-slide image against "
    "a reference answer written by a pathologist. Judge only medical content, not style."
)
USER_TEMPLATE = """Question:
{question}

Reference answer:
{reference}

Assistant's answer:
{prediction}

1. List the pathology claims in the assistant's answer; count how many the reference supports.
   precision = supported claims / all claims (0 if the answer makes no claim).
2. List the key findings in the reference; count how many the assistant's answer addresses correctly.
   relevance = addressed findings / all key findings.
Finish with one line holding only a JSON object: {{"precision": <0..1>, "relevance": <0..1>}}"""


@dataclass
class JudgeConfig:
    """Where and how to ask the judge."""

    url: str
    """Base URL of an OpenAI-compatible API (``http://host:port/v1``) or its ``/chat/completions`` URL."""
    model: str = "judge"
    """Model name sent in each request."""
    api_key: str | None = None
    """Bearer token, if the endpoint needs one."""
    timeout: float = 120.0
    """Seconds per request."""
    retries: int = 2
    """Extra attempts after a failed request (1 s, 2 s, … apart)."""
    max_tokens: int = 1024
    """Longest judge reply."""


def endpoint(url: str) -> str:
    """``http://h/v1`` → ``http://h/v1/chat/completions`` (an URL already ending so is kept)."""
    url = url.rstrip("/")
    return url if url.endswith("/chat/completions") else url + "/chat/completions"


def build_messages(question: str, reference: str, prediction: str) -> list[dict[str, str]]:
    """The chat messages for one item."""
    return [
        {"role": "system", "content": SYSTEM_PROMPT},
        {"role": "user", "content": USER_TEMPLATE.format(
            question=question or "Write the pathology report for this slide.", reference=reference, prediction=prediction)},
    ]


def parse_judgement(text: str) -> dict[str, float] | None:
    """The last ``{"precision": …, "relevance": …}`` object in a reply, both in [0, 1]; else None."""
    for candidate in reversed(re.findall(r"\{[^{}]*\}", text or "")):
        try:
            obj = json.loads(candidate)
        except json.JSONDecodeError:
            continue
        try:
            p, r = float(obj["precision"]), float(obj["relevance"])
        except (KeyError, TypeError, ValueError):
            continue
        if 0.0 <= p <= 1.0 and 0.0 <= r <= 1.0:
            return {"precision": p, "relevance": r}
    return None


def ask(config: JudgeConfig, messages: list[dict[str, str]]) -> str:
    """POST one chat completion; returns the reply text. Raises ``RuntimeError`` after the retries."""
    body = json.dumps({"model": config.model, "messages": messages, "temperature": 0.0,
                       "max_tokens": config.max_tokens}).encode("utf-8")
    headers = {"Content-Type": "application/json"}
    if config.api_key:
        headers["Authorization"] = f"Bearer {config.api_key}"
    last = None
    for attempt in range(config.retries + 1):
        if attempt:
            time.sleep(float(attempt))
        request = urllib.request.Request(endpoint(config.url), data=body, headers=headers, method="POST")
        try:
            with urllib.request.urlopen(request, timeout=config.timeout) as response:
                payload = json.loads(response.read().decode("utf-8"))
            return payload["choices"][0]["message"]["content"]
        except (urllib.error.URLError, OSError, json.JSONDecodeError, KeyError, IndexError, TypeError) as e:
            last = e
    raise RuntimeError(f"judge request to {endpoint(config.url)} failed: {last}")


def judge_items(items: Sequence[Item], config: JudgeConfig, eval_config: EvalConfig | None = None) -> dict[str, object]:
    """Judge every open-ended item → ``{precision, precision_ci, relevance, relevance_ci, n_judged,
    n_failed, failures, model, url}`` (means over the items the judge scored)."""
    eval_config = eval_config or EvalConfig()
    scores, failures = [], []
    for it in items:
        if it.kind != "open":
            continue
        try:
            reply = ask(config, build_messages(it.question, it.reference, it.prediction))
        except RuntimeError as e:
            failures.append({"key": it.key, "row": it.row, "error": str(e)})
            continue
        got = parse_judgement(reply)
        if got is None:
            failures.append({"key": it.key, "row": it.row, "error": f"unreadable judge reply: {reply[:200]!r}"})
            continue
        scores.append((got["precision"], got["relevance"]))
    out: dict[str, object] = {"model": config.model, "url": endpoint(config.url), "n_judged": len(scores),
                              "n_failed": len(failures), "failures": failures}
    values = np.asarray(scores, dtype=np.float64).reshape(-1, 2)
    for j, name in enumerate(("precision", "relevance")):
        if len(values):
            rng = np.random.default_rng(stable_seed(eval_config.seed, "__judge__", name))
            out[name], out[f"{name}_ci"] = mean_with_ci(values[:, j], bootstrap=eval_config.bootstrap,
                                                         confidence=eval_config.confidence, rng=rng)
        else:
            out[name], out[f"{name}_ci"] = None, None
    return out
