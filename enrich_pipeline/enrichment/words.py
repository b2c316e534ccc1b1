"""How caption text splits into words, in scripts with spaces and without.

Latin, Cyrillic, Greek, Hangul and most scripts separate words with spaces or punctuation: a
word is a run of letters and digits. Han, kana and bopomofo do not, and no word list ships
here, so their text is cut into characters (the tag rules match keywords as character
phrases) or into overlapping character pairs (the hashed embedding: the bigram indexing of
Lucene's CJKAnalyzer / CJKBigramFilter). A run of one script never swallows the other: "T恤"
is "t" and "恤", not one word.
"""

from __future__ import annotations

import re

# A language code as BCP 47 writes it: "en", "zh", "zh-Hant", "pt-BR" (ENRICH_CAPTION_LANGUAGES,
# and the languages of the tag vocabulary's words).
LANGUAGE_CODE = re.compile(r"[a-z]{2,3}(-[A-Za-z0-9]{2,8})*")

# Hiragana and katakana, bopomofo, CJK extension A, unified ideographs, compatibility
# ideographs.
UNSPACED = "\u3040-\u30ff\u3100-\u312f\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff"

_CHARACTERS_AND_WORDS = re.compile(rf"[{UNSPACED}]|[^\W_{UNSPACED}]+")
_RUNS = re.compile(rf"([{UNSPACED}]+)|[^\W{UNSPACED}]+")


def characters_and_words(text: str) -> list[str]:
    """Each unspaced character alone, every other word whole (no underscores)."""
    return _CHARACTERS_AND_WORDS.findall(text)


def words_and_bigrams(text: str) -> list[str]:
    """Every spaced word whole (``\\w+``, as it always was: the same terms for text without
    Han or kana), and each run of unspaced characters as its overlapping pairs, or the one
    character of a run of one."""
    terms: list[str] = []
    for match in _RUNS.finditer(text):
        run = match.group(0)
        if match.group(1) is None or len(run) == 1:
            terms.append(run)
        else:
            terms.extend(run[i : i + 2] for i in range(len(run) - 1))
    return terms
