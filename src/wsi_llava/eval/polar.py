"""Yes/no (and "good or poor") answers written as sentences: read them, or say that we cannot.

WSI-Bench states many binary answers in prose: ``Specific_Feature_Description`` answers polar
questions ("Is there significant nuclear atypia …?") with "Yes, …", "Correct, …", "Indeed, …", "No,
there is no …" or a bare description; ``Prognosis`` answers "… is the prognosis good or poor?" with
"The prognosis is relatively poor. …"; a model asked ``Prognosis_TF_question``'s "is the prognosis
poor?" may answer "The prognosis is generally poor." These functions give the label such an answer
states, or ``None`` — never a guess: a caller counts ``None`` as *unparsed*, explicitly.

Rules (:func:`binary_label`), on the answer's first sentence:

* **Polar question** (the last clause starts with is/are/do/does/can/…, see :func:`question_form`):
  ("Can you describe …?" is a request, not a polar question)
  1. the first word is a yes-word (yes, correct, indeed, absolutely, certainly, true, …) → ``"yes"``;
     a no-word (no, incorrect, false, not, neither, none) → ``"no"``;
  2. the sentence opens with "There is no" / "There are no" / "No evidence" → ``"no"``;
  3. the question asks "is the X ADJ?" and the answer says "X is [adverbs] ADJ2": ADJ2 on the same
     side of an :data:`AXES` pair as ADJ → ``"yes"``, on the other side → ``"no"`` (a "not" between
     flips it): "is the prognosis poor?" + "The prognosis is generally good" → ``"no"``;
  4. otherwise ``None``.
* **Alternative question** ending "… X or Y?" where X and Y are two sides of one :data:`AXES` pair
  ("good or poor"): the label is X or Y when the first sentence names exactly one side (any word of
  that side: "moderately favorable" → ``"good"``) and not after "not"; otherwise ``None``
  ("The prognosis is intermediate").
"""

from __future__ import annotations

import functools
import re
import unicodedata

#: Two-sided scales used in binary questions: (one side, the other side). Words on one side count
#: as the same answer ("favorable" = "good").
AXES: tuple[tuple[frozenset[str], frozenset[str]], ...] = (
    (frozenset({"good", "favorable", "favourable", "excellent"}),
     frozenset({"poor", "bad", "unfavorable", "unfavourable", "dismal", "grim", "guarded"})),
    (frozenset({"benign"}), frozenset({"malignant"})),
    (frozenset({"positive"}), frozenset({"negative"})),
    (frozenset({"present", "seen", "identified", "observed", "evident"}), frozenset({"absent"})),
    (frozenset({"high", "higher"}), frozenset({"low", "lower"})),
)

YES_WORDS = frozenset("yes yeah yep correct indeed absolutely certainly definitely true affirmative right".split())
NO_WORDS = frozenset("no nope incorrect false not neither none".split())
_AUX = ("is", "are", "was", "were", "do", "does", "did", "can", "could", "has", "have", "had", "will", "would",
        "should", "may", "might", "must", "shall")
_POLAR_CLAUSE = re.compile(r"(?:^|[,;:]\s+|[.!?]\s+)(?:" + "|".join(_AUX) + r")\b[^,;:.!?]*\?\s*$", re.IGNORECASE)
_ALTERNATIVE = re.compile(r"\b([a-z]+)\s+or\s+([a-z]+)\s*\?\s*$", re.IGNORECASE)
_COPULA_QUESTION = re.compile(r"\b(?:is|are|was|were)\s+(?:the\s+|this\s+|these\s+)?([a-z][\w\-]*(?:\s+[a-z][\w\-]*){0,3}?)\s+([a-z]+)\s*\?\s*$",
                              re.IGNORECASE)
_REQUEST = re.compile(r"\b(?:can|could|would|will)\s+you\s+(?:please\s+)?(?:describe|provide|tell|explain|give|identify|list|"
                      r"summari[sz]e|characteri[sz]e|outline|elaborate|comment|detail|specify|determine|assess|"
                      r"evaluate|discuss|share|offer|report|state|indicate|suggest|interpret|analy[sz]e|classify|name)\b", re.IGNORECASE)
_NO_OPENING = re.compile(r"^(?:there\s+(?:is|are|was|were)\s+no\b|no\s+evidence\b|no\s+signs?\b)")


def _clean(text: str | None) -> str:
    t = unicodedata.normalize("NFKC", str(text or ""))
    t = t.replace("\u2019", "'").replace("\u2018", "'")
    t = re.sub(r"[*_`#]+", " ", t)
    return re.sub(r"\s+", " ", t).strip()


def _side(word: str) -> tuple[int, int] | None:
    """(axis index, side 0/1) of a word in :data:`AXES`, or None."""
    w = word.lower()
    for i, (a, b) in enumerate(AXES):
        if w in a:
            return i, 0
        if w in b:
            return i, 1
    return None


@functools.lru_cache(maxsize=1 << 16)
def question_form(question: str | None) -> tuple[str, tuple[str, str] | None] | None:
    """``("alternative", (x, y))`` for "… X or Y?" on one axis, ``("polar", None)`` for a yes/no
    question, ``None`` for any other question."""
    q = _clean(question)
    if not q.endswith("?"):
        return None
    alt = _ALTERNATIVE.search(q)
    if alt:
        x, y = alt.group(1).lower(), alt.group(2).lower()
        sx, sy = _side(x), _side(y)
        if sx and sy and sx[0] == sy[0] and sx[1] != sy[1]:
            return "alternative", (x, y)
    clause = _POLAR_CLAUSE.search(q)
    if clause and not _REQUEST.search(clause.group(0)):
        return "polar", None
    return None


def _first_sentence(text: str) -> str:
    m = re.match(r"(.+?[.!?;])(?:\s|$)", text)
    return (m.group(1) if m else text).strip()


def _restated(question: str, sentence: str) -> str | None:
    """Rule 3: "is the X ADJ?" answered "X is … ADJ2" → yes/no, else None."""
    m = _COPULA_QUESTION.search(question)
    if not m:
        return None
    subject_last = m.group(1).split()[-1].lower()
    adjective = m.group(2).lower()
    asked = _side(adjective)
    if asked is None:
        return None
    s = re.search(rf"\b{re.escape(subject_last)}\s+(?:is|are|was|were|appears|appear|seems|seem|remains|remain)\s+"
                  r"((?:not\s+)?(?:[a-z]+ly\s+|very\s+|quite\s+|rather\s+|not\s+)*)([a-z]+)\b", sentence.lower())
    if not s:
        return None
    said = _side(s.group(2))
    if said is None or said[0] != asked[0]:
        return None
    same = said[1] == asked[1]
    if re.search(r"\bnot\b", s.group(1)):
        same = not same
    return "yes" if same else "no"


@functools.lru_cache(maxsize=1 << 16)
def binary_label(question: str | None, answer: str | None) -> str | None:
    """The binary label an answer in prose states for ``question`` (see the module docstring):
    ``"yes"``/``"no"`` for a polar question, the question's own word ("good"/"poor") for an
    alternative one, ``None`` when the answer does not say it plainly or the question is neither."""
    form = question_form(question)
    text = _clean(answer)
    if form is None or not text:
        return None
    sentence = _first_sentence(text)
    low = sentence.lower()
    if form[0] == "alternative":
        x, y = form[1]
        axis = _side(x)[0]
        found = set()
        for m in re.finditer(r"[a-z]+", low):
            side = _side(m.group(0))
            if side is None or side[0] != axis:
                continue
            before = low[max(0, m.start() - 12):m.start()]
            if re.search(r"\bnot\s+(?:[a-z]+\s+)?$", before):
                return None
            found.add(side[1])
        if len(found) != 1:
            return None
        side = found.pop()
        return x if _side(x)[1] == side else y
    first = re.match(r"[^\w]*([a-z]+)\b", low)
    if first and first.group(1) in YES_WORDS:
        return "yes"
    if first and first.group(1) in NO_WORDS:
        return "no"
    if _NO_OPENING.match(low):
        return "no"
    return _restated(_clean(question), sentence)
