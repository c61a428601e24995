"""BLEU and CIDEr-D against hand-computed values (coco-caption's definitions), the tokenizer rule, and errors."""
from __future__ import annotations

import math

import pytest

from eval.caption_metrics import bleu, cider, cider_per_item, tokenize_caption


def test_tokenizer_rule():
    assert tokenize_caption('A Dog\'s T-shirt, isn\'t it?!') == ["a", "dog", "'s", "t-shirt", "is", "n't", "it"]
    assert tokenize_caption('Two men -- playing "soccer" (outside)...') == ["two", "men", "playing", "soccer",
                                                                             "outside"]
    assert tokenize_caption("It costs 3.5 dollars; 1,000 cents.") == ["it", "costs", "3.5", "dollars", "1,000",
                                                                       "cents"]
    assert tokenize_caption("The kids\u2019 toys & a_b") == ["the", "kids", "toys", "a", "b"]
    assert tokenize_caption("  ") == []


def test_bleu_hand_computed_corpus():
    references = [["a man rides a horse on a beach", "a person riding a horse along the shore"],
                  ["two dogs play in the snow", "two dogs are playing"]]
    hypotheses = ["a man rides a horse on the beach", "Two dogs play."]
    # Item 1: hyp has 8 tokens; both refs have 8 -> closest r = 8.
    #   1-grams: a x2 (max ref count 3 -> 2), man, rides, horse, on, the (ref 2), beach: 8 of 8
    #   2-grams: a man, man rides, rides a, a horse, horse on match; on the, the beach do not: 5 of 7
    #   3-grams: a man rides, man rides a, rides a horse, a horse on match; horse on the, on the beach: 4 of 6
    #   4-grams: a man rides a, man rides a horse, rides a horse on match; a horse on the, horse on the beach: 3 of 5
    # Item 2: hyp "two dogs play" (3 tokens); refs 6 and 4 tokens -> closest r = 4.
    #   1-grams 3/3, 2-grams 2/2, 3-grams 1/1, 4-grams 0/0 (no 4-gram to guess)
    # Corpus: p1 = 11/11, p2 = 7/9, p3 = 5/7, p4 = 3/5 -> product 1/3; c = 11 < r = 12 -> BP = exp(1 - 12/11)
    expected = math.exp(1 - 12 / 11) * (1 * 7 / 9 * 5 / 7 * 3 / 5) ** 0.25
    assert bleu(references, hypotheses) == pytest.approx(expected, rel=1e-12)
    # BLEU-2 from the same counts: sqrt(p1 p2) * BP
    assert bleu(references, hypotheses, max_n=2) == pytest.approx(math.exp(1 - 12 / 11) * (7 / 9) ** 0.5)


def test_bleu_closest_length_tie_goes_to_shorter():
    # hyp 5 tokens, refs 4 and 6 tokens: |5-4| = |5-6| -> r = 4 (shorter), so c > r and BP = 1.
    # p1 = 5/5; 2-grams a dog, dog is, is running match, running fast does not: 3/4;
    # 3-grams a dog is, dog is running: 2/3; 4-grams a dog is running: 1/2 -> (1/4) ** (1/4)
    score = bleu([["a dog is running", "a dog is running very fast"]], ["a dog is running fast"])
    assert score == pytest.approx(0.25 ** 0.25, rel=1e-12)


def test_bleu_identical_is_one_and_zero_precision_is_zero():
    assert bleu([["A little girl climbs the stairs."]], ["a little girl climbs the stairs"]) == pytest.approx(1.0)
    assert bleu([["a cat sits on a mat"]], ["dogs run fast outside today"]) == 0.0
    # unigrams match but no 4-gram does: exactly 0, no smoothing
    assert bleu([["a cat sits on a mat"]], ["mat a on sits cat a"]) == 0.0


def test_cider_hand_computed_two_images():
    references = [["a dog runs", "a cat runs"], ["a bird flies"]]
    hypotheses = ["a dog runs", "a bird bird flies"]
    # N = 2 images, idf(g) = log 2 - log(max(1, df(g))); write L = log 2.
    # df: "a" is in both images -> idf 0; every other reference n-gram is in one image -> idf L;
    #     hypothesis n-grams in no reference ("bird bird", ...) have df 0 -> idf log 2 - log 1 = L.
    # Image 1, hyp "a dog runs" (length = 2 bigrams):
    #   hyp  n=1 {a: 0, dog: L, runs: L}, |.| = sqrt2 L; n=2 {a dog: L, dog runs: L}, sqrt2 L; n=3 {a dog runs: L}, L
    #   ref1 identical -> sims 1, 1, 1, 0 (no 4-grams: norm 0 -> 0); length 2 -> penalty 1; mean 3/4
    #   ref2 "a cat runs" n=1 {a: 0, cat: L, runs: L}: dot = L*L -> L^2 / (2 L^2) = 1/2; n=2,3 no overlap
    #        -> sims 1/2, 0, 0, 0; mean 1/8
    #   score 10 * (3/4 + 1/8) / 2 = 4.375
    # Image 2, hyp "a bird bird flies" (length 3 bigrams) vs "a bird flies" (length 2): penalty exp(-1/72)
    #   n=1 hyp {a: 0, bird: 2L, flies: L}, |.| = sqrt5 L; ref {a: 0, bird: L, flies: L}, sqrt2 L
    #       clipped dot = min(2L, L) L + L L = 2 L^2 -> 2 / sqrt10
    #   n=2 hyp {a bird, bird bird, bird flies: L each}, sqrt3 L; ref {a bird, bird flies: L}, sqrt2 L -> 2 / sqrt6
    #   n=3 hyp {a bird bird, bird bird flies} vs ref {a bird flies}: 0; n=4: ref has none -> 0
    #   score 10 * exp(-1/72) * (2/sqrt10 + 2/sqrt6) / 4
    image2 = 10 * math.exp(-1 / 72) * (2 / math.sqrt(10) + 2 / math.sqrt(6)) / 4
    per_item = cider_per_item(references, hypotheses)
    assert per_item == pytest.approx([4.375, image2], rel=1e-12)
    assert cider(references, hypotheses) == pytest.approx((4.375 + image2) / 2, rel=1e-12)


def test_cider_matching_beats_shuffled_and_zero_overlap_is_zero():
    references = [["a dog runs on the grass", "a brown dog running on grass"],
                  ["a girl eats an ice cream", "a young girl eating ice cream"],
                  ["two men ride bikes downhill", "two cyclists riding down a hill"]]
    matching = [refs[0] for refs in references]
    shuffled = matching[1:] + matching[:1]
    assert cider(references, matching) > 2.0
    assert cider(references, matching) > cider(references, shuffled)
    assert cider([["red car parked"], ["blue sky above"]], ["green tree", "yellow sun"]) == 0.0
    # one image: every reference n-gram has df = N -> idf 0 -> score 0 (coco-caption behaves the same)
    assert cider([["a dog runs"]], ["a dog runs"]) == 0.0


def test_errors_name_the_index():
    with pytest.raises(ValueError, match="2 items but hypotheses has 1"):
        bleu([["a"], ["b"]], ["a"])
    with pytest.raises(ValueError, match=r"references\[1\] is empty"):
        cider([["a dog"], []], ["a dog", "a cat"])
    with pytest.raises(ValueError, match=r"references\[0\] is a string"):
        bleu(["a dog"], ["a dog"])
    with pytest.raises(ValueError, match="no hypotheses"):
        cider_per_item([], [])
