"""Chat prompts: the LM tokenizer's own chat template, ``<image>`` expanded to exactly the model's
visual-token count, labels that supervise only the answer (and its end-of-turn), and a mask of the
question's tokens (the query of the ``prompt_topk`` selector).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

from ..arguments import SYSTEM_PROMPT_DEFAULT
from ..errors import WsiLlavaError
from .choices import ChoiceError, match_choice
from .choices import option_lines
from .manifest import Record

IMAGE_TOKEN = "<image>"
IGNORE_INDEX = -100

DEFAULT_SYSTEM_PROMPT = (
    "You are a pathology assistant. Answer questions about the whole-slide image you are shown."
)


def resolve_system_prompt(value: str | None) -> str | None:
    """A configured ``system_prompt``: ``default`` (:data:`~wsi_llava.arguments.SYSTEM_PROMPT_DEFAULT`, the
    config's default) is :data:`DEFAULT_SYSTEM_PROMPT`; None or empty is no system message."""
    if value == SYSTEM_PROMPT_DEFAULT:
        return DEFAULT_SYSTEM_PROMPT
    return value or None

#: Prompts for caption-only (report) rows; one is chosen per slide by a stable hash of its id.
REPORT_PROMPTS = (
    "Please provide a comprehensive pathology report for this whole-slide image.",
    "Write the pathology report for this whole-slide image.",
    "Describe this whole-slide image as a pathologist would in a report.",
)

MC_INSTRUCTION = "Answer with the letter of the correct option."


class PromptError(WsiLlavaError, ValueError):
    """A row cannot be turned into a training example (names the manifest, row and field)."""


def stable_index(key: str, n: int) -> int:
    """A deterministic index in ``[0, n)`` from a string (md5; never Python's salted ``hash()``)."""
    return int.from_bytes(hashlib.md5(key.encode("utf-8")).digest()[:8], "big") % n


def record_turn(record: Record, report_prompts: tuple[str, ...] = REPORT_PROMPTS) -> tuple[str, str, str]:
    """One manifest record → ``(user_text, target_text, question_text)``.

    Multiple choice: the question, ``A) …`` option lines and an instruction; the target is the letter.
    Question + answer: as written. Caption only: a report prompt (stable per slide) and the caption.
    ``question_text`` is the part of the user text that is the question (the prompt top-K query).
    """
    where = f"{record.source}, row {record.row}"
    if record.kind == "mc":
        try:
            letter = match_choice(record.answer, record.choices)
        except ChoiceError as e:
            raise PromptError(f"{where}: field 'answer': {record.answer!r} gives no single option: {e} "
                              f"(choices {list(record.choices)})") from None
        user = f"{record.question.strip()}\n{option_lines(record.choices)}\n{MC_INSTRUCTION}"
        return user, letter, record.question.strip()
    if record.kind == "vqa":
        return record.question.strip(), record.answer.strip(), record.question.strip()
    if record.kind == "report":
        prompt = report_prompts[stable_index(record.slide_id, len(report_prompts))]
        return prompt, record.caption.strip(), prompt
    raise PromptError(f"{where}: unknown row kind {record.kind!r}")


@dataclass
class Example:
    """One tokenised example.

    input_ids [T], labels [T] (``IGNORE_INDEX`` outside the answer), question_mask [T] (True on the
    tokens of the latest question). Generation prompts have ``labels`` all ignored.
    """

    input_ids: list[int]
    labels: list[int]
    question_mask: list[bool]


class PromptBuilder:
    """Builds training examples and generation prompts for one tokenizer and visual-token count.

    ``num_image_tokens`` is the one shared number (``image_seq_length`` + 1 if the CLS token is used)
    that the model also produces; every prompt holds exactly that many ``<image>`` tokens.
    """

    def __init__(self, tokenizer, num_image_tokens: int, cutoff_len: int = 2048,
                 system_prompt: str | None = DEFAULT_SYSTEM_PROMPT):
        if tokenizer.chat_template is None:
            raise PromptError("the tokenizer has no chat template; set one (tokenizer.chat_template) before training")
        self.tokenizer = tokenizer
        self.num_image_tokens = int(num_image_tokens)
        self.cutoff_len = int(cutoff_len)
        self.system_prompt = system_prompt or None
        self.image_token_id = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
        if self.image_token_id is None or self.image_token_id == tokenizer.unk_token_id:
            raise PromptError(f"the tokenizer has no {IMAGE_TOKEN} token; add it as a special token first")

    # -- rendering ---------------------------------------------------------------------------------
    def messages(self, history: list[tuple[str, str]], user: str, answer: str | None = None) -> list[dict]:
        """Chat messages: optional system prompt, earlier turns, the new user turn (the first user turn
        carries the visual tokens), and optionally the assistant answer."""
        msgs = [{"role": "system", "content": self.system_prompt}] if self.system_prompt else []
        image = IMAGE_TOKEN * self.num_image_tokens + "\n"
        for i, (u, a) in enumerate(history):
            msgs.append({"role": "user", "content": (image if i == 0 else "") + u.strip()})
            msgs.append({"role": "assistant", "content": a.strip()})
        msgs.append({"role": "user", "content": (image if not history else "") + user.strip()})
        if answer is not None:
            msgs.append({"role": "assistant", "content": answer.strip()})
        return msgs

    def _render(self, msgs: list[dict], add_generation_prompt: bool) -> str:
        return self.tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=add_generation_prompt)

    def _tokenize_prompt(self, text: str, question: str, where: str) -> tuple[list[int], list[bool]]:
        enc = self.tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        ids = list(enc["input_ids"])
        start = text.rfind(question.strip()) if question.strip() else -1
        end = start + len(question.strip())
        qmask = [start >= 0 and s < end and e > start and e > s for s, e in enc["offset_mapping"]]
        qmask = [q and i != self.image_token_id for q, i in zip(qmask, ids)]
        n_img = sum(1 for i in ids if i == self.image_token_id)
        if n_img != self.num_image_tokens:
            raise PromptError(f"{where}: the prompt holds {n_img} {IMAGE_TOKEN} tokens but the model produces "
                              f"{self.num_image_tokens} visual tokens (does the text itself contain {IMAGE_TOKEN}?)")
        if len(ids) > self.cutoff_len:
            raise PromptError(f"{where}: the prompt alone is {len(ids)} tokens (with {self.num_image_tokens} visual "
                              f"tokens), longer than cutoff_len={self.cutoff_len}; raise cutoff_len or lower image_seq_length")
        return ids, qmask

    # -- public ------------------------------------------------------------------------------------
    def build_train(self, user: str, target: str, question: str | None = None, where: str = "") -> Example:
        """A supervised example: labels on the answer tokens and the end-of-turn only. The answer is
        truncated to fit ``cutoff_len``; the prompt and the visual tokens never are."""
        user = user.replace(IMAGE_TOKEN, "").strip()
        prompt = self._render(self.messages([], user), add_generation_prompt=True)
        full = self._render(self.messages([], user, target), add_generation_prompt=False)
        if not full.startswith(prompt):
            raise PromptError("the chat template renders the prompt differently with and without the answer; "
                              "labels cannot be placed (use a template whose generation prompt is a prefix)")
        prompt_ids, qmask = self._tokenize_prompt(prompt, question if question is not None else user, where)
        answer_ids = self.tokenizer(full[len(prompt):], add_special_tokens=False)["input_ids"]
        answer_ids = answer_ids[: self.cutoff_len - len(prompt_ids)]
        return Example(prompt_ids + answer_ids, [IGNORE_INDEX] * len(prompt_ids) + answer_ids,
                       qmask + [False] * len(answer_ids))

    def build_record(self, record: Record) -> Example:
        """A supervised example for one manifest record."""
        user, target, question = record_turn(record)
        return self.build_train(user, target, question, where=f"{record.source}, row {record.row}")

    def build_generation(self, user: str, history: list[tuple[str, str]] | None = None,
                         question: str | None = None, where: str = "") -> Example:
        """A generation prompt (ends with the assistant header) after ``history`` turns."""
        user = user.replace(IMAGE_TOKEN, "").strip()
        prompt = self._render(self.messages(history or [], user), add_generation_prompt=True)
        ids, qmask = self._tokenize_prompt(prompt, question if question is not None else user, where)
        return Example(ids, [IGNORE_INDEX] * len(ids), qmask)
