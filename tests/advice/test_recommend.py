"""Choosing a policy: train at the user's LR first, then be as good as the best (score and loss,
within the seeds' noise), then the widest stability margin, then the score, the final loss, the
overhead."""

from __future__ import annotations

import math

import pytest

from gradguard.advice.candidates import Candidate
from gradguard.advice.recommend import choose, gather


def row(spec, level, seed, *, diverged=False, metric=0.9, loss=0.1, share=0.1, failed=False):
    if failed:
        return {"status": "failed", "error": "Traceback ...\nGradGuardError: cannot recover"}
    return {
        "status": "done",
        "result": {
            "diverged": diverged,
            "diverged_reason": "nonfinite_weights" if diverged else None,
            "steps_run": 100,
            "test_metric": math.nan if diverged else metric,
            "final_train_loss": math.nan if diverged else loss,
            "guard_share": share,
            "interventions": {"clipped": 20, "skipped": 5, "rolled_back": 1},
        },
    }


def evidence(table: dict[str, dict[float, list[dict]]], higher=True):
    """``table[spec][level]`` = one row per seed."""
    cands = [Candidate(s, s, "") for s in table]
    levels = sorted({lv for per in table.values() for lv in per})
    seeds = max(len(r) for per in table.values() for r in per.values())
    rows = gather(
        cands,
        levels,
        seeds,
        0.1,
        lambda spec, level, seed: (table[spec].get(level) or [None] * seeds)[seed],
        use_metric=True,
    )
    chosen, trains = choose(rows, higher)
    return {r.spec: r for r in rows}, chosen, trains


def ok(metric=0.9, loss=0.1, share=0.1, n=2):
    return [row("", 0, s, metric=metric + 0.001 * s, loss=loss, share=share) for s in range(n)]


def bad(n=2, first_ok=False):
    return [row("", 0, s, diverged=not (first_ok and s == 0)) for s in range(n)]


def test_evidence_counts_divergences_margin_and_interventions():
    rows, _, _ = evidence({"a": {1.0: ok(), 3.0: ok(), 10.0: bad(first_ok=True)}})
    a = rows["a"]
    assert a.runs == {"x1": [0, 2], "x3": [0, 2], "x10": [1, 2]}
    assert a.margin == 3.0 and a.margin_lr == 0.3
    assert a.score == pytest.approx(0.9005) and a.score_n == 2
    assert a.clipped == pytest.approx(0.2) and a.skipped == pytest.approx(0.06)
    assert a.reasons == ["x10 seed 1: nonfinite_weights"]


def test_a_margin_is_the_highest_level_up_to_which_every_level_trained():
    rows, _, _ = evidence({"a": {1.0: ok(), 3.0: bad(), 10.0: ok()}, "b": {1.0: bad(), 3.0: ok()}})
    assert rows["a"].margin == 1.0  # x10 trained, but x3 did not
    assert rows["b"].margin is None


def test_what_diverges_at_the_users_lr_is_never_chosen_over_what_trains():
    _, chosen, trains = evidence(
        {
            "wide": {1.0: bad(first_ok=True), 3.0: ok(), 10.0: ok()},
            "plain": {1.0: ok(0.8), 3.0: bad()},
        }
    )
    assert chosen.spec == "plain" and trains


def test_among_equally_good_ones_the_widest_margin_wins():
    rows, chosen, _ = evidence(
        {
            "none": {1.0: ok(0.95), 3.0: bad()},
            "clip": {1.0: ok(0.951), 3.0: ok(), 10.0: bad()},
            "agc": {1.0: ok(0.949), 3.0: ok(), 10.0: ok()},
        }
    )
    assert all(r.in_band for r in rows.values())
    assert chosen.spec == "agc" and [rows[s].rank for s in ("agc", "clip", "none")] == [1, 2, 3]


def test_a_wider_margin_does_not_buy_a_worse_score():
    rows, chosen, _ = evidence(
        {"fast": {1.0: ok(0.95), 3.0: bad()}, "safe": {1.0: ok(0.90), 3.0: ok(), 10.0: ok()}}
    )
    assert chosen.spec == "fast" and not rows["safe"].in_band


def test_seed_noise_widens_the_band():
    steady = [row("", 0, s, metric=0.95) for s in range(2)]
    close = [row("", 0, s, metric=0.94) for s in range(2)]
    # 1 point below the best with no seed noise: not as good (the floor is half a point)
    rows, chosen, _ = evidence({"fast": {1.0: steady, 3.0: bad()}, "safe": {1.0: close, 3.0: ok()}})
    assert not rows["safe"].in_band and chosen.spec == "fast"
    # the same mean when its seeds disagree by 8 points: within the noise
    noisy = [row("", 0, 0, metric=0.98), row("", 0, 1, metric=0.90)]
    rows, chosen, _ = evidence({"fast": {1.0: steady, 3.0: bad()}, "safe": {1.0: noisy, 3.0: ok()}})
    assert rows["safe"].in_band and chosen.spec == "safe"
    # but never more than 2 points below, however noisy
    wild = [row("", 0, 0, metric=0.99), row("", 0, 1, metric=0.85)]
    rows, chosen, _ = evidence({"fast": {1.0: steady, 3.0: bad()}, "safe": {1.0: wild, 3.0: ok()}})
    assert not rows["safe"].in_band and chosen.spec == "fast"


def test_a_slower_policy_is_out_of_the_band_even_when_the_score_saturates():
    rows, chosen, _ = evidence(
        {
            "clip": {1.0: ok(1.0, loss=0.007), 3.0: ok(1.0), 10.0: bad()},
            "agc": {1.0: ok(1.0, loss=0.032), 3.0: ok(1.0), 10.0: ok(1.0)},
        }
    )
    assert not rows["agc"].in_band and chosen.spec == "clip"


def test_overhead_then_chain_length_break_ties():
    _, chosen, _ = evidence(
        {
            "a+b": {1.0: ok(share=0.2), 3.0: ok()},
            "a": {1.0: ok(share=0.2), 3.0: ok()},
            "c": {1.0: ok(share=0.3), 3.0: ok()},
        }
    )
    assert chosen.spec == "a"


def test_at_the_same_score_the_lower_final_loss_wins_over_the_lower_overhead():
    """Both in the band (the loss within its tolerance), the same score and margin: the one that
    converged further is chosen although it costs more time (the overhead depends on the
    machine; the loss does not)."""
    rows, chosen, _ = evidence(
        {
            "cheap": {1.0: ok(metric=1.0, loss=0.0030, share=0.1), 3.0: bad()},
            "steady": {1.0: ok(metric=1.0, loss=0.0029, share=0.3), 3.0: bad()},
        }
    )
    assert rows["cheap"].in_band and rows["steady"].in_band
    assert chosen.spec == "steady"


def test_a_lower_is_better_score():
    _, chosen, _ = evidence(
        {"low": {1.0: ok(metric=0.10), 3.0: bad()}, "high": {1.0: ok(metric=0.30), 3.0: ok()}},
        higher=False,
    )
    assert chosen.spec == "low"


def test_when_nothing_trains_at_the_users_lr_the_least_diverging_is_named():
    _, chosen, trains = evidence(
        {
            "a": {1.0: bad()},
            "b": {1.0: bad(first_ok=True)},
            "c": {1.0: [row("", 0, 0, failed=True), *bad(1)]},
        }
    )
    assert chosen.spec == "b" and not trains


def test_a_run_that_raised_counts_as_diverged_with_its_error():
    rows, _, _ = evidence({"a": {1.0: [row("", 0, 0, failed=True), row("", 0, 1)]}})
    assert rows["a"].runs["x1"] == [1, 2] and rows["a"].reasons == [
        "x1 seed 0: raised GradGuardError: cannot recover"
    ]


def at_chance(n=2, stored_before_outcomes=True):
    """Runs that ended at chance with calm norms: as stored before outcomes (``diverged``) or
    now (``did_not_learn``, not ``diverged``)."""
    rows = [row("", 0, s, metric=0.1) for s in range(n)]
    for r in rows:
        if stored_before_outcomes:
            r["result"].update(diverged=True, diverged_reason="at_chance")
        else:
            r["result"].update(
                outcome="did_not_learn",
                diverged=False,
                did_not_learn=True,
                diverged_reason="at_chance",
            )
    return rows


def test_a_run_that_did_not_learn_fails_as_one_that_diverged():
    """Not a divergence any more, but no more a run that trained: it never reaches the target."""
    rows, chosen, trains = evidence(
        {"a": {1.0: at_chance(stored_before_outcomes=False)}, "b": {1.0: bad(first_ok=True)}}
    )
    assert rows["a"].runs["x1"] == [2, 2] and rows["a"].margin is None
    assert rows["a"].reasons == ["x1 seed 0: at_chance", "x1 seed 1: at_chance"]
    assert chosen.spec == "b" and not trains
    # Beside a policy that trains, it is never chosen.
    _, chosen, trains = evidence(
        {"a": {1.0: at_chance(stored_before_outcomes=False)}, "c": {1.0: ok()}}
    )
    assert chosen.spec == "c" and trains


@pytest.mark.parametrize("stored_before_outcomes", [True, False])
def test_when_the_runs_only_fail_to_learn_the_answer_says_they_are_too_short(
    stored_before_outcomes,
):
    """A policy that kept every seed finite where others blew up, but ended at chance (a task
    that needs more steps than the probe ran): the advice is longer runs, not a lower LR."""
    from types import SimpleNamespace

    from gradguard.advice.advisor import _reason

    rows, chosen, trains = evidence(
        {"none": {1.0: bad()}, "clip_norm:1": {1.0: at_chance(2, stored_before_outcomes)}}
    )
    assert chosen.spec == "clip_norm:1" and not trains
    probe = SimpleNamespace(rows=[SimpleNamespace(steps_run=300)], trains_up_to=None)
    text = _reason(chosen, list(rows.values()), trains, probe, 0.3, True, "test accuracy")
    assert "clip_norm:1 kept every seed finite at lr 0.3 where none blew up" in text
    assert "too short" in text and "nor did unguarded training at any lower LR" in text
    assert "Lower the LR" not in text

    # A chosen policy that itself blew up: lower the LR.
    rows, chosen, trains = evidence({"none": {1.0: bad()}, "zclip": {1.0: bad(first_ok=True)}})
    probe = SimpleNamespace(rows=[SimpleNamespace(steps_run=300)], trains_up_to=0.3)
    text = _reason(chosen, list(rows.values()), trains, probe, 0.3, True, "test accuracy")
    assert "Lower the LR (unguarded training trains up to lr 0.09)" in text


def test_the_why_states_the_ranking_rule_and_what_kept_each_higher_scorer_out():
    """The chosen row need not score highest: the why says by which rule it won and, for each
    candidate that scored higher, what ranked it lower (failed seeds, the final loss, the margin)."""
    from types import SimpleNamespace

    from gradguard.advice.advisor import RANKING_RULE, _reason, _why_lower

    rows, chosen, trains = evidence(
        {
            "lossy": {1.0: ok(metric=0.963, loss=0.5), 3.0: ok()},
            "fragile": {1.0: [*ok(metric=0.98, n=1), *bad(n=1)], 3.0: ok()},
            "narrow": {1.0: ok(metric=0.962, loss=0.1), 3.0: bad()},
            "chosen": {1.0: ok(metric=0.96, loss=0.1), 3.0: ok()},
            "worse": {1.0: ok(metric=0.5, loss=0.1), 3.0: ok()},
        }
    )
    assert chosen.spec == "chosen" and trains
    probe = SimpleNamespace(rows=[], trains_up_to=3.0)
    text = _reason(chosen, list(rows.values()), trains, probe, 0.3, True, "test accuracy")
    assert RANKING_RULE in text
    assert "the best accuracy" not in text  # it is not: three candidates scored higher
    assert "fragile (0.98: diverged or did not learn in 1/2 seeds at your LR)" in text
    assert "lossy (0.9635: final loss 0.5, above the noise of the lowest, 0.1)" in text
    assert "and 1 more (the evidence table has them)" in text  # the two highest are named
    assert _why_lower(rows["narrow"], chosen) == (
        "narrow (0.9625: within the noise of the best, with a narrower LR margin, x1)"
    )
    assert "worse" not in text
    assert "kept training at higher LRs" not in text  # none survived more than the chosen x3
    assert rows["worse"].excluded == "score outside the seeds' noise of the best, 0.9635"
    assert chosen.excluded == "" and rows["narrow"].excluded == ""

    # The best scorer chosen: said so, and nothing is listed as ranked lower.
    rows, chosen, trains = evidence({"a": {1.0: ok(metric=0.95)}, "b": {1.0: ok(metric=0.9)}})
    text = _reason(chosen, list(rows.values()), trains, probe, 0.3, True, "test accuracy")
    assert "(the best accuracy of all candidates)" in text and "ranked lower" not in text


def test_recommending_none_says_the_guard_still_skips_nonfinite_steps():
    from types import SimpleNamespace

    from gradguard.advice.advisor import _reason

    rows, chosen, trains = evidence(
        {"none": {1.0: ok(metric=0.95), 3.0: ok()}, "clip_norm:1": {1.0: ok(metric=0.9)}}
    )
    assert chosen.spec == "none" and trains
    text = _reason(chosen, list(rows.values()), trains, SimpleNamespace(rows=[]), 0.3, True, "acc")
    assert "policy='none' still skips a step whose loss or gradient is not finite" in text


def test_the_why_names_a_wider_margin_that_ranked_lower():
    """A candidate that kept training at a higher LR than the chosen one but scored lower: the
    why says so and what kept it out (the margin decides only among the ones as good)."""
    from types import SimpleNamespace

    from gradguard.advice.advisor import _reason

    rows, chosen, trains = evidence(
        {
            "best": {1.0: ok(metric=0.96, loss=0.01), 3.0: ok(), 10.0: bad()},
            "sturdy": {1.0: ok(metric=0.9, loss=0.01), 3.0: ok(), 10.0: ok()},
        }
    )
    assert chosen.spec == "best" and rows["sturdy"].margin == 10
    text = _reason(chosen, list(rows.values()), trains, SimpleNamespace(rows=[]), 0.3, True, "acc")
    assert "kept training at higher LRs but ranked lower: sturdy (up to x10: score outside" in text
