"""ROUGE on hand-made pairs with known answers, and the bootstrap interval."""

import numpy as np
import pytest

from phi2_assets.ml.scoring import ROUGE_TYPES, bootstrap_interval, relative_improvement, score_pairs, summarize_scores


def test_identical_pairs_score_one_and_disjoint_pairs_zero():
    scores = score_pairs(
        ["The cat sat on the mat.", "Stocks fell sharply in London.", ""],
        ["The cat sat on the mat.", "A storm hit the coast overnight.", "Something was said."],
    )
    assert list(scores.columns) == list(ROUGE_TYPES)
    assert scores.iloc[0].tolist() == pytest.approx([1.0] * 4)
    assert scores.iloc[1].tolist() == pytest.approx([0.0] * 4)
    assert scores.iloc[2].tolist() == pytest.approx([0.0] * 4)  # an empty generation scores 0, it is not dropped


def test_known_partial_overlap_and_stemming():
    # 2 of 3 unigrams shared both ways ("runs"/"running" stem to "run"): P = R = F1 = 2/3; one bigram of two.
    scores = score_pairs(["police runs fast"], ["police running slowly"]).iloc[0]
    assert scores["rouge1"] == pytest.approx(2 / 3)
    assert scores["rouge2"] == pytest.approx(1 / 2)


def test_mismatched_lengths_are_refused():
    with pytest.raises(ValueError, match="2 predictions but 1 references"):
        score_pairs(["a", "b"], ["a"])


def test_bootstrap_interval_brackets_the_mean_and_is_reproducible():
    values = np.random.default_rng(3).uniform(size=200)
    low, high = bootstrap_interval(values, seed=7)
    assert low < values.mean() < high and high - low < 0.2
    assert bootstrap_interval(values, seed=7) == (low, high)
    assert bootstrap_interval([0.5] * 10) == pytest.approx((0.5, 0.5))


def test_summary_and_relative_improvement():
    summary = summarize_scores(score_pairs(["a b c", "x"], ["a b c", "y"]))
    assert summary["rouge1"].mean == pytest.approx(0.5)
    assert summary["rouge1"].low <= 0.5 <= summary["rouge1"].high
    assert relative_improvement(0.2, 0.3) == pytest.approx(0.5)
    assert relative_improvement(0.0, 0.3) is None
