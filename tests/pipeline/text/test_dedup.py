"""Shingling, MinHash estimates, LSH candidates and the keep/drop decision."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from pipeline.text.boilerplate import strip_boilerplate
from pipeline.text.dedup import (
    EMPTY,
    NUM_BINS,
    Similarity,
    candidate_pairs,
    estimate_similarity,
    exact_similarity,
    find_near_duplicates,
    shingle_hashes,
    sketch_text,
)
from pipeline.text.encoding import decode_text

SYLLABLES = ["ka", "lo", "mi", "ne", "ru", "ta", "vo", "se", "di", "an", "or", "el", "pu", "gri"]


def words(n: int, seed: int) -> list[str]:
    """``n`` pseudo-words from a large vocabulary (unrelated seeds share few 5-grams)."""
    rng = np.random.default_rng(seed)
    vocab = ["".join(rng.choice(SYLLABLES, size=rng.integers(1, 4))) for _ in range(3000)]
    return list(rng.choice(vocab, size=n))


def text(ws: list[str]) -> str:
    return "\n".join(" ".join(ws[i : i + 12]) + "." for i in range(0, len(ws), 12))


def mutate(ws: list[str], fraction: float, seed: int) -> list[str]:
    rng = np.random.default_rng(seed)
    out = list(ws)
    for i in rng.choice(len(out), size=int(len(out) * fraction), replace=False):
        out[i] = "zz" + out[i]
    return out


# ---------------------------------------------------------------------------------- shingles
def test_shingles_ignore_case_punctuation_and_markup() -> None:
    a = shingle_hashes("“Don’t _you_ KNOW,” he said—quietly… to the old man.")
    b = shingle_hashes('"Don\'t you know," he said--quietly... to the old man.')
    assert np.array_equal(a, b)
    assert a.dtype == np.uint64 and np.all(np.diff(a.astype(np.float64)) > 0)  # sorted, distinct


def test_shingles_edge_cases() -> None:
    assert len(shingle_hashes("")) == 0
    assert len(shingle_hashes("two words")) == 1
    assert len(shingle_hashes("a b c d e a b c d e")) == 5  # distinct 5-grams only
    assert np.array_equal(
        shingle_hashes("same text here ok go"), shingle_hashes("same text here ok go")
    )


def test_sketch_counts_distinct_shingles_and_fills_bins() -> None:
    t = text(words(5000, 1))
    s = sketch_text(t)
    assert s.n_shingles == len(shingle_hashes(t))
    assert s.signature.shape == (NUM_BINS,) and not np.any(s.signature == EMPTY)
    tiny = sketch_text("only a few words in this one")
    assert tiny.n_shingles == 3 and np.sum(tiny.signature != EMPTY) == 3


# ------------------------------------------------------------------------------- similarity
def test_estimates_track_exact_similarity() -> None:
    base = words(20000, 2)
    for fraction in (0.01, 0.05, 0.2):
        other = mutate(base, fraction, 3)
        est = estimate_similarity(sketch_text(text(base)), sketch_text(text(other)))
        exact = exact_similarity(shingle_hashes(text(base)), shingle_hashes(text(other)))
        assert exact.exact and not est.exact
        assert abs(est.jaccard - exact.jaccard) < 0.08
        assert abs(est.containment - exact.containment) < 0.08


def test_containment_of_a_small_text_inside_a_collection() -> None:
    small = words(2000, 4)
    collection = words(15000, 5) + small + words(15000, 6)
    est = estimate_similarity(sketch_text(text(small)), sketch_text(text(collection)))
    exact = exact_similarity(shingle_hashes(text(small)), shingle_hashes(text(collection)))
    assert exact.containment > 0.99 and exact.jaccard < 0.1
    assert est.containment > 0.6  # noisy for a 1:15 size ratio: hence exact verification


# ------------------------------------------------------------------------------- candidates
def test_candidate_pairs_need_two_shared_bins_and_chunking_is_exact() -> None:
    rng = np.random.default_rng(7)
    sigs = rng.integers(0, 2**63, size=(300, 64), dtype=np.uint64)
    sigs[10, :5] = sigs[200, :5]  # 5 shared bins
    sigs[20, 7] = sigs[30, 7]  # 1 shared bin only
    sigs[40:60, 9] = sigs[40, 9]  # a bucket of 20 documents (too big with max_bucket=8)
    sigs[:, 63] = EMPTY  # empty bins never collide
    pairs = candidate_pairs(sigs, max_bucket=8)
    assert pairs.tolist() == [[10, 200, 5]]
    big = candidate_pairs(sigs, max_bucket=64, min_shared=1)
    small_chunks = candidate_pairs(sigs, max_bucket=64, min_shared=1, max_events=7)
    assert np.array_equal(big, small_chunks)
    assert [20, 30, 1] in big.tolist() and len(big) == 2 + 190


# --------------------------------------------------------------------------------- decision
def test_longest_copy_is_kept_and_the_reason_names_it() -> None:
    base = words(8000, 8)
    docs = {
        11: text(base),
        12: text(base + words(300, 9)),  # longest: kept
        13: text(mutate(base, 0.01, 10)),
        14: text(words(8000, 11)),  # unrelated
    }
    ids = list(docs)
    dups = find_near_duplicates(
        ids, [len(docs[i]) for i in ids], [sketch_text(docs[i]) for i in ids], 0.8
    )
    assert {d.dropped: d.kept for d in dups} == {11: 12, 13: 12}
    assert all("near-duplicate of 12" in d.detail() for d in dups)


def test_ties_keep_the_lowest_id() -> None:
    t = text(words(3000, 12))
    dups = find_near_duplicates([7, 3, 5], [len(t)] * 3, [sketch_text(t)] * 3, 0.8)
    assert sorted((d.dropped, d.kept) for d in dups) == [(5, 3), (7, 3)]


def test_hard_negative_below_threshold_is_kept() -> None:
    base = words(8000, 13)
    other = mutate(base, 0.12, 14)  # ~ half the 5-grams change
    docs = [text(base), text(other)]
    dups = find_near_duplicates([1, 2], [len(d) for d in docs], [sketch_text(d) for d in docs], 0.8)
    assert dups == []


def test_verify_callback_decides() -> None:
    t = text(words(3000, 15))
    calls = []

    def verify(a: int, b: int) -> Similarity:
        calls.append((a, b))
        return Similarity(0.5, 0.5, exact=True)

    assert find_near_duplicates([1, 2], [10, 9], [sketch_text(t)] * 2, 0.8, verify=verify) == []
    assert calls == [(1, 2)]


def test_threshold_is_validated() -> None:
    with pytest.raises(ValueError):
        find_near_duplicates([], [], [], 0.0)


# ----------------------------------------------------------------------------------- mirror
PAIRS = {43: 42, 33: 25344, 1342: 42671, 70841: 521, 3: 1, 4: 1, 5: 1}  # dropped -> kept
HARD_NEGATIVES = {1524, 2264, 2265}


@pytest.mark.mirror
def test_mirror_editions_and_compound_file(mirror_dir: Path) -> None:
    epub = mirror_dir / "gutenberg" / "cache" / "epub"
    ids = sorted({*PAIRS, *PAIRS.values(), *HARD_NEGATIVES, 11, 84, 1661})
    bodies = {
        i: strip_boilerplate(decode_text((epub / str(i) / f"pg{i}.txt").read_bytes()).text).body
        for i in ids
    }

    def verify(a: int, b: int) -> Similarity:
        return exact_similarity(shingle_hashes(bodies[a]), shingle_hashes(bodies[b]))

    dups = find_near_duplicates(
        ids,
        [len(bodies[i]) for i in ids],
        [sketch_text(bodies[i]) for i in ids],
        0.8,
        verify=verify,
    )
    found = {d.dropped: d.kept for d in dups}
    # Which edition of a pair is longer is the data's business; that one is collapsed is ours.
    assert {frozenset(p) for p in found.items()} == {frozenset(p) for p in PAIRS.items()}
    assert all(d.similarity.exact and d.similarity.containment >= 0.8 for d in dups)
    assert found[3] == found[4] == found[5] == 1
    hamlet = exact_similarity(shingle_hashes(bodies[1524]), shingle_hashes(bodies[2265]))
    assert hamlet.jaccard < 0.2 and hamlet.containment < 0.3
