"""False-hit guard: verify a semantic candidate before serving it.

Sentence embeddings are nearly blind to the words that flip an answer: "from savings to current"
vs "from current to savings" has cosine 0.994, "safe" vs "unsafe" 0.988, "under £50" vs "over £50"
0.958. Each check below compares one kind of such word between the cached prompt and the new
query and vetoes the hit on any disagreement. Checks are deliberately strict: a vetoed paraphrase
costs one generation, a served near-miss costs a wrong answer.
"""

from __future__ import annotations

import difflib
import re
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from specache.response_cache.guard_lexicon import ANTONYMS, STOP

if TYPE_CHECKING:
    from specache.response_cache.embed import Embedder

_TOKEN = re.compile(
    r"[£$€¥]?\d+(?:[.,]\d+)*(?:k|m|bn|%|s)?|[A-Za-z][A-Za-z0-9_]*(?:[.'’][A-Za-z0-9_]+)*\(?\)?"
)
_NUMBER = re.compile(r"(?<![A-Za-z])[£$€¥]?(\d+(?:,\d{3})*(?:\.\d+)?)(k|m|bn|s)?\b", re.IGNORECASE)
_NUMBER_WORDS = {
    "zero": 0,
    "two": 2,
    "three": 3,
    "four": 4,
    "five": 5,
    "six": 6,
    "seven": 7,
    "eight": 8,
    "nine": 9,
    "ten": 10,
    "eleven": 11,
    "twelve": 12,
    "fifteen": 15,
    "twenty": 20,
    "thirty": 30,
    "forty": 40,
    "fifty": 50,
    "hundred": 100,
    "thousand": 1000,
    "million": 1e6,
    "billion": 1e9,
    "dozen": 12,
}
_SCALE = {"k": 1e3, "m": 1e6, "bn": 1e9, "s": 1.0001}  # "1920s": a decade, not the year
_CURRENCY = {
    "£": "gbp",
    "$": "usd",
    "€": "eur",
    "¥": "jpy",
    "pounds": "gbp",
    "pound": "gbp",
    "gbp": "gbp",
    "dollars": "usd",
    "dollar": "usd",
    "usd": "usd",
    "euros": "eur",
    "euro": "eur",
    "eur": "eur",
    "yen": "jpy",
    "jpy": "jpy",
    "rupees": "inr",
    "inr": "inr",
}
_MONTHS = {
    m[:3]: m
    for m in (
        "january",
        "february",
        "march",
        "april",
        "june",
        "july",
        "august",
        "september",
        "october",
        "november",
        "december",
    )
}
_DAYS = {
    "monday",
    "tuesday",
    "wednesday",
    "thursday",
    "friday",
    "saturday",
    "sunday",
    "today",
    "tomorrow",
    "yesterday",
    "tonight",
    "weekend",
    "weekday",
    "weekdays",
}
_RELATIVE = re.compile(
    r"\b(next|last|previous|this|coming|past)\s+(week|month|year|quarter|decade|century)\b"
)
_NEGATORS = {
    "not",
    "no",
    "never",
    "none",
    "nobody",
    "nothing",
    "neither",
    "nor",
    "cannot",
    "without",
    "nowhere",
    "non",
}
_NEG_PREFIXES = ("un", "in", "im", "il", "ir", "dis", "non", "non-", "anti", "de", "mis")
_SCOPE = {
    "all": "universal",
    "every": "universal",
    "each": "distributive",
    "per": "distributive",
    "everything": "universal",
    "everyone": "universal",
    "always": "universal",
    "entire": "universal",
    "whole": "universal",
    "only": "restrictive",
    "solely": "restrictive",
    "exclusively": "restrictive",
    "except": "exclusive",
    "excluding": "exclusive",
    "besides": "exclusive",
    "some": "partial",
    "several": "partial",
    "partially": "partial",
    "sometimes": "partial",
    "few": "partial",
    "most": "majority",
    "majority": "majority",
    "mostly": "majority",
    "any": "existential",
    "either": "choice",
    "both": "both",
}
_SCOPE_PHRASES = re.compile(r"\b(other than|apart from|aside from|but not|with the exception of)\b")
_CMP_NUMBER = re.compile(
    r"\b(over|above|more than|greater than|higher than|exceeding|at least|minimum of|under|below|less than|"
    r"fewer than|lower than|at most|up to|no more than|maximum of|within|beyond|after|before|since|until)\s+"
    r"(?:the\s+)?[£$€¥]?\d",
    re.IGNORECASE,
)
_CMP_CLASS = {
    "over": "gt",
    "above": "gt",
    "more than": "gt",
    "greater than": "gt",
    "higher than": "gt",
    "exceeding": "gt",
    "at least": "gt",
    "minimum of": "gt",
    "beyond": "gt",
    "after": "after",
    "since": "after",
    "under": "lt",
    "below": "lt",
    "less than": "lt",
    "fewer than": "lt",
    "lower than": "lt",
    "at most": "lt",
    "up to": "lt",
    "no more than": "lt",
    "maximum of": "lt",
    "within": "lt",
    "before": "before",
    "until": "before",
}
_ANTONYM_SET = {frozenset(p) for p in ANTONYMS}
_ROLE_PREPS = {"from", "to", "into", "than", "onto", "towards", "toward", "versus"}
_ASYM_ROLE = {"from", "to", "into", "than", "onto", "towards", "toward"}
_SYMMETRIC = {"and", "or", "vs", "vs.", "versus", "&", "with", "between", ",", "compared", "the", "a", "an"}
_FORCED_ENTITY = re.compile(r"[A-Za-z]+\d[\w.-]*|\w+[._]\w[\w.]*(?:\(\))?|\w+\(\)")


def _tokens(text: str) -> list[str]:
    out = []
    for t in _TOKEN.findall(text):
        t = t.lower().replace("’", "'")
        out.append(t[:-2] if t.endswith("'s") else t)  # possessive: "Australia's" is "Australia"
    return out


def _lemma(word: str) -> str:
    """Very light stemming: plural -s / -es only, so 'accounts' matches 'account'."""
    if len(word) > 4 and word.endswith("ies"):
        return word[:-3] + "y"
    if len(word) > 3 and word.endswith("es") and word[-3] in "sxz":
        return word[:-2]
    if len(word) > 3 and word.endswith("s") and not word.endswith(("ss", "us", "is")):
        return word[:-1]
    return word


def _numbers(text: str) -> Counter[float]:
    out: Counter[float] = Counter()
    for m in _NUMBER.finditer(text):
        value = float(m.group(1).replace(",", ""))
        out[value * _SCALE.get((m.group(2) or "").lower(), 1.0)] += 1
    for tok in _tokens(text):
        if tok in _NUMBER_WORDS:
            out[float(_NUMBER_WORDS[tok])] += 1
    return out


def check_numbers(a: str, b: str) -> str | None:
    if _numbers(a) != _numbers(b):
        return "numbers"
    cur_a = {_CURRENCY[t] for t in _tokens(a) + re.findall(r"[£$€¥]", a) if t in _CURRENCY}
    cur_b = {_CURRENCY[t] for t in _tokens(b) + re.findall(r"[£$€¥]", b) if t in _CURRENCY}
    return "currency" if cur_a != cur_b else None


def _dates(text: str) -> set[str]:
    out = set()
    for tok in _tokens(text):
        if tok in _DAYS:
            out.add(tok)
        elif tok[:3] in _MONTHS and (tok == _MONTHS[tok[:3]] or len(tok) == 3 or tok == "sept"):
            out.add(_MONTHS[tok[:3]])
    out.update(f"{m.group(1)} {m.group(2)}" for m in _RELATIVE.finditer(text.lower()))
    if re.search(r"\bmay\s+\d|\d\s+may\b", text, re.IGNORECASE):
        out.add("may")
    return out


def check_dates(a: str, b: str) -> str | None:
    return "dates" if _dates(a) != _dates(b) else None


def _negations(text: str) -> int:
    toks = _tokens(text)
    return sum(1 for t in toks if t in _NEGATORS or t.endswith("n't"))


def check_negation(a: str, b: str) -> str | None:
    if min(_negations(a), 2) != min(_negations(b), 2):
        return "negation"
    only_a, only_b = _only(a, b)
    for x in only_a:
        for y in only_b:
            if _prefix_negated(x, y) or _prefix_negated(y, x):
                return "negation_prefix"
    return None


def _prefix_negated(word: str, other: str) -> bool:
    """'unsafe' vs 'safe', 'illegal' vs 'legal', 'careless' vs 'careful'."""
    for p in _NEG_PREFIXES:
        if other == p + word and len(word) >= 3:
            return True
    if word.endswith("less") and other.endswith("ful") and word[:-4] == other[:-3]:
        return True
    return False


def _only(a: str, b: str) -> tuple[set[str], set[str]]:
    la = {_lemma(t) for t in _tokens(a)}
    lb = {_lemma(t) for t in _tokens(b)}
    return la - lb, lb - la


def check_antonyms(a: str, b: str) -> str | None:
    only_a, only_b = _only(a, b)
    only_a, only_b = only_a | {_base(t) for t in only_a}, only_b | {_base(t) for t in only_b}
    for x in only_a:
        for y in only_b:
            if frozenset((x, y)) in _ANTONYM_SET:
                return "antonym"
    return None


def _cmp_signature(text: str) -> list[str]:
    return sorted(_CMP_CLASS[m.group(1).lower()] for m in _CMP_NUMBER.finditer(text))


def check_comparatives(a: str, b: str) -> str | None:
    """'over £50' vs 'under £50'. Different comparative words alone are not vetoed: 'largest' and
    'biggest' are paraphrases; opposite ones are caught by check_antonyms on their base forms."""
    return "comparative" if _cmp_signature(a) != _cmp_signature(b) else None


_COMPARATIVE_WORDS = {"better", "best", "worse", "worst", "more", "most", "less", "least", "fewer", "fewest"}
_ADJ_STEMS = {
    "fast",
    "slow",
    "cheap",
    "big",
    "small",
    "larg",
    "long",
    "short",
    "old",
    "new",
    "high",
    "low",
    "strong",
    "weak",
    "heavy",
    "light",
    "easi",
    "hard",
    "safe",
    "quick",
    "hot",
    "cold",
    "warm",
    "cool",
    "great",
    "young",
    "rich",
    "poor",
    "thick",
    "thin",
    "wide",
    "narrow",
    "deep",
    "shallow",
    "loud",
    "quiet",
    "clean",
    "dark",
    "bright",
    "tall",
    "near",
    "far",
    "early",
    "earli",
    "late",
    "lat",
    "healthi",
    "smart",
    "simpl",
    "clos",
    "tight",
    "loos",
    "fin",
    "nic",
    "safer",
    "wis",
    "sweet",
    "soft",
    "heavi",
}


def _base(tok: str) -> str:
    """'cheapest' -> 'cheap', 'bigger' -> 'big' (for the antonym table)."""
    for suffix in ("est", "er"):
        if tok.endswith(suffix) and len(tok) > len(suffix) + 2:
            stem = tok[: -len(suffix)]
            if len(stem) > 2 and stem[-1] == stem[-2]:
                stem = stem[:-1]
            if stem in _ADJ_STEMS:
                return {
                    "easi": "easy",
                    "larg": "large",
                    "earli": "early",
                    "lat": "late",
                    "heavi": "heavy",
                    "healthi": "healthy",
                }.get(stem, stem)
    return tok


def _is_comparative(tok: str) -> bool:
    if tok in _COMPARATIVE_WORDS:
        return True
    for suffix in ("est", "er"):
        if tok.endswith(suffix) and len(tok) > len(suffix) + 2:
            stem = tok[: -len(suffix)]
            if stem in _ADJ_STEMS or (len(stem) > 2 and stem[-1] == stem[-2] and stem[:-1] in _ADJ_STEMS):
                return True
    return False


def _scope(text: str) -> set[str]:
    out = {_SCOPE[t] for t in _tokens(text) if t in _SCOPE}
    if _SCOPE_PHRASES.search(text.lower()):
        out.add("exclusive")
    return out


def check_scope(a: str, b: str) -> str | None:
    return "scope" if _scope(a) != _scope(b) else None


def _content_positions(toks: list[str]) -> dict[str, list[int]]:
    pos: dict[str, list[int]] = {}
    for i, t in enumerate(toks):
        if t not in STOP:
            pos.setdefault(_lemma(t), []).append(i)
    return pos


def _roles(toks: list[str], pos: dict[str, list[int]]) -> dict[str, set[str]]:
    """Word -> prepositions that govern it ('from X', 'to the Y'), looking back over function words."""
    roles: dict[str, set[str]] = {}
    for word, idxs in pos.items():
        for i in idxs:
            j = i - 1
            # Walk back over function words; a number may also skip its noun ("from Windows 10").
            while (
                j >= 0
                and i - j <= 3
                and toks[j] not in _ROLE_PREPS
                and (toks[j] in STOP or (toks[i][0].isdigit() and i - j == 1))
            ):
                j -= 1
            if j >= 0 and toks[j] in _ROLE_PREPS:
                roles.setdefault(word, set()).add(toks[j])
    return roles


def check_order(a: str, b: str) -> str | None:
    """Swapped roles: 'from savings to current' vs 'from current to savings', 'is X faster than Y'."""
    ta, tb = _tokens(a), _tokens(b)
    pa, pb = _content_positions(ta), _content_positions(tb)
    shared = sorted(set(pa) & set(pb))
    ra, rb = _roles(ta, pa), _roles(tb, pb)
    for w in shared:
        sa, sb = ra.get(w, set()) & _ASYM_ROLE, rb.get(w, set()) & _ASYM_ROLE
        if sa and sb and not sa & sb:
            return "role_swap"
    unique = [w for w in shared if len(pa[w]) == 1 and len(pb[w]) == 1]
    for i, x in enumerate(unique):
        for y in unique[i + 1 :]:
            ax, ay, bx, by = pa[x][0], pa[y][0], pb[x][0], pb[y][0]
            if (ax < ay) == (bx < by):
                continue
            between_a = ta[min(ax, ay) + 1 : max(ax, ay)]
            between_b = tb[min(bx, by) + 1 : max(bx, by)]
            if between_a and between_a == between_b and not set(between_a) <= _SYMMETRIC:
                return "order_swap"
    return None


def _entities(text: str) -> set[str]:
    out = set()
    sentence_start = True
    for w in re.findall(r"[A-Za-z][\w'-]*|[.?!]", text):
        if w in ".?!":
            sentence_start = True
            continue
        if len(w) > 1 and ((w[0].isupper() and not sentence_start) or w.isupper()):
            out.add(_tokens(w)[0] if _tokens(w) else w.lower())
        sentence_start = False
    out.update(m.lower() for m in _FORCED_ENTITY.findall(text))
    quoted = r"(?:^|(?<=\s))[\"'“‘`]([^\"'”’`]{1,60})[\"'”’`](?=\W|$)"
    out.update(_tokens(q)[0] if len(_tokens(q)) == 1 else q.lower() for q in re.findall(quoted, text))
    return out


def check_entities(a: str, b: str) -> str | None:
    """Named things (capitalised words, identifiers, quoted strings) must appear in both texts."""
    la, lb = a.lower(), b.lower()
    for e in _entities(a) | _entities(b):
        if _lemma(e) not in _lemma_text(la) or _lemma(e) not in _lemma_text(lb):
            if e not in la or e not in lb:
                return "entity"
    return None


def _lemma_text(text: str) -> set[str]:
    return {_lemma(t) for t in _tokens(text)}


CHECKS: tuple[Callable[[str, str], str | None], ...] = (
    check_numbers,
    check_dates,
    check_negation,
    check_antonyms,
    check_comparatives,
    check_scope,
    check_order,
    check_entities,
)


@dataclass(frozen=True)
class GuardVerdict:
    ok: bool
    reason: str | None = None


def substituted_words(a: str, b: str) -> tuple[list[str], list[str]] | None:
    """The content words swapped when b is a with one or two words replaced in place, else None.

    'delete a branch in git' -> 'rename a branch in git' gives (['delete'], ['rename']). Real
    paraphrases rarely keep the whole frame and swap one word, so only that shape is checked."""
    ta, tb = [_lemma(t) for t in _tokens(a)], [_lemma(t) for t in _tokens(b)]
    ops = [op for op in difflib.SequenceMatcher(a=ta, b=tb, autojunk=False).get_opcodes() if op[0] != "equal"]
    same = sum(
        i2 - i1
        for tag, i1, i2, _, _ in difflib.SequenceMatcher(a=ta, b=tb, autojunk=False).get_opcodes()
        if tag == "equal"
    )
    if len(ops) != 1 or ops[0][0] != "replace" or same < 0.6 * max(len(ta), len(tb)):
        return None
    _, i1, i2, j1, j2 = ops[0]
    only_a = [t for t in ta[i1:i2] if t not in STOP and not t[0].isdigit()]
    only_b = [t for t in tb[j1:j2] if t not in STOP and not t[0].isdigit()]
    if not only_a or not only_b or len(only_a) > 2 or len(only_b) > 2:
        return None
    return only_a, only_b


class Guard:
    """Runs every check; the first failing one names the rejection reason (counted in stats).

    With an embedder, one more check: in a near-identical frame where one or two content words
    were replaced, each replaced word must be close in meaning (word-embedding cosine >=
    word_threshold) to a replacement: 'fix'->'repair' passes, 'delete'->'rename', 'purr'->'hiss'
    do not. Sentence embeddings rate such pairs 0.7-0.9 because the frame dominates.
    """

    def __init__(
        self,
        checks: tuple[Callable[[str, str], str | None], ...] = CHECKS,
        embedder: Embedder | None = None,
        word_threshold: float = 0.6,
    ):
        self.checks = checks
        self.embedder = embedder
        self.word_threshold = word_threshold
        self._word_vecs: dict[str, object] = {}

    def check_substitution(self, a: str, b: str) -> str | None:
        swap = substituted_words(a, b)
        if swap is None or self.embedder is None:
            return None
        only_a, only_b = swap
        missing = [w for w in only_a + only_b if w not in self._word_vecs]
        if missing:
            if len(self._word_vecs) > 50_000:  # bound memory; the vocabulary of live queries is open-ended
                self._word_vecs.clear()
            self._word_vecs.update(zip(missing, self.embedder.embed(missing), strict=True))
        for x in only_a:
            best = max(float(self._word_vecs[x] @ self._word_vecs[y]) for y in only_b)  # type: ignore[operator]
            if best < self.word_threshold:
                return "substitution"
        return None

    def verify(self, cached: str, query: str) -> GuardVerdict:
        if " ".join(_tokens(cached)) == " ".join(_tokens(query)):
            return GuardVerdict(True)
        for check in self.checks:
            reason = check(cached, query)
            if reason:
                return GuardVerdict(False, reason)
        reason = self.check_substitution(cached, query)
        return GuardVerdict(False, reason) if reason else GuardVerdict(True)
