"""Caption metrics in pure Python: corpus BLEU-n and CIDEr-D, computed as coco-caption (pycocoevalcap) computes them.

Inputs are raw strings: ``references[i]`` is the list of reference captions of item ``i`` (an image, a clip) and
``hypotheses[i]`` its one generated caption. Both go through ``tokenize_caption`` first.

BLEU (``bleu``): clipped n-gram matches and n-gram counts are summed over the whole corpus before dividing
(corpus-level, not a mean of sentence scores); the score is the geometric mean of the n = 1..max_n precisions times
the brevity penalty ``exp(1 - r / c)`` when ``c < r``, with ``c`` the total hypothesis length and ``r`` the sum over
items of the reference length closest to the hypothesis length (ties go to the shorter reference: coco-caption's
"closest" rule). Unlike coco-caption, which adds 1e-15 / 1e-9 to every ratio and so reports tiny non-zero values,
no smoothing is applied: the score is exactly 0 when any precision is 0 (or the hypotheses are all empty).

CIDEr-D (``cider``, Vedantam et al. 2015, coco-caption's ``Cider``): each caption becomes, for n = 1..4, a vector
of term frequency x inverse document frequency over its n-grams, ``idf = log(N) - log(max(1, df))`` with ``df`` the
number of items whose references contain the n-gram and ``N`` the number of items (so a corpus of one item scores
0). Per item, per reference and per n: ``sum_g min(h_g, r_g) * r_g / (|h| |r|)`` (hypothesis values clipped by the
reference's), times the Gaussian length penalty ``exp(-(l_h - l_r)^2 / (2 sigma^2))`` on the lengths counted as
coco-caption counts them (the number of bigrams, i.e. tokens - 1); averaged over n and over the item's references,
times 10. ``cider`` is the mean of ``cider_per_item``.
"""
from __future__ import annotations

import math
import re
from collections import Counter

# PTB splits these clitics off the word before them ("don't" -> "do n't", "dog's" -> "dog 's").
_NEGATION = re.compile(r"(?<=[^\W_])n't\b")
_CLITIC = re.compile(r"(?<=[^\W_])'(s|re|ve|ll|d|m)\b")
_TOKEN = re.compile(
    r"\d+(?:[.,]\d+)+"                      # numbers with a decimal point or thousands separator: 3.5, 1,000
    r"|(?<!\S)'(?:s|re|ve|ll|d|m)\b"        # a clitic split off above
    r"|[^\W_]+(?:[-'][^\W_]+)*"             # a word; hyphens and apostrophes inside it stay (t-shirt, n't)
)


def tokenize_caption(text: str) -> list[str]:
    """Caption text -> tokens, a Java-free stand-in for coco-caption's PTBTokenizer + punctuation removal.

    The rule, in order:
    1. lower-case (``str.lower``); typographic apostrophes (U+2018, U+2019) become ``'``;
    2. PTB clitics are split off the word before them: ``n't`` and ``'s 're 've 'll 'd 'm`` at a word's end
       become tokens of their own ("don't" -> "do", "n't"; "dog's" -> "dog", "'s");
    3. tokens are: numbers with inner ``.``/``,`` ("3.5"), the split clitics, and words — runs of letters and
       digits, joined by a single inner ``-`` or ``'`` ("t-shirt", "black-and-white", "o'clock");
    4. every other character (``. , ? ! : ; - -- ... " ' ( ) [ ] { }`` — the punctuation coco-caption drops —
       and also ``& / $ % # _ *`` etc., which PTB would keep as tokens) separates tokens and is dropped.
    """
    text = text.lower().replace("\u2019", "'").replace("\u2018", "'")
    text = _NEGATION.sub(" n't", text)
    text = _CLITIC.sub(r" '\1", text)
    return _TOKEN.findall(text)


def _ngrams(tokens: list[str], n: int) -> Counter:
    return Counter(tuple(tokens[i:i + n]) for i in range(len(tokens) - n + 1))


def _tokenized(references: list[list[str]], hypotheses: list[str]) -> tuple[list[list[list[str]]], list[list[str]]]:
    if isinstance(hypotheses, str) or not isinstance(references, (list, tuple)):
        raise ValueError("expected hypotheses: list[str] (one caption per item) and references: list[list[str]]")
    if len(references) != len(hypotheses):
        raise ValueError(f"references has {len(references)} items but hypotheses has {len(hypotheses)} "
                         f"(expected one list of references per hypothesis)")
    if not hypotheses:
        raise ValueError("no hypotheses to score (expected at least one item)")
    refs = []
    for index, (item_refs, hyp) in enumerate(zip(references, hypotheses)):
        if isinstance(item_refs, str):
            raise ValueError(f"references[{index}] is a string {item_refs!r} (expected a list of reference strings)")
        if len(item_refs) == 0:
            raise ValueError(f"references[{index}] is empty (expected at least one reference caption)")
        if not isinstance(hyp, str):
            raise ValueError(f"hypotheses[{index}] is {type(hyp).__name__} (expected a string)")
        refs.append([tokenize_caption(ref) for ref in item_refs])
    return refs, [tokenize_caption(hyp) for hyp in hypotheses]


def bleu(references: list[list[str]], hypotheses: list[str], max_n: int = 4) -> float:
    """Corpus BLEU-``max_n`` (coco-caption's "closest" reference length, no smoothing); see the module docstring.

    references: N lists of reference strings; hypotheses: N strings -> a score in [0, 1].
    """
    if max_n < 1:
        raise ValueError(f"max_n={max_n} (expected >= 1)")
    refs, hyps = _tokenized(references, hypotheses)
    matches = [0] * max_n
    totals = [0] * max_n
    hyp_length = ref_length = 0
    for item_refs, hyp in zip(refs, hyps):
        hyp_length += len(hyp)
        ref_length += min((abs(len(ref) - len(hyp)), len(ref)) for ref in item_refs)[1]
        for n in range(1, max_n + 1):
            max_ref_counts: Counter = Counter()
            for ref in item_refs:
                max_ref_counts |= _ngrams(ref, n)  # element-wise max
            hyp_counts = _ngrams(hyp, n)
            matches[n - 1] += sum(min(count, max_ref_counts[gram]) for gram, count in hyp_counts.items())
            totals[n - 1] += max(len(hyp) - n + 1, 0)
    if any(match == 0 for match in matches):
        return 0.0
    log_precision = sum(math.log(m / t) for m, t in zip(matches, totals)) / max_n
    brevity = 0.0 if hyp_length >= ref_length else 1.0 - ref_length / hyp_length
    return math.exp(log_precision + brevity)


def _tfidf(counts: Counter, df: Counter, log_items: float, n: int) -> tuple[list[dict], list[float], int]:
    """n-gram counts (1..n) -> per-order tf-idf vectors, their L2 norms, and the length (number of bigrams)."""
    vectors: list[dict] = [{} for _ in range(n)]
    for gram, tf in counts.items():
        vectors[len(gram) - 1][gram] = tf * (log_items - math.log(max(1.0, df[gram])))
    norms = [math.sqrt(sum(v * v for v in vec.values())) for vec in vectors]
    length = sum(tf for gram, tf in counts.items() if len(gram) == 2)
    return vectors, norms, length


def _all_ngrams(tokens: list[str], n: int) -> Counter:
    counts: Counter = Counter()
    for order in range(1, n + 1):
        counts.update(_ngrams(tokens, order))
    return counts


def cider_per_item(references: list[list[str]], hypotheses: list[str], n: int = 4, sigma: float = 6.0
                   ) -> list[float]:
    """CIDEr-D of each hypothesis against its references, document frequencies from all the references given.

    references: N lists of reference strings; hypotheses: N strings -> N scores (>= 0; 10 is a perfect match
    against references that agree with each other).
    """
    if n < 1:
        raise ValueError(f"n={n} (expected >= 1)")
    if sigma <= 0:
        raise ValueError(f"sigma={sigma} (expected > 0)")
    refs, hyps = _tokenized(references, hypotheses)
    ref_counts = [[_all_ngrams(ref, n) for ref in item_refs] for item_refs in refs]
    df: Counter = Counter()
    for item_counts in ref_counts:
        df.update(set().union(*item_counts))
    log_items = math.log(len(refs))
    scores = []
    for hyp, item_counts in zip(hyps, ref_counts):
        hyp_vec, hyp_norm, hyp_len = _tfidf(_all_ngrams(hyp, n), df, log_items, n)
        total = 0.0
        for counts in item_counts:
            ref_vec, ref_norm, ref_len = _tfidf(counts, df, log_items, n)
            penalty = math.exp(-((hyp_len - ref_len) ** 2) / (2 * sigma ** 2))
            for order in range(n):
                if hyp_norm[order] == 0 or ref_norm[order] == 0:
                    continue
                overlap = sum(min(value, ref_vec[order].get(gram, 0.0)) * ref_vec[order].get(gram, 0.0)
                              for gram, value in hyp_vec[order].items())
                total += penalty * overlap / (hyp_norm[order] * ref_norm[order])
        scores.append(10.0 * total / (n * len(item_counts)))
    return scores


def cider(references: list[list[str]], hypotheses: list[str], n: int = 4, sigma: float = 6.0) -> float:
    """Corpus CIDEr-D: the mean of ``cider_per_item`` over the items."""
    scores = cider_per_item(references, hypotheses, n=n, sigma=sigma)
    return sum(scores) / len(scores)
