"""WordNet for METEOR's synonym matches, found offline (never downloaded).

:func:`load_wordnet` looks in ``$WSI_LLAVA_WORDNET_DIR`` (or a given directory), nltk's own data
path, then Debian's ``wordnet-base`` (``/usr/share/wordnet``); a plain Princeton WordNet 3.0 directory
is read through a small subclass of nltk's public ``WordNetCorpusReader``. None found: a stand-in
without synonyms, and the report says so.
"""

from __future__ import annotations

import functools
import io
import os
import warnings
from dataclasses import dataclass

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
