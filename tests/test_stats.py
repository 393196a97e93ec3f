"""jeat.stats against intervals computed by hand (t quantiles from tables)."""

from __future__ import annotations

import json
import math

import pytest

from jeat.errors import JeatError
from jeat.stats import (
    ANECDOTE,
    NO_DIFFERENCE,
    paired_difference,
    read_summary,
    summarize_study,
    summary_markdown,
    t_interval,
)


def test_three_values_by_hand():
    # mean 2, sd 1, t_{0.975, 2} = 4.3027: half-width 4.3027 / sqrt(3) = 2.4841
    i = t_interval([1, 2, 3])
    assert i.mean == 2 and i.n == 3 and i.sd == pytest.approx(1.0)
    assert i.half_width == pytest.approx(2.4841, abs=1e-4)
    assert i.low == pytest.approx(-0.4841, abs=1e-4)
    assert i.high == pytest.approx(4.4841, abs=1e-4)


def test_five_values_by_hand():
    # mean 95, squared deviations 0 + 1 + 1 + 4 + 4 = 10, sd = sqrt(10 / 4) = 1.5811,
    # t_{0.975, 4} = 2.7764: half-width 2.7764 * 1.5811 / sqrt(5) = 1.9632
    i = t_interval([95, 96, 94, 97, 93])
    assert i.mean == pytest.approx(95.0)
    assert i.half_width == pytest.approx(1.9632, abs=1e-4)
    # 90%: t_{0.95, 4} = 2.1318: half-width 1.5074
    assert t_interval([95, 96, 94, 97, 93], 0.90).half_width == pytest.approx(1.5074, abs=1e-4)


def test_one_seed_is_an_anecdote():
    i = t_interval([42.0])
    assert i.mean == 42.0 and i.low is None and i.high is None and i.n == 1
    assert ANECDOTE in i.text()
    d = paired_difference([3.0], [1.0])
    assert d.interval.mean == 2.0 and d.verdict == ANECDOTE


def test_paired_difference_verdicts_by_hand():
    # differences 2, 3, 1, 4: mean 2.5, sd sqrt(5 / 3) = 1.2910, t_{0.975, 3} = 3.1824:
    # half-width 3.1824 * 1.2910 / 2 = 2.0543, interval [0.4457, 4.5543] > 0
    d = paired_difference([3, 5, 4, 6], [1, 2, 3, 2], names=("jeat", "pgdat"))
    assert d.interval.mean == pytest.approx(2.5)
    assert d.interval.low == pytest.approx(0.4457, abs=1e-4)
    assert d.interval.high == pytest.approx(4.5543, abs=1e-4)
    assert d.verdict == "A higher" and d.a == "jeat" and d.b == "pgdat"
    # the same seeds the other way round
    assert paired_difference([1, 2, 3, 2], [3, 5, 4, 6]).verdict == "A lower"
    # differences 1, -1, 2: mean 0.6667, sd sqrt(7 / 3) = 1.5275, half-width
    # 4.3027 * 1.5275 / sqrt(3) = 3.7946: the interval [-3.128, 4.461] contains zero
    d = paired_difference([2, 0, 4], [1, 1, 2])
    assert d.interval.low == pytest.approx(-3.1279, abs=1e-3)
    assert d.interval.high == pytest.approx(4.4613, abs=1e-3)
    assert d.verdict == NO_DIFFERENCE
    # pairing matters: unpaired, these two would overlap completely
    assert paired_difference([10, 20, 30], [9, 19, 29]).verdict == "A higher"


def test_bad_input_is_a_jeat_error():
    with pytest.raises(JeatError, match="no values"):
        t_interval([])
    with pytest.raises(JeatError, match="finite"):
        t_interval([1.0, math.nan])
    with pytest.raises(JeatError, match="finite"):
        t_interval([1.0, "2"])  # type: ignore[list-item]
    with pytest.raises(JeatError, match="between 0 and 1"):
        t_interval([1.0, 2.0], level=95)
    with pytest.raises(JeatError, match="one value per seed"):
        paired_difference([1, 2, 3], [1, 2])


def _cell(variant, seed, clean, fid):
    return {
        "dataset": "digits",
        "variant": variant,
        "seed": seed,
        "run": f"cells/digits/{variant}/seed{seed}",
        "metrics": {"clean": clean, "fid_descent": fid},
    }


def test_summary_groups_and_differences(tmp_path):
    cells = [
        _cell("pgdat", 1, 2.0, 10.0),
        _cell("pgdat", 0, 1.0, 11.0),
        _cell("pgdat", 2, 3.0, 12.0),
        _cell("jeat", 0, 2.0, 8.0),
        _cell("jeat", 1, 5.0, 8.0),
        _cell("jeat", 2, 4.0, 9.0),
        _cell("jem", 0, 50.0, None),
    ]
    s = summarize_study(
        cells,
        ["clean", "fid_descent"],
        pairs=[("jeat", "pgdat")],
        difference_metrics=["clean", "fid_descent"],
        commit="abc",
        budget="smoke",
    )
    assert s["kind"] == "jeat-study" and s["version"] == 1 and s["commit"] == "abc"
    pgd = next(g for g in s["groups"] if g["variant"] == "pgdat")
    assert pgd["n_seeds"] == 3 and pgd["runs"][0] == "cells/digits/pgdat/seed0"
    assert pgd["metrics"]["clean"]["values"] == [1.0, 2.0, 3.0]  # sorted by seed
    assert pgd["metrics"]["clean"]["low"] == pytest.approx(-0.4841, abs=1e-4)
    jem = next(g for g in s["groups"] if g["variant"] == "jem")
    assert jem["metrics"]["clean"]["low"] is None and jem["metrics"]["fid_descent"] is None
    clean = next(d for d in s["differences"] if d["metric"] == "clean")
    # differences 1, 3, 1: mean 5/3, sd sqrt(4/3) = 1.1547, half-width 2.8685
    assert clean["mean"] == pytest.approx(5 / 3)
    assert clean["high"] - clean["mean"] == pytest.approx(2.8685, abs=1e-3)
    assert clean["verdict"] == NO_DIFFERENCE
    fid = next(d for d in s["differences"] if d["metric"] == "fid_descent")
    # seeds 0, 1, 2: 8 - 11, 8 - 10, 9 - 12 = -3, -2, -3: mean -2.6667, sd 0.5774,
    # half-width 4.3027 * 0.5774 / sqrt(3) = 1.4342: [-4.1009, -1.2324], below zero
    assert fid["mean"] == pytest.approx(-8 / 3)
    assert fid["high"] == pytest.approx(-1.2324, abs=1e-3) and fid["verdict"] == "A lower"
    (tmp_path / "summary.json").write_text(json.dumps(s))
    assert read_summary(tmp_path)["groups"] == s["groups"]
    text = summary_markdown(s, [("clean", "clean %", 2), ("fid_descent", "FID", 1)])
    assert "| jeat | 3 | 3.67 ± " in text and "A lower" in text and "50.00 (n=1)" in text


def test_summary_rejects_bad_studies(tmp_path):
    with pytest.raises(JeatError, match="seed twice"):
        summarize_study([_cell("a", 0, 1.0, 1.0), _cell("a", 0, 2.0, 1.0)], ["clean"])
    with pytest.raises(JeatError, match="budget"):
        summarize_study([], ["clean"], budget="huge")
    with pytest.raises(JeatError, match="does not exist"):
        read_summary(tmp_path)
    (tmp_path / "summary.json").write_text('{"kind": "other"}')
    with pytest.raises(JeatError, match="not a jeat study"):
        read_summary(tmp_path)
