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
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Sequence

LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"

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
_LEADING_MARKER = re.compile(r"[\(\[]?([A-Za-z])\s*[\)\]\.:](?=\s|$)")
_BRACKETED = re.compile(r"(?:^|(?<=[\s\(\[]))\(?([A-Z])\)|\[([A-Z])\]")
_BARE = re.compile(r"(?<![\w'\-])([A-Z])(?![\w'\-])")


def _clean(text: str | None) -> str:
    """Unicode-normalise, drop markdown emphasis/backticks and collapse whitespace."""
    if text is None:
        return ""
    t = unicodedata.normalize("NFKC", str(text))
    t = t.replace("\u2019", "'").replace("\u2018", "'").replace("\u201c", '"').replace("\u201d", '"')
    t = re.sub(r"[*_`#]+", " ", t)
    return re.sub(r"\s+", " ", t).strip()


def normalize_text(text: str) -> str:
    """Lowercase, punctuation → space, whitespace collapsed (for option-text matching)."""
    t = _clean(text).lower()
    t = re.sub(r"[^\w]+", " ", t)
    return re.sub(r"\s+", " ", t).strip()


def _strip_own_marker(option: str, index: int) -> str:
    """``"B) Carcinoma"`` given as option 1 → ``"Carcinoma"`` (options sometimes carry their letter)."""
    m = re.match(r"\s*\(?([A-Za-z])[\)\.:]\s+", option)
    if m and m.group(1).upper() == LETTERS[index]:
        return option[m.end():]
    return option


def option_texts(choices: Sequence[str]) -> list[str]:
    """Options as plain text, without a leading ``"A) "`` that matches their own position."""
    if len(choices) > len(LETTERS):
        raise ValueError(f"at most {len(LETTERS)} options are supported, got {len(choices)}")
    return [_strip_own_marker(str(c), i) for i, c in enumerate(choices)]


def _light(text: str) -> str:
    """Lowercase, whitespace collapsed, symbols kept ("HPV+" and "HPV-" stay different)."""
    return _clean(text).lower()


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


def gold_letter(reference: str | None, choices: Sequence[str]) -> str | None:
    """Normalise a gold multiple-choice answer to its letter: ``"B"``, ``"b)"``, ``'B "'``, or the option
    text itself; ``None`` if it is neither."""
    opts = option_texts(choices)
    valid = LETTERS[: len(opts)]
    t = _clean(reference)
    m = re.fullmatch(r"[\W_]*([A-Za-z])[\W_]*", t)
    if m:
        letter = m.group(1).upper()
        return letter if letter in valid else None
    lead = _LEADING_MARKER.match(t)
    if lead and lead.group(1).upper() in valid:
        letter = lead.group(1).upper()
        rest = normalize_text(t[lead.end():])
        if not rest or rest == normalize_text(opts[LETTERS.index(letter)]):
            return letter
        return None
    for norm in (_light, normalize_text):
        target = norm(t).strip(" .;,")
        hits = [LETTERS[i] for i, o in enumerate(opts) if target and norm(o).strip(" .;,") == target]
        if hits:
            return hits[0] if len(hits) == 1 else None
    return None


_INLINE_MARKER = "(?:^|(?<=\\s))\\(?{letter}\\)\\s*"


def parse_inline_options(text: str) -> tuple[str, list[str]] | None:
    """Split a question with inline options into ``(stem, options)``.

    ``"Which type? A) Adenocarcinoma B) Squamous C) Small cell"`` →
    ``("Which type?", ["Adenocarcinoma", "Squamous", "Small cell"])``. Markers are ``A)`` or ``(A)``
    after whitespace (or at the start), in order A, B, C, …; at least two are needed, else ``None``.
    The last option ends at the first line break (anything after it is an instruction, not an option).
    """
    positions: list[tuple[int, int]] = []
    pos = 0
    for letter in LETTERS:
        m = re.compile(_INLINE_MARKER.format(letter=letter)).search(text, pos)
        if not m:
            break
        positions.append((m.start(), m.end()))
        pos = m.end()
    if len(positions) < 2:
        return None
    stem = text[: positions[0][0]].strip()
    options = []
    for i, (_, end) in enumerate(positions):
        stop = positions[i + 1][0] if i + 1 < len(positions) else len(text)
        opt = text[end:stop]
        if i + 1 == len(positions):
            opt = opt.split("\n", 1)[0]
        options.append(re.sub(r"\s+", " ", opt).strip())
    if any(not o for o in options):
        return None
    return stem, options
