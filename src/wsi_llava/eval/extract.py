"""Answer extraction for closed-ended items: which option letter, or yes/no, a free-text answer gives.

Pure functions, no model and no I/O. The rules are conservative: an answer that names no option, or
names several that disagree, gives ``None`` (the scorer counts it wrong and lists it) rather than a
guess. The cascade in :func:`extract_choice` is, in order, the first rule that applies deciding:

1. the whole answer is one letter (``"B"``, ``"(b)"``, ``"B."``);
2. an explicit cue: ``"The answer is B"``, ``"Answer: b"``, ``"correct option is (C)"``, ``"I choose D"``
   (several different cued letters → ``None``);
3. a leading marker: ``"B) …"``, ``"(B) …"``, ``"B. Carcinoma"``, ``"B: …"`` — unless the text after the
   marker is another option's text (``"C) <text of B>"`` → ``None``);
4. option text: the options whose text occurs in the answer — case-insensitively with symbols kept
   (``HPV+`` ≠ ``HPV-``), or failing that with punctuation ignored — ignoring an option whose every
   occurrence lies inside a longer matched option (``"Seminoma"`` inside ``"Non-seminoma"``); exactly
   one → it, unless a bracketed letter elsewhere disagrees;
5. bracketed letters anywhere (``"… (C)"``), then standalone capital letters (``"Both A and C"`` → two
   → ``None``); ``"A"``/``"I"`` followed by an ordinary word are read as the article/pronoun, and a
   letter right after ``not``/``except``/``rather than`` is skipped.

Gold answers are not read here: the gold letter of a row comes from
:func:`wsi_llava.data.choices.match_choice`, the rule the training target uses too.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

from ..data.choices import LEADING_MARKER as _LEADING_MARKER
from ..data.choices import LETTERS, normalize_text, option_texts
from ..data.choices import clean_text as _clean
from ..data.choices import fold_text as _light

#: Words after which a capital ``A``/``I`` is still read as an option letter ("A and C", "A is right").
_LETTER_FOLLOWERS = frozenset(
    "and or nor is was are were but seems appears because then would should might could looks fits "
    "matches best only to vs versus also too".split()
)
_NEGATION_BEFORE = re.compile(
    r"(?:\bnot|\bno|\bnever|\bexcept|\bexcluding|\bexclude|\brule\s+out|\bruled\s+out|\brather\s+than"
    r"|\binstead\s+of|\bisn't|\bisnt)\s+(?:option\s+|choice\s+)?[\(\[]?$",
    re.IGNORECASE,
)
_CUE = re.compile(
    r"(?:\b(?:answer|option|choice)\b(?:\s+(?:is|would\s+be|should\s+be|will\s+be|must\s+be|=))?"
    r"|\b(?:choose|select|pick|go\s+with))"
    r"\s*[:=\-]?\s*(?:option\s+|choice\s+)?[\(\[]?([A-Za-z])(?=$|[^\w'\-])"
    r"((?:\s*(?:,|/|&|\bor\b|\band\b)\s*[\(\[]?(?-i:[A-Z])(?=$|[^\w'\-]))*)",
    re.IGNORECASE,
)
_BRACKETED = re.compile(r"(?:^|(?<=[\s\(\[]))\(?([A-Z])\)|\[([A-Z])\]")
_BARE = re.compile(r"(?<![\w'\-])([A-Z])(?![\w'\-])")


def _find_spans(hay: str, needle: str) -> list[tuple[int, int]]:
    """Occurrences of ``needle`` in ``hay`` not glued to a letter/digit on an alphanumeric edge."""
    if not needle:
        return []
    before = r"(?<![^\W_])" if needle[0].isalnum() else ""
    after = r"(?![^\W_])" if needle[-1].isalnum() else ""
    return [(m.start(), m.end()) for m in re.finditer(before + re.escape(needle) + after, hay)]


def _longest_matches(spans: dict[int, list[tuple[int, int]]]) -> set[str]:
    """Letters of matched options, dropping one whose every occurrence lies inside a longer match."""
    keep = set()
    for i, own in spans.items():
        inside_longer = all(
            any(j != i and s2 <= s and e <= e2 and (e2 - s2) > (e - s) for j, other in spans.items() for s2, e2 in other)
            for s, e in own
        )
        if not inside_longer:
            keep.add(LETTERS[i])
    return keep


def _text_matches(text: str, choices: Sequence[str]) -> set[str]:
    """Letters of the options whose text occurs in ``text`` (longest match wins).

    First with symbols kept (so ``HPV+``/``HPV-`` differ); if no option matches that way, again with
    punctuation ignored (so ``"non keratinizing"`` matches ``"non-keratinizing,"``).
    """
    for norm in (_light, normalize_text):
        hay = norm(text)
        spans = {}
        for i, opt in enumerate(choices):
            needle = norm(opt).strip(" .;,")
            found = _find_spans(hay, needle)
            if found:
                spans[i] = found
        if spans:
            return _longest_matches(spans)
    return set()


def _negated(text: str, start: int) -> bool:
    return bool(_NEGATION_BEFORE.search(text[max(0, start - 40):start]))


def _cue_letters(text: str, valid: str) -> set[str] | None:
    """Letters named after explicit cues; ``None`` if a cue names an invalid letter or a letter list."""
    letters: set[str] = set()
    for m in _CUE.finditer(text):
        letter = m.group(1)
        after = text[m.end(1):m.end(1) + 2]
        if letter.islower() and after[:1] not in ("", ")", "]", ".", ",", ";", ":", "!", "?"):
            continue  # "the answer is a squamous cell carcinoma": an article, not option a
        if m.group(2):  # "answer is B or C"
            return None
        up = letter.upper()
        if up not in valid:
            if letter.isupper():
                return None  # "The answer is E" with four options
            continue
        letters.add(up)
    return letters


def _bracketed_letters(text: str, valid: str) -> set[str]:
    out = set()
    for m in _BRACKETED.finditer(text):
        letter = m.group(1) or m.group(2)
        if letter in valid and not _negated(text, m.start()):
            out.add(letter)
    return out


def _bare_letters(text: str, valid: str) -> set[str]:
    out = set()
    for m in _BARE.finditer(text):
        letter = m.group(1)
        if letter not in valid or _negated(text, m.start()):
            continue
        if letter in ("A", "I"):
            nxt = re.match(r"\s+([a-z][\w'\-]*)", text[m.end():])
            if nxt and nxt.group(1) not in _LETTER_FOLLOWERS:
                continue  # "A squamous cell carcinoma", "I think"
        out.add(letter)
    return out


def extract_choice(text: str | None, choices: Sequence[str]) -> str | None:
    """The option letter a free-text answer gives, or ``None`` (no option, or conflicting options).

    ``choices`` are the option texts in order (option i has letter ``"ABC…"[i]``); a leading ``"A) "``
    on an option that matches its position is ignored. See the module docstring for the rules.
    """
    opts = option_texts(choices)
    valid = LETTERS[: len(opts)]
    t = _clean(text)
    if not t or not valid:
        return None

    whole = re.fullmatch(r"[\(\[]?\s*([A-Za-z])\s*[\)\]\.:!]?", t)
    if whole:
        letter = whole.group(1).upper()
        return letter if letter in valid else None

    cued = _cue_letters(t, valid)
    if cued is None or len(cued) > 1:
        return None
    if len(cued) == 1:
        letter = next(iter(cued))
        return letter

    lead = _LEADING_MARKER.match(t)
    if lead and lead.group(1).upper() in valid:
        letter = lead.group(1).upper()
        rest_matches = _text_matches(t[lead.end():], opts)
        if rest_matches and letter not in rest_matches:
            return None
        return letter

    by_text = _text_matches(t, opts)
    bracketed = _bracketed_letters(t, valid)
    if len(by_text) == 1:
        letter = next(iter(by_text))
        if bracketed and bracketed != {letter}:
            return None
        return letter
    if len(by_text) > 1:
        return None

    if bracketed:
        return next(iter(bracketed)) if len(bracketed) == 1 else None
    bare = _bare_letters(t, valid)
    return next(iter(bare)) if len(bare) == 1 else None


_YES = {"yes", "yeah", "yep", "true", "correct", "affirmative"}
_NO = {"no", "nope", "false", "incorrect", "negative"}


def extract_yes_no(text: str | None) -> str | None:
    """``"yes"``/``"no"`` from a free-text answer, or ``None`` when it says neither or both.

    Decides on the first word (``"Yes, the …"``, ``"No."``, ``"True"``), else on an explicit cue
    (``"the answer is no"``), else on sentence-initial yes/no words; any disagreement → ``None``.
    """
    t = _clean(text).lower()
    if not t:
        return None
    first = re.match(r"[^\w]*([a-z]+)\b", t)
    if first and (first.group(1) in _YES or first.group(1) in _NO):
        return "yes" if first.group(1) in _YES else "no"
    found = set()
    for m in re.finditer(r"\b(?:answer|response)\s*(?:is|would\s+be|:)?\s*[:\-]?\s*\"?(yes|no)\b", t):
        found.add(m.group(1))
    if not found and not (re.search(r"\byes\b", t) and re.search(r"\bno\b", t)):
        for m in re.finditer(r"(?:^|[.!?;:]\s+)(yes|no)\b(?=[\s,.!;:]|$)", t):
            found.add(m.group(1))
    return found.pop() if len(found) == 1 else None


def yes_no_label(reference: str | None) -> str | None:
    """``"yes"``/``"no"`` if a gold answer is exactly Yes/No (any case, trailing punctuation), else ``None``."""
    t = normalize_text(reference or "")
    return t if t in ("yes", "no") else None
