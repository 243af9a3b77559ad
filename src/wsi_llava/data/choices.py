"""Multiple-choice options and the one rule that turns a gold answer into its option letter.

The manifest (the training target, :mod:`wsi_llava.data.prompts`), the importers and the evaluation
(the gold letter an answer is scored against, :mod:`wsi_llava.eval.metrics`) all call
:func:`match_choice` / :func:`choice_letter`, so a row is trained and scored on the same letter.

The rule, first step that applies deciding (option *i* has letter ``"ABC…"[i]``; a leading ``"B) "``
on an option that matches its own position is ignored):

1. **Exact option text** — the answer equals one option's text, ignoring case, runs of whitespace
   and a trailing ``.``/``,``/``;`` (symbols kept: ``"HPV-"`` ≠ ``"HPV+"``). With choices
   ``["x", "a"]`` the answer ``"a"`` is **B**: an option's text wins over reading it as a letter.
2. **Bare letter** — the answer is one letter with only brackets/punctuation/quotes around it:
   ``"B"``, ``"b"``, ``"(B)"``, ``"B)"``, ``"b."``, ``'B "'``.
3. **Letter and text** — ``"B) text"``, ``"(B) text"``, ``"B. text"``, ``"B: text"``: the letter,
   unless the text is the text of a *different* option (``"A. Adenocarcinoma"`` with Adenocarcinoma
   as B is a contradiction). Other text after the letter (an explanation) is allowed.
4. **Option text, punctuation ignored** — ``"squamous-cell carcinoma"`` is ``"Squamous cell
   carcinoma"``.

Anything else is an error (:class:`ChoiceError` with the reason): a letter past the last option,
an answer that equals the text of two options (they read the same), a contradiction, or an answer
that is neither a letter nor an option's text. Callers name the file and row.

Also here: the option rules of a manifest row (:func:`options_tuple`: two to 26 non-empty option
texts) and the option block of a prompt (:func:`option_lines`, ``A) …`` per line).
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Sequence

LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"

#: ``"B) …"``, ``"(B) …"``, ``"B. …"``, ``"B: …"``: a letter marker followed by a space or the end.
LEADING_MARKER = re.compile(r"[\(\[]?([A-Za-z])\s*[\)\]\.:](?=\s|$)")
_BARE_LETTER = re.compile(r"[\W_]*([A-Za-z])[\W_]*")


class ChoiceError(ValueError):
    """A multiple-choice answer that gives no option, or not exactly one; the message says why."""


def clean_text(text: str | None) -> str:
    """Unicode-normalise, drop markdown emphasis/backticks and collapse whitespace."""
    if text is None:
        return ""
    t = unicodedata.normalize("NFKC", str(text))
    t = t.replace("\u2019", "'").replace("\u2018", "'").replace("\u201c", '"').replace("\u201d", '"')
    t = re.sub(r"[*_`#]+", " ", t)
    return re.sub(r"\s+", " ", t).strip()


def fold_text(text: str | None) -> str:
    """Lowercase, whitespace collapsed, symbols kept (``"HPV+"`` and ``"HPV-"`` stay different)."""
    return clean_text(text).lower()


def normalize_text(text: str | None) -> str:
    """Lowercase, punctuation → space, whitespace collapsed (for option-text matching)."""
    t = clean_text(text).lower()
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


def _exact(text: str) -> str:
    return fold_text(text).strip(" .;,")


def _loose(text: str) -> str:
    return normalize_text(text)


def _hits(text: str, opts: Sequence[str], norm) -> list[str]:
    target = norm(text)
    return [LETTERS[i] for i, o in enumerate(opts) if target and norm(o) == target]


def _one(hits: list[str], what: str) -> str | None:
    if len(hits) > 1:
        raise ChoiceError(f"{what} is the text of options {' and '.join(hits)} (they read the same); "
                          "make the options distinct or answer with the letter")
    return hits[0] if hits else None


def match_choice(answer: str | None, choices: Sequence[str]) -> str:
    """The option letter of a gold multiple-choice answer (see the module docstring for the rule).

    Raises :class:`ChoiceError` saying why when the answer gives no option or not exactly one.
    """
    opts = option_texts(choices)
    valid = LETTERS[: len(opts)]
    t = clean_text(answer)
    if not t:
        raise ChoiceError("the answer is empty")
    if not valid:
        raise ChoiceError("there are no options")
    span = f"{valid[0]}–{valid[-1]}"

    hit = _one(_hits(t, opts, _exact), "the answer")
    if hit is not None:
        return hit

    bare = _BARE_LETTER.fullmatch(t)
    if bare:
        letter = bare.group(1).upper()
        if letter not in valid:
            raise ChoiceError(f"letter {letter} is past the last option ({len(opts)} options: {span})")
        return letter

    lead = LEADING_MARKER.match(t)
    if lead and lead.group(1).upper() in valid:
        letter = lead.group(1).upper()
        rest = t[lead.end():]
        named = _hits(rest, opts, _exact) or _hits(rest, opts, _loose)
        if named and letter not in named:
            raise ChoiceError(f"it says letter {letter} but the text after it is the text of option "
                              f"{' and '.join(named)}; fix the letter or the text")
        return letter

    hit = _one(_hits(t, opts, _loose), "the answer (punctuation ignored)")
    if hit is not None:
        return hit
    if lead:
        raise ChoiceError(f"letter {lead.group(1).upper()} is past the last option ({len(opts)} options: {span})")
    raise ChoiceError(f"it is neither an option letter ({span}) nor the text of an option")


def choice_letter(answer: str | None, choices: Sequence[str] | None) -> str | None:
    """:func:`match_choice`, or ``None`` when the answer gives no single option (or there are no choices)."""
    if not choices:
        return None
    try:
        return match_choice(answer, choices)
    except ChoiceError:
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


def option_lines(choices: Sequence[str]) -> str:
    """``"A) first\\nB) second\\n…"`` — the option block shown in multiple-choice prompts."""
    if len(choices) > len(LETTERS):
        raise ValueError(f"at most {len(LETTERS)} choices are supported, got {len(choices)}")
    return "\n".join(f"{LETTERS[i]}) {str(c).strip()}" for i, c in enumerate(choices))


def options_tuple(value) -> tuple[str, ...] | None:
    """A manifest's list of options → a tuple of option texts (None for None or an empty list).

    Raises ValueError saying why when it is not a list, an option is not text or is empty, there
    are more options than letters, or only one.
    """
    if value is None:
        return None
    if not isinstance(value, (list, tuple)):
        raise ValueError(f"expected a list of option strings, got {type(value).__name__}")
    out = []
    for i, v in enumerate(value):
        if isinstance(v, bool) or not isinstance(v, (str, int, float)):
            raise ValueError(f"option {i} is {type(v).__name__}, expected text")
        s = str(v).strip()
        if not s:
            raise ValueError(f"option {i} is empty")
        out.append(s)
    if len(out) > len(LETTERS):
        raise ValueError(f"{len(out)} options; at most {len(LETTERS)} are supported")
    if len(out) == 1:
        raise ValueError("only one option; a multiple-choice row needs at least two")
    return tuple(out) or None
