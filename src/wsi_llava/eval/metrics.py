"""Scores for prediction rows: closed-ended accuracy, BLEU-1…4, ROUGE-1/2/L, METEOR, bootstrap CIs.

Input rows are the objects ``predict`` writes (one per JSONL line)::

    {"key", "slide_id", "question", "reference", "prediction", "choices", "kind", "category",
     "dataset", "row"}

Row classes:

* ``kind == "mc"``: closed; ``reference`` is the gold letter (or the option text), ``choices`` the
  options (or, if null, parsed from ``A) … B) …`` in the question). Scored by
  :func:`~wsi_llava.eval.extract.extract_choice`.
* ``kind == "vqa"`` whose reference is exactly Yes/No (any case): closed yes/no, scored by
  :func:`~wsi_llava.eval.extract.extract_yes_no`.
* every other ``vqa`` row and every ``report`` row: open-ended, scored by n-gram metrics.

Closed answers that cannot be parsed count as wrong and are listed under ``"unparsed"``.

Metric definitions (all reported on a 0–1 scale):

* ``bleu_n`` — sacrebleu *corpus* BLEU with ``tokenize="13a"``, ``max_ngram_order=n``, sacrebleu's
  default ``exp`` smoothing and case kept: ``BP · exp(Σ_{k=1..n} (1/n) · log p_k)``, i.e. uniform
  weights 1/n over the 1…n-gram precisions (BLEU-1 = BP·p1, BLEU-4 = BP·(p1 p2 p3 p4)^(1/4)), BP the
  corpus brevity penalty. Computed from per-item sufficient statistics, so resampling is exact.
* ``rouge_1``/``rouge_2``/``rouge_l`` — mean over items of rouge-score's F-measure with Porter
  stemming (``RougeScorer([...], use_stemmer=True)``; its tokenizer lowercases and drops punctuation).
* ``meteor`` — mean over items of ``nltk.translate.meteor_score.meteor_score`` (alpha 0.9, beta 3,
  gamma 0.5) on lowercased word/punctuation tokens, with WordNet synonyms when WordNet is available
  offline (see :func:`load_wordnet`); ``meteor_synonyms`` says whether it was.
* CIs — percentile bootstrap (default 1000 resamples, 95 %) over items, seeded; corpus BLEU is
  recomputed on each resample. Accuracies also get exact intervals (``*_wilson``,
  ``*_clopper_pearson``; :mod:`wsi_llava.eval.stats`).
* ``binary_text_accuracy`` — open items whose question is yes/no (or "good or poor") and whose gold
  answer states it in a sentence (:mod:`wsi_llava.eval.polar`): the share whose prediction states the
  same label; gold answers that cannot be read are left out and counted (``n_binary_text_gold_unparsed``),
  predictions that cannot be read count wrong and are counted (``n_binary_text_unparsed``).
* ``baselines`` — the blind baselines of the same questions and the model's margin over the best
  one (:mod:`wsi_llava.eval.baselines`).
"""

from __future__ import annotations

import functools
import hashlib
import io
import math
import os
import re
import warnings
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

from ..data.choices import ChoiceError, match_choice
from ..errors import WsiLlavaError
from .extract import extract_choice, extract_yes_no, option_texts, parse_inline_options, yes_no_label
from .stats import proportion_intervals

KINDS = ("mc", "vqa", "report")
HEADLINE = (
    "closed_accuracy", "mc_accuracy", "yes_no_accuracy",
    "bleu_1", "bleu_2", "bleu_3", "bleu_4", "rouge_1", "rouge_2", "rouge_l", "meteor",
)
#: Which item count goes with each headline metric.
COUNT_OF = {
    "closed_accuracy": "n_closed", "mc_accuracy": "n_mc", "yes_no_accuracy": "n_yes_no",
    **{m: "n_open" for m in ("bleu_1", "bleu_2", "bleu_3", "bleu_4", "rouge_1", "rouge_2", "rouge_l", "meteor")},
}
MAX_BLEU_ORDER = 4


class EvalInputError(WsiLlavaError, ValueError):
    """A prediction row cannot be scored (the message names the source, line/row and field)."""


@dataclass(frozen=True)
class Item:
    """One validated prediction row.

    ``kind`` here is the scoring class: ``"mc"``, ``"yes_no"`` or ``"open"``.
    """

    key: str
    row: int | None
    slide_id: str
    question: str
    kind: str
    prediction: str
    reference: str
    choices: tuple[str, ...] | None = None
    category: str | None = None
    dataset: str | None = None


@dataclass
class EvalConfig:
    """Settings of one evaluation."""

    bootstrap: int = 1000
    """Bootstrap resamples for the CIs; 0 disables CIs (``*_ci`` keys are then null)."""
    seed: int = 0
    """Seed of the bootstrap (the same seed gives identical CIs)."""
    confidence: float = 0.95
    """Two-sided coverage of the percentile interval."""
    bleu_tokenize: str = "13a"
    """sacrebleu tokenizer."""
    bleu_lowercase: bool = False
    """Lowercase before BLEU (sacrebleu ``lowercase``); case is kept by default, as sacrebleu does."""
    wordnet_dir: str | None = None
    """A Princeton WordNet 3.0 database directory for METEOR synonyms; None = search (see load_wordnet)."""
    groups: tuple[str, ...] = field(default=("category", "dataset", "group"))
    """Row fields to break the metrics down by (a ``by_<field>`` entry each, when any row has one);
    ``group`` is the benchmark group of the category (WSI-Bench morphology / diagnosis / treatment)."""


# --------------------------------------------------------------------------------------------------
# Input validation


def _where(row: Mapping, index: int, source: str) -> str:
    if "_line" in row:
        return f"{source}, line {row['_line']}"
    return f"{source}, item {index} (row {row.get('row')!r}, key {row.get('key')!r})"


def _text_field(row: Mapping, name: str, where: str, *, required: bool = True) -> str:
    value = row.get(name)
    if value is None:
        if required:
            raise EvalInputError(f"{where}: field {name!r} is missing")
        return ""
    if not isinstance(value, str):
        raise EvalInputError(f"{where}: field {name!r} must be a string, got {type(value).__name__}")
    return value


def _optional_label(row: Mapping, name: str) -> str | None:
    value = row.get(name)
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return None
    value = str(value).strip()
    return value or None


def prepare_items(rows: Sequence[Mapping], source: str = "predictions") -> list[Item]:
    """Validate prediction rows and classify each as ``mc``, ``yes_no`` or ``open``.

    Raises :class:`EvalInputError` naming the source, line (or item) and field of the first bad row.
    """
    items = []
    for i, row in enumerate(rows):
        if not isinstance(row, Mapping):
            raise EvalInputError(f"{source}, item {i}: expected an object, got {type(row).__name__}")
        where = _where(row, i, source)
        kind = row.get("kind")
        if kind not in KINDS:
            raise EvalInputError(f"{where}: field 'kind' must be one of {list(KINDS)}, got {kind!r}")
        prediction = _text_field(row, "prediction", where)
        reference = _text_field(row, "reference", where)
        question = _text_field(row, "question", where, required=False)
        if not reference.strip():
            raise EvalInputError(f"{where}: field 'reference' is empty")
        choices = row.get("choices")
        if choices is not None:
            if not isinstance(choices, (list, tuple)) or not all(isinstance(c, str) for c in choices):
                raise EvalInputError(f"{where}: field 'choices' must be a list of strings or null")
            choices = tuple(option_texts(choices))
        if kind == "mc":
            if not choices:
                parsed = parse_inline_options(question)
                if parsed is None:
                    raise EvalInputError(
                        f"{where}: field 'choices' is empty and the question has no inline 'A) … B) …' options"
                    )
                choices = tuple(parsed[1])
            if len(choices) < 2:
                raise EvalInputError(f"{where}: field 'choices' needs at least two options, got {list(choices)}")
            try:
                gold = match_choice(reference, choices)
            except ChoiceError as e:
                raise EvalInputError(
                    f"{where}: field 'reference': {reference!r} gives no single option: {e} (options {list(choices)})"
                ) from None
            scoring, reference = "mc", gold
        elif kind == "vqa" and yes_no_label(reference) is not None:
            scoring, reference = "yes_no", yes_no_label(reference)
        else:
            scoring = "open"
        key = row.get("key")
        items.append(
            Item(
                key=str(key) if key is not None else f"item-{i}",
                row=row.get("row") if isinstance(row.get("row"), int) else None,
                slide_id=str(row.get("slide_id") or ""),
                question=question,
                kind=scoring,
                prediction=prediction,
                reference=reference,
                choices=choices,
                category=_optional_label(row, "category"),
                dataset=_optional_label(row, "dataset"),
            )
        )
    return items


# --------------------------------------------------------------------------------------------------
# Closed-ended


def closed_answer(item: Item) -> str | None:
    """The letter / yes-no the prediction gives (``None`` = unparseable)."""
    if item.kind == "mc":
        return extract_choice(item.prediction, item.choices or ())
    if item.kind == "yes_no":
        label = extract_yes_no(item.prediction)
        if label is None:  # "The prognosis is generally poor." to "is the prognosis poor?"
            from .polar import binary_label

            label = binary_label(item.question, item.prediction)
        return label if label in ("yes", "no") else None
    raise ValueError(f"item {item.key!r} is open-ended, not closed")


# --------------------------------------------------------------------------------------------------
# BLEU from sufficient statistics


def bleu_statistics(
    hypotheses: Sequence[str], references: Sequence[str], *, tokenize: str = "13a", lowercase: bool = False
) -> np.ndarray:
    """Per-item BLEU sufficient statistics ``[n, 2 + 2·4]``: sys_len, ref_len, correct_1..4, total_1..4.

    Summed over any subset of items (with multiplicity), they give that subset's corpus BLEU exactly.
    """
    from sacrebleu.metrics import BLEU

    if len(hypotheses) != len(references):
        raise ValueError(f"{len(hypotheses)} hypotheses but {len(references)} references")
    scorer = BLEU(tokenize=tokenize, lowercase=lowercase, max_ngram_order=MAX_BLEU_ORDER, effective_order=True)
    stats = np.zeros((len(hypotheses), 2 + 2 * MAX_BLEU_ORDER), dtype=np.int64)
    for i, (hyp, ref) in enumerate(zip(hypotheses, references)):
        s = scorer.sentence_score(hyp, [ref])
        stats[i, 0], stats[i, 1] = s.sys_len, s.ref_len
        stats[i, 2:2 + MAX_BLEU_ORDER] = s.counts
        stats[i, 2 + MAX_BLEU_ORDER:] = s.totals
    return stats


def bleu_from_statistics(summed: np.ndarray, order: int) -> float:
    """Corpus BLEU-``order`` (0–1) from summed statistics (sacrebleu's ``exp`` smoothing)."""
    from sacrebleu.metrics import BLEU

    correct = [int(x) for x in summed[2:2 + order]]
    total = [int(x) for x in summed[2 + MAX_BLEU_ORDER:2 + MAX_BLEU_ORDER + order]]
    score = BLEU.compute_bleu(
        correct, total, int(summed[0]), int(summed[1]), smooth_method="exp", max_ngram_order=order
    )
    return score.score / 100.0


# --------------------------------------------------------------------------------------------------
# ROUGE and METEOR


def rouge_scores(hypotheses: Sequence[str], references: Sequence[str]) -> dict[str, np.ndarray]:
    """Per-item ROUGE-1/2/L F-measures (rouge-score, Porter stemming): ``{"rouge_1": [n], …}``."""
    from rouge_score import rouge_scorer

    scorer = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL"], use_stemmer=True)
    out = {name: np.zeros(len(hypotheses)) for name in ("rouge_1", "rouge_2", "rouge_l")}
    for i, (hyp, ref) in enumerate(zip(hypotheses, references)):
        s = scorer.score(ref, hyp)  # (target, prediction)
        out["rouge_1"][i] = s["rouge1"].fmeasure
        out["rouge_2"][i] = s["rouge2"].fmeasure
        out["rouge_l"][i] = s["rougeL"].fmeasure
    return out


_TOKEN = re.compile(r"\w+(?:[-']\w+)*|[^\w\s]")


def meteor_tokens(text: str) -> list[str]:
    """Lowercased word / punctuation tokens (METEOR needs pre-tokenised text; no punkt download)."""
    return _TOKEN.findall(text.lower())


#: The 45 WordNet 3.0 lexicographer file names (``lexnames`` of the Princeton database, see
#: lexnames(5WN)); Debian's ``wordnet-base`` does not ship that small file, nltk's reader needs it.
LEXNAMES = (
    "adj.all adj.pert adv.all noun.Tops noun.act noun.animal noun.artifact noun.attribute noun.body "
    "noun.cognition noun.communication noun.event noun.feeling noun.food noun.group noun.location "
    "noun.motive noun.object noun.person noun.phenomenon noun.plant noun.possession noun.process "
    "noun.quantity noun.relation noun.shape noun.state noun.substance noun.time verb.body verb.change "
    "verb.cognition verb.communication verb.competition verb.consumption verb.contact verb.creation "
    "verb.emotion verb.motion verb.perception verb.possession verb.social verb.stative verb.weather adj.ppl"
).split()
_POS_NUMBER = {"noun": 1, "verb": 2, "adj": 3, "adv": 4}
#: Where Debian/Ubuntu's ``wordnet-base`` package puts the WordNet 3.0 database.
SYSTEM_WORDNET_DIRS = ("/usr/share/wordnet",)
WORDNET_ENV = "WSI_LLAVA_WORDNET_DIR"
_WORDNET_FILES = ("data.noun", "index.noun", "data.verb", "index.verb", "data.adj", "data.adv", "noun.exc")


class _NoSynonyms:
    """Stands in for WordNet when it is unavailable: METEOR then matches exact words and stems only."""

    def synsets(self, word, *args, **kwargs):
        return []


@dataclass(frozen=True)
class WordNet:
    """A WordNet reader for METEOR and where it came from."""

    reader: object
    """Object with ``synsets(word)`` (an nltk WordNetCorpusReader, or a no-synonym stand-in)."""
    available: bool
    """True when synonyms are used."""
    source: str
    """Human-readable origin (directory, or why none was found)."""


def _princeton_reader(directory: str):
    """nltk's WordNet reader over a plain Princeton WordNet 3.0 directory (e.g. Debian's wordnet-base)."""
    import nltk
    from nltk.corpus.reader.wordnet import WordNetCorpusReader

    class PrincetonDirWordNet(WordNetCorpusReader):
        """Reads a Princeton database directory: supplies ``lexnames`` when absent, and skips nltk's
        mapping to its own "wordnet" corpus (this directory *is* WordNet 3.0; nothing to map)."""

        def open(self, file):
            if file == "lexnames" and not os.path.exists(os.path.join(directory, "lexnames")):
                lines = [f"{i:02d}\t{name}\t{_POS_NUMBER[name.split('.')[0]]}\n" for i, name in enumerate(LEXNAMES)]
                return io.StringIO("".join(lines))
            return super().open(file)

        def map_wn(self, version="wordnet"):
            return None

    real = os.path.realpath(directory)
    if real not in nltk.data.path:
        nltk.data.path.append(real)  # nltk only reads corpora under its data path
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "multilingual functions are not available" (no OMW; not needed)
        return PrincetonDirWordNet(real, None)


@functools.lru_cache(maxsize=None)
def load_wordnet(directory: str | None = None) -> WordNet:
    """Find WordNet offline (never downloads). Order:

    1. ``directory`` or ``$WSI_LLAVA_WORDNET_DIR`` (a Princeton WordNet 3.0 database directory);
       given but unusable → ``FileNotFoundError``;
    2. nltk's own ``corpora/wordnet`` if it is already on ``nltk.data.path``;
    3. ``/usr/share/wordnet`` (Debian/Ubuntu: ``apt-get install wordnet-base``).

    None found → a stand-in without synonyms (``available=False``).
    """
    explicit = directory or os.environ.get(WORDNET_ENV)
    if explicit:
        missing = [f for f in _WORDNET_FILES if not os.path.exists(os.path.join(explicit, f))]
        if missing:
            raise FileNotFoundError(f"WordNet directory {explicit}: missing {missing}")
        return WordNet(_princeton_reader(explicit), True, f"{os.path.realpath(explicit)} (WordNet 3.0)")
    try:
        import nltk

        nltk.data.find("corpora/wordnet")
        from nltk.corpus import wordnet

        wordnet.ensure_loaded()
        return WordNet(wordnet, True, "nltk_data corpora/wordnet")
    except LookupError:
        pass
    for candidate in SYSTEM_WORDNET_DIRS:
        if all(os.path.exists(os.path.join(candidate, f)) for f in _WORDNET_FILES):
            return WordNet(_princeton_reader(candidate), True, f"{candidate} (WordNet 3.0, Debian wordnet-base)")
    return WordNet(
        _NoSynonyms(), False,
        "none found (install Debian 'wordnet-base' or set WSI_LLAVA_WORDNET_DIR); METEOR without synonyms",
    )


def meteor_scores(hypotheses: Sequence[str], references: Sequence[str], wordnet: WordNet | None = None) -> np.ndarray:
    """Per-item METEOR (nltk) on :func:`meteor_tokens`; synonyms from ``wordnet`` (default: :func:`load_wordnet`)."""
    from nltk.translate.meteor_score import meteor_score

    wn = wordnet or load_wordnet()
    return np.array(
        [
            meteor_score([meteor_tokens(ref)], meteor_tokens(hyp), wordnet=wn.reader)
            for hyp, ref in zip(hypotheses, references)
        ],
        dtype=np.float64,
    )


# --------------------------------------------------------------------------------------------------
# Bootstrap


def stable_seed(*parts: object) -> int:
    """A 32-bit integer from strings/ints (md5; never Python's salted ``hash()``)."""
    digest = hashlib.md5("\x1f".join(str(p) for p in parts).encode("utf-8")).digest()
    return int.from_bytes(digest[:4], "big")


def resample_counts(n: int, bootstrap: int, rng: np.random.Generator, block: int = 256) -> Iterator[np.ndarray]:
    """Bootstrap resamples of ``n`` items as multiplicity counts, in blocks ``[b, n]`` (rows sum to n)."""
    for start in range(0, bootstrap, block):
        b = min(block, bootstrap - start)
        idx = rng.integers(0, n, size=(b, n))
        flat = (idx + (np.arange(b) * n)[:, None]).ravel()
        yield np.bincount(flat, minlength=b * n).reshape(b, n).astype(np.float64)


def percentile_interval(values: np.ndarray, confidence: float) -> list[float]:
    """The percentile interval ``[lo, hi]`` of bootstrap values."""
    tail = (1.0 - confidence) / 2.0 * 100.0
    lo, hi = np.percentile(values, [tail, 100.0 - tail])
    return [float(lo), float(hi)]


def mean_with_ci(values: np.ndarray, config: EvalConfig, rng: np.random.Generator) -> tuple[float, list[float] | None]:
    """Mean of per-item values and its percentile-bootstrap interval (None when bootstrap is 0)."""
    n = len(values)
    point = float(values.mean())
    if config.bootstrap <= 0:
        return point, None
    boots = np.concatenate([w @ values / n for w in resample_counts(n, config.bootstrap, rng)])
    return point, percentile_interval(boots, config.confidence)


def bleu_from_statistics_batch(summed: np.ndarray, order: int) -> np.ndarray:
    """Vectorised :func:`bleu_from_statistics` over rows of ``summed`` ``[b, 10]`` → ``[b]`` (0–1).

    Same arithmetic as sacrebleu's ``compute_bleu`` with ``exp`` smoothing: an order with no match
    gets precision ``1 / (2^z · total)`` (z = zero-match orders so far); an order with no n-grams at
    all, or no match at any order, gives 0.
    """
    summed = np.asarray(summed, dtype=np.float64)
    sys_len, ref_len = summed[:, 0], summed[:, 1]
    correct = summed[:, 2:2 + order]
    total = summed[:, 2 + MAX_BLEU_ORDER:2 + MAX_BLEU_ORDER + order]
    zero = correct == 0
    halvings = np.cumsum(zero, axis=1)
    with np.errstate(divide="ignore", invalid="ignore"):
        prec = np.where(zero, 1.0 / (np.power(2.0, halvings) * total), correct / total)
        log_mean = np.log(prec).mean(axis=1)
        bp = np.where(sys_len >= ref_len, 1.0, np.exp(1.0 - ref_len / sys_len))
        bp = np.where(sys_len > 0, bp, 0.0)
        score = bp * np.exp(log_mean)
    dead = (total == 0).any(axis=1) | ~(correct > 0).any(axis=1)
    return np.where(dead, 0.0, score)


def _bleu_with_ci(stats: np.ndarray, config: EvalConfig, rng: np.random.Generator) -> dict[str, object]:
    out: dict[str, object] = {}
    total = stats.sum(axis=0)
    for n in range(1, MAX_BLEU_ORDER + 1):
        out[f"bleu_{n}"] = bleu_from_statistics(total, n)
    if config.bootstrap <= 0:
        out.update({f"bleu_{n}_ci": None for n in range(1, MAX_BLEU_ORDER + 1)})
        return out
    sums = np.concatenate([w @ stats for w in resample_counts(len(stats), config.bootstrap, rng)])
    for n in range(1, MAX_BLEU_ORDER + 1):
        out[f"bleu_{n}_ci"] = percentile_interval(bleu_from_statistics_batch(sums, n), config.confidence)
    return out


# --------------------------------------------------------------------------------------------------
# Scoring


@dataclass
class ItemScores:
    """Per-item scores for a list of items (NaN where a score does not apply to the item's kind)."""

    correct: np.ndarray
    """[n] 1.0/0.0 for closed items."""
    parsed: list[str | None]
    """Extracted answer per item (None for open items and unparseable closed ones)."""
    bleu_stats: np.ndarray
    """[n, 10] BLEU statistics (zeros for closed items)."""
    open_scores: dict[str, np.ndarray]
    """rouge_1, rouge_2, rouge_l, meteor: [n] each."""
    binary: list[tuple[str | None, str | None] | None] = field(default_factory=list)
    """Open items with a yes/no (or "X or Y") question: (label of the gold answer, label of the
    prediction), None where unreadable; None for other items."""


def score_items(items: Sequence[Item], config: EvalConfig, wordnet: WordNet | None = None) -> ItemScores:
    """Compute every per-item score once; groups and bootstrap only re-aggregate these."""
    n = len(items)
    correct = np.full(n, np.nan)
    parsed: list[str | None] = [None] * n
    for i, it in enumerate(items):
        if it.kind != "open":
            parsed[i] = closed_answer(it)
            correct[i] = float(parsed[i] is not None and parsed[i] == it.reference)
    open_idx = [i for i, it in enumerate(items) if it.kind == "open"]
    hyps = [items[i].prediction for i in open_idx]
    refs = [items[i].reference for i in open_idx]
    bleu = np.zeros((n, 2 + 2 * MAX_BLEU_ORDER), dtype=np.int64)
    open_scores = {k: np.full(n, np.nan) for k in ("rouge_1", "rouge_2", "rouge_l", "meteor")}
    if open_idx:
        bleu[open_idx] = bleu_statistics(hyps, refs, tokenize=config.bleu_tokenize, lowercase=config.bleu_lowercase)
        for name, values in rouge_scores(hyps, refs).items():
            open_scores[name][open_idx] = values
        open_scores["meteor"][open_idx] = meteor_scores(hyps, refs, wordnet)
    return ItemScores(correct, parsed, bleu, open_scores, binary_scores(items))


def binary_scores(items: Sequence[Item]) -> list[tuple[str | None, str | None] | None]:
    """Per item: (gold label, predicted label) for open items whose question is binary, else None."""
    from .polar import binary_label, question_form

    out: list[tuple[str | None, str | None] | None] = []
    for it in items:
        if it.kind == "open" and question_form(it.question) is not None:
            out.append((binary_label(it.question, it.reference), binary_label(it.question, it.prediction)))
        else:
            out.append(None)
    return out


def summarise(
    items: Sequence[Item], scores: ItemScores, index: Sequence[int], config: EvalConfig, label: str
) -> dict[str, object]:
    """Headline numbers, CIs and counts for the items at ``index`` (``label`` seeds the bootstrap)."""
    idx = np.asarray(index, dtype=np.int64)
    kinds = np.array([items[i].kind for i in idx], dtype=object)
    out: dict[str, object] = {"n_items": int(len(idx))}

    def rng(part: str) -> np.random.Generator:
        return np.random.default_rng(stable_seed(config.seed, label, part))

    for name, mask in (
        ("closed_accuracy", kinds != "open"), ("mc_accuracy", kinds == "mc"), ("yes_no_accuracy", kinds == "yes_no"),
    ):
        sel = idx[mask]
        out[COUNT_OF[name]] = int(len(sel))
        if len(sel):
            out[name], out[f"{name}_ci"] = mean_with_ci(scores.correct[sel], config, rng(name))
            exact = proportion_intervals(scores.correct[sel], config.confidence)
            out[f"{name}_wilson"], out[f"{name}_clopper_pearson"] = exact["wilson"], exact["clopper_pearson"]
        else:
            out[name], out[f"{name}_ci"] = None, None
            out[f"{name}_wilson"], out[f"{name}_clopper_pearson"] = None, None
    closed_sel = idx[kinds != "open"]
    out["n_unparsed"] = int(sum(scores.parsed[i] is None for i in closed_sel))
    out.update(_binary_summary([scores.binary[i] for i in idx] if scores.binary else [], config))

    open_sel = idx[kinds == "open"]
    out["n_open"] = int(len(open_sel))
    if len(open_sel):
        out.update(_bleu_with_ci(scores.bleu_stats[open_sel], config, rng("bleu")))
        for name in ("rouge_1", "rouge_2", "rouge_l", "meteor"):
            out[name], out[f"{name}_ci"] = mean_with_ci(scores.open_scores[name][open_sel], config, rng(name))
    else:
        for name in ("bleu_1", "bleu_2", "bleu_3", "bleu_4", "rouge_1", "rouge_2", "rouge_l", "meteor"):
            out[name], out[f"{name}_ci"] = None, None
    return out


def _binary_summary(pairs: Sequence[tuple[str | None, str | None] | None], config: EvalConfig) -> dict[str, object]:
    """``binary_text_accuracy`` and its counts over (gold label, predicted label) pairs."""
    pairs = [p for p in pairs if p is not None]
    scored = [p for p in pairs if p[0] is not None]
    out: dict[str, object] = {
        "n_binary_text": len(scored), "n_binary_text_gold_unparsed": len(pairs) - len(scored),
        "n_binary_text_unparsed": sum(p[1] is None for p in scored),
    }
    if scored:
        right = np.array([float(g == p) for g, p in scored])
        out["binary_text_accuracy"] = float(right.mean())
        out["binary_text_accuracy_wilson"] = proportion_intervals(right, config.confidence)["wilson"]
    else:
        out["binary_text_accuracy"], out["binary_text_accuracy_wilson"] = None, None
    return out


def _unparsed_entries(items: Sequence[Item], scores: ItemScores) -> list[dict[str, object]]:
    out = []
    for it, parsed in zip(items, scores.parsed):
        if it.kind != "open" and parsed is None:
            out.append(
                {
                    "key": it.key, "row": it.row, "slide_id": it.slide_id, "kind": it.kind,
                    "category": it.category, "reference": it.reference,
                    "choices": list(it.choices) if it.choices else None, "prediction": it.prediction,
                }
            )
    return out


def evaluate_items(items: Sequence[Item], config: EvalConfig | None = None) -> dict[str, object]:
    """Metrics for validated items: headline numbers with CIs, breakdowns, unparsed list, settings."""
    return evaluate_items_with_scores(items, config)[0]


def evaluate_items_with_scores(items: Sequence[Item], config: EvalConfig | None = None) -> tuple[dict[str, object], ItemScores]:
    """:func:`evaluate_items` and the per-item scores (for paired tests between runs)."""
    config = config or EvalConfig()
    wordnet = load_wordnet(config.wordnet_dir)
    scores = score_items(items, config, wordnet if any(it.kind == "open" for it in items) else None)
    result = aggregate(items, scores, config)
    result["meteor_synonyms"] = wordnet.available
    result["settings"] = settings_dict(config, wordnet)
    return result, scores


def aggregate(items: Sequence[Item], scores: ItemScores, config: EvalConfig) -> dict[str, object]:
    """Overall and per-group numbers with CIs, plus the unparsed list, from per-item scores."""
    from .baselines import baselines_with_model, group_of

    result: dict[str, object] = summarise(items, scores, range(len(items)), config, "__all__")
    for group in config.groups:
        labels = [group_of(it.category) if group == "group" else getattr(it, group) for it in items]
        if not any(label is not None for label in labels):
            continue
        members: dict[str, list[int]] = {}
        for i, label in enumerate(labels):
            members.setdefault(label if label is not None else "(none)", []).append(i)
        result[f"by_{group}"] = {
            name: summarise(items, scores, members[name], config, f"{group}={name}") for name in sorted(members)
        }
    result["unparsed"] = _unparsed_entries(items, scores)
    if any(it.kind != "open" for it in items) or any(b is not None for b in scores.binary):
        result["baselines"] = baselines_with_model(items, scores.correct, bootstrap=config.bootstrap,
                                                   confidence=config.confidence, seed=config.seed)
    return result


def settings_dict(config: EvalConfig, wordnet: WordNet) -> dict[str, object]:
    """What the numbers depend on (recorded in metrics.json)."""
    import nltk
    import rouge_score
    import sacrebleu

    return {
        "bootstrap": config.bootstrap,
        "seed": config.seed,
        "confidence": config.confidence,
        "bleu": f"sacrebleu {sacrebleu.__version__} corpus BLEU, tokenize={config.bleu_tokenize}, "
        f"lowercase={config.bleu_lowercase}, smooth=exp, weights 1/n over 1..n-grams",
        "rouge": f"rouge-score {getattr(rouge_score, '__version__', '0.1.2')} F-measure, use_stemmer=True",
        "meteor": f"nltk {nltk.__version__} meteor_score (alpha 0.9, beta 3, gamma 0.5), "
        f"synonyms={'yes' if wordnet.available else 'no'}",
        "wordnet": wordnet.source,
        "scale": "all metrics on 0-1",
    }


def evaluate_predictions(
    rows: Sequence[Mapping], *, bootstrap: int = 1000, seed: int = 0, config: EvalConfig | None = None,
    source: str = "predictions",
) -> dict[str, object]:
    """Score prediction rows (dicts as ``predict`` writes them) → the ``metrics.json`` dict.

    Keys: ``n_items``, ``closed_accuracy`` (+ ``_ci``, ``n_closed``), ``mc_accuracy``, ``yes_no_accuracy``,
    ``n_unparsed``, ``bleu_1``…``bleu_4``, ``rouge_1``, ``rouge_2``, ``rouge_l``, ``meteor`` (each with
    ``_ci``; ``n_open``), ``by_category`` / ``by_dataset`` (same keys per group), ``unparsed`` (list),
    ``meteor_synonyms``, ``settings``. Metrics with no items are ``None``.
    """
    if config is None:
        config = EvalConfig(bootstrap=bootstrap, seed=seed)
    items = prepare_items(rows, source)
    return evaluate_items(items, config)


def compare_metrics(base: Mapping[str, object], other: Mapping[str, object]) -> dict[str, float | None]:
    """Per headline metric, ``other − base`` (e.g. zeroed-slide run minus normal run); None where absent."""
    out: dict[str, float | None] = {}
    for name in HEADLINE:
        a, b = base.get(name), other.get(name)
        out[name] = None if a is None or b is None else float(b) - float(a)
    return out
