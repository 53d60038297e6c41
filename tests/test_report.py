"""The offline report: its statistics, its figures against counts computed here from the
synthetic calls, label joins, verdicts, bad input, bounded reading, HTML, JSON and CLI."""

from __future__ import annotations

import argparse
import json
import math
import random
import subprocess
import sys
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import orjson
import pytest

import proxy.compare.report as report_module
from proxy.compare.html import render_html
from proxy.compare.report import (
    Report,
    ReportInputError,
    Thresholds,
    add_report_parser,
    build_report,
    read_labels_file,
    render_text,
    run_report,
)
from proxy.compare.stats import (
    Confusion,
    LogHistogram,
    Proportion,
    TimeBuckets,
    TopN,
    wilson_interval,
)
from proxy.compare.traces import read_calls
from tests.trace_files import START_NS, Answer, Call, call_spans, write_calls, write_traces

ROOT = Path(__file__).resolve().parent.parent

# ---------------------------------------------------------------------------------------
# Statistics


@pytest.mark.parametrize(
    ("successes", "total", "low", "high"),
    [
        # Newcombe (1998), "Two-sided confidence intervals for the single proportion",
        # Table I, method 3 (Wilson score, no continuity correction).
        (81, 263, 0.2553, 0.3662),
        (15, 148, 0.0624, 0.1605),
        (0, 20, 0.0, 0.1611),
        (1, 29, 0.0061, 0.1718),
        (29, 29, 0.8830, 1.0),
    ],
)
def test_wilson_interval_matches_published_values(
    successes: int, total: int, low: float, high: float
) -> None:
    got_low, got_high = wilson_interval(successes, total)
    assert got_low == pytest.approx(low, abs=1e-4)
    assert got_high == pytest.approx(high, abs=1e-4)


def test_wilson_interval_edges() -> None:
    assert wilson_interval(0, 0) == (0.0, 1.0)
    assert wilson_interval(100, 100)[1] == 1.0
    assert wilson_interval(100, 100)[0] == pytest.approx(0.963, abs=1e-3)
    with pytest.raises(ValueError):
        wilson_interval(3, 2)
    empty = Proportion.of(0, 0)
    assert empty.rate is None and empty.low is None
    half = Proportion.of(5, 10)
    assert half.rate == 0.5 and half.low is not None and half.low < 0.5 < (half.high or 0)


@pytest.mark.parametrize("seed", [1, 2])
def test_log_histogram_quantiles_within_two_percent_of_numpy(seed: int) -> None:
    rng = np.random.default_rng(seed)
    values = np.concatenate([rng.lognormal(np.log(5.0), 0.5, 20_000), rng.exponential(200.0, 300)])
    histogram = LogHistogram(0.01)
    for value in values:
        histogram.add(float(value))
    for q in (0.5, 0.9, 0.99, 0.999):
        expected = float(np.quantile(values, q))
        assert histogram.quantile(q) == pytest.approx(expected, rel=0.02), q
    assert histogram.max == pytest.approx(float(values.max()))
    assert histogram.min == pytest.approx(float(values.min()))
    assert histogram.mean == pytest.approx(float(values.mean()))
    assert histogram.count == len(values)
    # Bounded: the number of buckets does not grow with the number of values.
    assert len(histogram.counts) < 1200

    # Two halves merged answer like the whole.
    first, second = LogHistogram(0.01), LogHistogram(0.01)
    for i, value in enumerate(values):
        (first if i % 2 else second).add(float(value))
    first.merge(second)
    assert first.counts == histogram.counts
    assert first.quantile(0.99) == histogram.quantile(0.99)


def test_log_histogram_zero_and_empty() -> None:
    histogram = LogHistogram()
    assert histogram.quantile(0.5) is None
    for value in (0.0, 0.0, 0.0, 10.0):
        histogram.add(value)
    assert histogram.quantile(0.5) == 0.0
    assert histogram.quantile(1.0) == 10.0


def test_time_buckets_stay_bounded_and_merge_exactly() -> None:
    rng = random.Random(3)
    times = [START_NS + rng.randrange(0, 3_600 * 10**9) for _ in range(5_000)]
    whole = TimeBuckets(2, max_buckets=50)
    first, second = TimeBuckets(2, max_buckets=50), TimeBuckets(2, max_buckets=50)
    for i, t in enumerate(times):
        whole.add(t, "k", (1, i % 3 == 0))
        (first if t < START_NS + 1_000 * 10**9 else second).add(t, "k", (1, i % 3 == 0))
    rows = list(whole.rows())
    assert len(rows) <= 50
    assert sum(bucket["k"][0] for _, bucket in rows if "k" in bucket) == 5_000
    assert sum(bucket["k"][1] for _, bucket in rows if "k" in bucket) == len(
        [i for i in range(5_000) if i % 3 == 0]
    )
    # Every time falls in the bucket that starts at or before it.
    for t in times[:100]:
        start = (t // whole.width_ns) * whole.width_ns
        assert any(s == start for s, _ in rows)
    first.merge(second)
    assert first.width_ns == whole.width_ns
    assert list(first.rows()) == rows


def test_top_n_keeps_largest_and_earliest_on_ties() -> None:
    top: TopN[str] = TopN(3)
    for key, item in [(1, "a"), (5, "b"), (3, "c"), (5, "d"), (0, "e"), (4, "f")]:
        top.offer(key, item)
    assert top.items() == ["b", "d", "f"]
    other: TopN[str] = TopN(3)
    other.offer(5, "g")
    other.offer(9, "h")
    top.merge(other)
    assert top.items() == ["h", "b", "d"]
    built: list[int] = []

    def make(value: int) -> Callable[[], int]:
        def build() -> int:
            built.append(value)
            return value

        return build

    lazy: TopN[int] = TopN(1)
    lazy.offer(2, make(2))
    lazy.offer(1, make(1))  # never built: it would not be kept
    assert built == [2] and lazy.items() == [2]


def test_confusion_caps_labels() -> None:
    confusion = Confusion(max_labels=3)
    for a, b in [("1", "1"), ("2", "1"), ("3", "3"), ("4", "4"), ("1", "5")]:
        confusion.add(a, b)
    labels, matrix = confusion.matrix()
    assert labels == ["1", "2", "3", "(other)"]
    assert confusion.other == 2
    assert sum(map(sum, matrix)) == 5
    assert matrix[labels.index("(other)")][labels.index("(other)")] == 1


# ---------------------------------------------------------------------------------------
# A scenario, and what the report must say about it, computed here


def _scenario(n: int, seed: int) -> tuple[list[Call], dict[str, list[str]]]:
    """Calls with a production, a shadow 'cand' and sometimes a reference 'ref'; and the
    true labels of about 70% of them."""
    rng = random.Random(seed)
    calls: list[Call] = []
    truth: dict[str, list[str]] = {}
    classes = ["0", "1", "2"]
    for i in range(n):
        rows = 1 if rng.random() < 0.8 else rng.randint(2, 3)
        request_id = f"r{i:05d}"
        start = START_NS + i * 50_000_000 + rng.randrange(10_000_000)
        status = rng.choices([0, 14, 3], [0.9, 0.05, 0.05])[0]
        prod_labels = [rng.choice(classes) for _ in range(rows)] if status == 0 else None
        production = Answer(
            "prod", "production", status, rng.lognormvariate(math.log(4), 0.4), prod_labels
        )
        call = Call(request_id, production, start_ns=start)
        # On borderline inputs the production model itself is not deterministic: the
        # reference and the shadow both flip there often, which is the noise to excuse.
        borderline = rng.random() < 0.2
        flip_ref, flip_cand = (0.6, 0.5) if borderline else (0.0, 0.05)
        reference = None
        if rng.random() < 0.4:
            ref_labels = (
                [
                    lbl if rng.random() >= flip_ref else next(c for c in classes if c != lbl)
                    for lbl in prod_labels
                ]
                if prod_labels
                else None
            )
            reference = _answer("ref", "reference", status, ref_labels, prod_labels, rng)
            call.others.append(reference)
        route = rng.random()
        if route < 0.1:
            call.sampled_out.append("cand")
        elif route < 0.15:
            call.dropped.append("cand")
        elif route < 0.17:
            call.lost.append("cand")
        else:
            cand_status = 0 if rng.random() < 0.9 else 4
            cand_labels = None
            if cand_status == 0:
                cand_labels = [
                    (lbl if rng.random() >= flip_cand else next(c for c in classes if c != lbl))
                    for lbl in (prod_labels or [rng.choice(classes) for _ in range(rows)])
                ]
            call.others.append(
                _answer("cand", "shadow", cand_status, cand_labels, prod_labels, rng)
            )
        if rng.random() < 0.7:
            truth[request_id] = [rng.choice(classes) for _ in range(rows)]
        calls.append(call)
    return calls, truth


def _answer(
    name: str,
    role: str,
    status: int,
    labels: list[str] | None,
    production: list[str] | None,
    rng: random.Random,
) -> Answer:
    answer = Answer(name, role, status, rng.lognormvariate(math.log(6), 0.5), labels)
    if labels is not None and production is not None:
        differ = labels != production
        answer.compared = True
        answer.agree = not differ
        answer.differing = (["label"] if differ else []) + (
            ["probabilities"] if differ or rng.random() < 0.5 else []
        )
        answer.max_abs_diff = (1.0 if differ else 0.0) + rng.random() * 0.1
        answer.mean_abs_diff = answer.max_abs_diff * rng.random()
    elif labels is not None or production is not None:
        answer.compared = False
    return answer


def _expected(calls: list[Call], truth: dict[str, list[str]]) -> dict[str, Any]:
    """The figures, counted straight from the call descriptions."""
    e: dict[str, Any] = {
        "latency": {"prod": [], "cand": [], "ref": []},
        "errors": {"prod": Counter(), "cand": Counter(), "ref": Counter()},
        "calls": Counter(),
        "compared": Counter(),
        "agreed": Counter(),
        "noise": 0,
        "real_ids": set(),
        "excess": 0,
        "rows": Counter(),
        "correct": Counter(),
        "confusion": Counter(),
        "dropped": 0,
        "sampled_out": 0,
        "lost": 0,
        "labelled_calls": 0,
        "max_diff": {"cand": 0.0, "ref": 0.0},
    }
    for call in calls:
        assert call.production is not None
        answers = [call.production, *call.others]
        e["dropped"] += "cand" in call.dropped
        e["sampled_out"] += "cand" in call.sampled_out
        e["lost"] += "cand" in call.lost
        known = truth.get(call.request_id)
        e["labelled_calls"] += known is not None
        ref = next((a for a in call.others if a.name == "ref"), None)
        for a in answers:
            e["calls"][a.name] += 1
            e["latency"][a.name].append(a.latency_ms)
            if a.status:
                e["errors"][a.name][a.status] += 1
            if known and a.labels:
                e["rows"][a.name] += len(a.labels)
                e["correct"][a.name] += sum(x == y for x, y in zip(known, a.labels, strict=True))
            if a is call.production:
                continue
            if a.compared:
                e["compared"][a.name] += 1
                e["agreed"][a.name] += bool(a.agree)
                e["max_diff"][a.name] = max(e["max_diff"][a.name], a.max_abs_diff or 0.0)
            if a.name == "cand":
                if a.status and not call.production.status:
                    e["excess"] += 1
                if a.compared and not a.agree:
                    noisy = (
                        ref is not None
                        and bool(ref.compared)
                        and set(a.differing or ()) <= set(ref.differing or ())
                    )
                    if noisy:
                        e["noise"] += 1
                    else:
                        e["real_ids"].add(call.request_id)
                if a.labels and call.production.labels:
                    for x, y in zip(call.production.labels, a.labels, strict=True):
                        e["confusion"][x, y] += 1
    return e


@pytest.fixture(scope="module")
def scenario(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    calls, truth = _scenario(600, seed=7)
    expected = _expected(calls, truth)
    folder = tmp_path_factory.mktemp("scenario")
    # Feedback spans come after all the calls; spans shuffled across small lines.
    path = write_calls(
        folder / "traces.jsonl",
        calls,
        feedback=sorted(truth.items()),
        per_line=37,
        shuffle_window=9,
    )
    report = build_report(path, top=5, jobs=1)
    return {"calls": calls, "truth": truth, "expected": expected, "path": path, "report": report}


def test_figures_match_counts_computed_from_the_calls(scenario: dict[str, Any]) -> None:
    e = scenario["expected"]
    report: Report = scenario["report"]
    assert report.calls == len(scenario["calls"])
    assert [b.column for b in report.backends] == [
        "production:prod",
        "shadow:cand",
        "reference:ref",
    ]
    names = {"prod": "OK"}
    for backend in report.backends:
        name = backend.name
        assert backend.calls == e["calls"][name], name
        assert backend.errors == sum(e["errors"][name].values())
        codes = {14: "UNAVAILABLE", 3: "INVALID_ARGUMENT", 4: "DEADLINE_EXCEEDED"}
        assert backend.errors_by_code == {codes[c]: n for c, n in e["errors"][name].items()}
        latencies = np.array(e["latency"][name])
        assert backend.latency.p50_ms == pytest.approx(np.quantile(latencies, 0.5), rel=0.02)
        assert backend.latency.p90_ms == pytest.approx(np.quantile(latencies, 0.9), rel=0.02)
        assert backend.latency.max_ms == pytest.approx(latencies.max(), rel=1e-6)
        assert backend.accuracy is not None
        assert backend.accuracy.total == e["rows"][name]
        assert backend.accuracy.successes == e["correct"][name]
        if name in names:
            continue
        assert backend.compared == e["compared"][name]
        assert backend.agreement is not None
        assert backend.agreement.successes == e["agreed"][name]
        low, high = wilson_interval(e["agreed"][name], e["compared"][name])
        assert (backend.agreement.low, backend.agreement.high) == (low, high)
        assert backend.max_abs_diff == pytest.approx(e["max_diff"][name])

    cand = report.backend("shadow", "cand")
    assert cand.noise == e["noise"] and e["noise"] > 0
    assert cand.real == len(e["real_ids"]) and cand.real > 0
    assert cand.disagreements == cand.noise + cand.real
    assert cand.noise_adjusted_agreement is not None
    assert cand.noise_adjusted_agreement.successes == e["agreed"]["cand"] + e["noise"]
    assert cand.excess_errors == e["excess"]
    assert (cand.dropped, cand.sampled_out, cand.missing_spans) == (
        e["dropped"],
        e["sampled_out"],
        e["lost"],
    )
    assert cand.sent == e["calls"]["cand"] + e["lost"]
    ref = report.backend("reference", "ref")
    assert ref.noise_rate is not None
    assert ref.noise_rate.successes == e["compared"]["ref"] - e["agreed"]["ref"]

    assert cand.confusion is not None
    labels = cand.confusion.labels
    got = {
        (labels[i], labels[j]): n
        for i, row in enumerate(cand.confusion.matrix)
        for j, n in enumerate(row)
        if n
    }
    assert got == dict(e["confusion"])

    # Top disagreements: real ones, the largest differences, with their trace ids.
    by_id = {c.request_id: c for c in scenario["calls"]}
    assert len(cand.top_disagreements) == 5
    real = sorted(
        (by_id[i] for i in e["real_ids"]),
        key=lambda c: -(next(a for a in c.others if a.name == "cand").max_abs_diff or 0),
    )
    assert [d.request_id for d in cand.top_disagreements] == [c.request_id for c in real[:5]]
    for d in cand.top_disagreements:
        assert d.kind == "real"
        assert d.trace_id == by_id[d.request_id].trace_id

    assert report.labels.feedback_request_ids == len(scenario["truth"])
    assert report.labels.labelled_calls == e["labelled_calls"]
    assert report.labels.unmatched_request_ids == 0


def test_text_report_shows_every_figure(scenario: dict[str, Any]) -> None:
    text = render_text(scenario["report"])
    cand = scenario["report"].backend("shadow", "cand")
    for needle in (
        "production",
        "cand",
        "ref",
        "latency p99 ms",
        "agreement",
        "noise rate",
        "UNAVAILABLE",
        "accuracy",
        "dropped",
        "sampled out",
        f"{cand.real:,}",
        cand.top_disagreements[0].trace_id,
        "Verdict",
    ):
        assert needle in text, needle


def _rounded(value: Any) -> Any:
    """Figures with floats to 9 digits: sums added in another order differ in the last."""
    if isinstance(value, float):
        return float(f"{value:.9g}")
    if isinstance(value, dict):
        return {k: _rounded(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_rounded(v) for v in value]
    return value


def test_bounded_buffer_and_parallel_reading_give_the_same_figures(
    scenario: dict[str, Any], tmp_path: Path
) -> None:
    whole = scenario["report"].to_dict()
    # The spans of a call are at most 9 apart: a buffer of 12 calls is enough.
    small = build_report(scenario["path"], top=5, jobs=1, buffer_calls=12).to_dict()
    # Two processes, each over half the file; calls cut by the boundary are joined.
    parallel = build_report(scenario["path"], top=5, jobs=2, buffer_calls=12).to_dict()
    for figures in (whole, small, parallel):
        for key in ("elapsed_s", "phases_s", "jobs"):
            figures.pop(key)
    assert small == whole
    assert _rounded(parallel) == _rounded(whole)


def test_a_buffer_too_small_for_the_disorder_says_so(tmp_path: Path) -> None:
    calls, _ = _scenario(120, seed=2)
    path = write_calls(tmp_path / "t.jsonl", calls, per_line=10, shuffle_window=40)
    report = build_report(path, buffer_calls=2)
    late = report.skipped.get("spans that came after their call was counted (raise --buffer-calls)")
    assert late
    assert any("raise --buffer-calls" in w for w in report.warnings)
    assert report.calls <= 120


# ---------------------------------------------------------------------------------------
# Noise


def _noise_call(request_id: str, shadow_differs: list[str], reference: list[str] | None) -> Call:
    production = Answer("prod", "production", labels=["1"])
    shadow = Answer(
        "cand",
        labels=["0" if "label" in shadow_differs else "1"],
        compared=True,
        agree=not shadow_differs,
        differing=shadow_differs,
        max_abs_diff=0.5,
        mean_abs_diff=0.1,
    )
    call = Call(request_id, production, [shadow])
    if reference is not None:
        call.others.append(
            Answer(
                "ref",
                "reference",
                labels=["1"],
                compared=True,
                agree="label" not in reference,
                differing=reference,
                max_abs_diff=0.1,
                mean_abs_diff=0.01,
            )
        )
    return call


def test_noise_is_a_difference_the_reference_also_showed(tmp_path: Path) -> None:
    calls = [
        # Shadow and reference differ on the same output: noise.
        _noise_call("noise-1", ["probabilities"], ["probabilities"]),
        _noise_call("noise-2", ["label", "probabilities"], ["label", "probabilities", "x"]),
        # The shadow differs on more than the reference did: real.
        _noise_call("real-1", ["label", "probabilities"], ["probabilities"]),
        # The reference agreed entirely: real.
        _noise_call("real-2", ["label"], []),
        # No reference on this call: cannot be excused.
        _noise_call("real-3", ["label"], None),
        # Agreement.
        _noise_call("same", [], ["probabilities"]),
    ]
    report = build_report(write_calls(tmp_path / "t.jsonl", calls))
    cand = report.backend("shadow", "cand")
    assert (cand.compared, cand.disagreements, cand.noise, cand.real) == (6, 5, 2, 3)
    assert cand.real_with_reference == 2
    kinds = {d.request_id: d.kind for d in cand.top_disagreements}
    assert kinds == {
        "noise-1": "noise",
        "noise-2": "noise",
        "real-1": "real",
        "real-2": "real",
        "real-3": "real",
    }
    assert [d.kind for d in cand.top_disagreements][:3] == ["real", "real", "real"]
    ref = report.backend("reference", "ref")
    assert ref.noise_rate is not None and ref.noise_rate.successes == 1  # noise-2's label
    assert ref.noise_rate.total == 5


# ---------------------------------------------------------------------------------------
# Labels


def _labelled_calls() -> list[Call]:
    calls = []
    for i, (prod, cand) in enumerate(
        [(["1"], ["1"]), (["0"], ["1"]), (["1", "0", "1"], ["1", "1", "1"]), (["2"], ["2"])]
    ):
        calls.append(
            Call(
                f"q{i}",
                Answer("prod", "production", labels=prod),
                [Answer("cand", labels=cand, compared=True, agree=prod == cand, differing=[])],
            )
        )
    return calls


@pytest.mark.parametrize("block", [8 << 20, 700, 3000])
def test_labels_from_feedback_spans_join_row_by_row(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, block: int
) -> None:
    # Small blocks: the first pass's search meets lines longer than a block, and lines
    # cut by a block's end.
    monkeypatch.setattr(report_module, "_SCAN_BYTES", block)
    feedback = [("q0", ["1"]), ("q1", ["0"]), ("q2", ["1", "0", "0"]), ("nobody", ["1"])]
    path = write_calls(tmp_path / "t.jsonl", _labelled_calls(), feedback, per_line=2)
    report = build_report(path, jobs=1 if block > 1000 else 2)
    prod, cand = report.backend("production", "prod"), report.backend("shadow", "cand")
    assert prod.accuracy is not None and cand.accuracy is not None
    # prod: q0 1/1, q1 1/1, q2 2/3 -> 4 of 5 rows; cand: 1/1, 0/1, 1/3 -> 2 of 5.
    assert (prod.accuracy.successes, prod.accuracy.total) == (4, 5)
    assert (cand.accuracy.successes, cand.accuracy.total) == (2, 5)
    assert report.labels.feedback_spans == 4
    assert report.labels.labelled_calls == 3
    assert report.labels.unmatched_request_ids == 1
    # read_calls, used by the demo, ignores the feedback spans.
    assert sorted(c.request_id for c in read_calls(tmp_path / "t.jsonl")) == [
        "q0",
        "q1",
        "q2",
        "q3",
    ]


def test_labels_file_csv_and_jsonl_with_batch_rows(tmp_path: Path) -> None:
    traces = write_calls(tmp_path / "t.jsonl", _labelled_calls(), [("q0", ["0"])])
    csv_file = tmp_path / "labels.csv"
    # A repeated request id is a batch call's next row; the file wins over feedback (q0).
    csv_file.write_text("request_id,label\nq0,1\nq2,1\nq2,0\nq2,0\nq3,2\n", encoding="utf-8")
    jsonl = tmp_path / "labels.jsonl"
    jsonl.write_text(
        '{"request_id": "q0", "label": 1}\n'
        '{"request_id": "q2", "label": [1, 0, 0]}\n'
        '{"request_id": "q3", "label": "2", "row": 0}\n',
        encoding="utf-8",
    )
    for labels in (csv_file, jsonl):
        report = build_report(traces, labels)
        prod = report.backend("production", "prod")
        assert prod.accuracy is not None
        # q0 1/1, q2 2/3, q3 1/1 -> 4 of 5 rows.
        assert (prod.accuracy.successes, prod.accuracy.total) == (4, 5), labels
        assert report.labels.file_request_ids == 3
        assert report.labels.overridden_by_file == 1
        assert report.labels.labelled_calls == 3


def test_labels_csv_with_row_column_and_gaps(tmp_path: Path) -> None:
    path = tmp_path / "labels.csv"
    path.write_text("row,label,request_id\n1,b,a\n0,a,a\n0,x,gap\n2,z,gap\n,q,\n", encoding="utf-8")
    labels, summary = read_labels_file(path)
    assert labels == {"a": ("a", "b")}
    assert summary.file_skipped_lines == 2
    assert any("gap" in error for error in summary.file_errors)


# ---------------------------------------------------------------------------------------
# Verdicts


def _verdict_calls(n: int, disagree: int, shadow_errors: int, shadow_latency: float) -> list[Call]:
    calls = []
    for i in range(n):
        ok = i >= shadow_errors
        same = i >= disagree
        calls.append(
            Call(
                f"v{i}",
                Answer("prod", "production", latency_ms=10.0, labels=["1"]),
                [
                    Answer(
                        "cand",
                        status=0 if ok else 13,
                        latency_ms=shadow_latency,
                        labels=(["1"] if same else ["0"]) if ok else None,
                        compared=ok,
                        agree=same if ok else None,
                        differing=[] if same else ["label"],
                    )
                ],
            )
        )
    return calls


@pytest.mark.parametrize(
    ("n", "disagree", "errors", "latency", "decision", "reason"),
    [
        (400, 4, 0, 12.0, "safe", ""),
        (400, 40, 0, 12.0, "not safe", "agreement"),
        (400, 0, 12, 12.0, "not safe", "failed where production succeeded"),
        (400, 0, 0, 20.0, "not safe", "p99 latency"),
        (50, 0, 0, 12.0, "cannot tell", "only 50 compared calls"),
    ],
)
def test_verdict_thresholds(
    tmp_path: Path,
    n: int,
    disagree: int,
    errors: int,
    latency: float,
    decision: str,
    reason: str,
) -> None:
    path = write_calls(tmp_path / "t.jsonl", _verdict_calls(n, disagree, errors, latency))
    report = build_report(path)
    verdict = report.backend("shadow", "cand").verdict
    assert verdict is not None
    assert verdict.decision == decision
    assert reason in " ".join(verdict.reasons)
    text = render_text(report)
    assert {"safe": "looks SAFE", "not safe": "NOT safe", "cannot tell": "CANNOT TELL"}[
        decision
    ] in text


def test_verdict_thresholds_are_configurable(tmp_path: Path) -> None:
    path = write_calls(tmp_path / "t.jsonl", _verdict_calls(400, 40, 0, 20.0))
    strict = build_report(path).backend("shadow", "cand").verdict
    lenient = (
        build_report(path, thresholds=Thresholds(min_agreement=0.85, max_latency_ratio=2.5))
        .backend("shadow", "cand")
        .verdict
    )
    assert strict is not None and strict.decision == "not safe" and len(strict.reasons) == 2
    assert lenient is not None and lenient.decision == "safe"
    with pytest.raises(ValueError):
        Thresholds(min_agreement=1.5)


def test_file_without_comparisons_gives_a_report_with_agreement_unknown(tmp_path: Path) -> None:
    calls = [
        Call(f"o{i}", Answer("prod", "production"), [Answer("cand", latency_ms=6.0)])
        for i in range(150)
    ]
    report = build_report(write_calls(tmp_path / "old.jsonl", calls))
    cand = report.backend("shadow", "cand")
    assert not report.agreement_known
    assert cand.agreement is None and cand.uncompared == 150
    assert cand.verdict is not None and cand.verdict.decision == "cannot tell"
    text = render_text(report)
    assert "agreement unknown" in text
    assert "unknown" in text.split("agreement", 1)[1].split("\n", 1)[0]


# ---------------------------------------------------------------------------------------
# Bad input


def test_missing_file_and_directory(tmp_path: Path) -> None:
    with pytest.raises(ReportInputError, match="does not exist"):
        build_report(tmp_path / "nope.jsonl")
    with pytest.raises(ReportInputError, match="directory"):
        build_report(tmp_path)
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n\n")
    with pytest.raises(ReportInputError, match="empty"):
        build_report(empty)


def test_file_that_is_not_otlp_json_names_the_line(tmp_path: Path) -> None:
    text = tmp_path / "log.txt"
    text.write_text("\n2024-01-01 INFO started\n")
    with pytest.raises(ReportInputError, match=r"log.txt:2: not OTLP JSON"):
        build_report(text)
    other = tmp_path / "other.json"
    other.write_text('{"data": [{"traceID": "x"}]}\n')
    with pytest.raises(ReportInputError, match=r"other.json:1: .*Jaeger"):
        build_report(other)


def test_bad_lines_in_the_middle_give_a_partial_report(tmp_path: Path) -> None:
    calls, _ = _scenario(60, seed=4)
    path = write_calls(
        tmp_path / "t.jsonl",
        calls,
        per_line=20,
        extra_lines=[(2, b'{"resourceSpans": [{"scopeSpans": [{"spans": ['), (4, b"[1, 2]")],
    )
    report = build_report(path)
    assert report.calls == 60
    assert report.skipped["lines that are not OTLP JSON"] == 2
    assert report.skipped_examples["lines that are not OTLP JSON"][0].startswith("line 3: not JSON")
    assert report.skipped_examples["lines that are not OTLP JSON"][1].startswith("line 5: not an")
    assert any("line 3" in w for w in report.warnings)


def test_calls_without_a_production_span_are_skipped_and_named(tmp_path: Path) -> None:
    calls, _ = _scenario(30, seed=5)
    rng = random.Random(1)
    spans = [s for c in calls for s in call_spans(c, rng)]
    never = Call("never", None)  # production never called (e.g. a too-large request)
    spans += call_spans(never, rng)
    cut = Call("cut", Answer("prod", "production"), [Answer("cand")])
    spans += [s for s in call_spans(cut, rng) if not s["name"].startswith("production")]
    report = build_report(write_traces(tmp_path / "t.jsonl", spans))
    assert report.calls == 30
    assert report.skipped["calls on which production was never called"] == 1
    assert report.skipped["calls whose production span is missing"] == 1
    assert "request cut" in report.skipped_examples["calls whose production span is missing"][0]
    assert "skipped" in render_text(report)

    only_bad = write_traces(tmp_path / "bad.jsonl", call_spans(Call("x", None), rng))
    with pytest.raises(ReportInputError, match="no call with a production span"):
        build_report(only_bad)


def test_labels_that_match_no_call_and_malformed_label_lines(tmp_path: Path) -> None:
    traces = write_calls(tmp_path / "t.jsonl", _labelled_calls())
    labels = tmp_path / "labels.jsonl"
    labels.write_text(
        '{"request_id": "zz1", "label": 1}\nnot json\n{"label": 2}\n{"request_id": "zz2", "label": 0}\n'
    )
    report = build_report(traces, labels)
    assert report.labels.file_skipped_lines == 2
    assert "labels.jsonl:2: not JSON" in report.labels.file_errors[0]
    assert ":3: no request_id" in report.labels.file_errors[1]
    assert any("none of its 2 request ids matches a call" in w for w in report.warnings)
    assert any("skipped 2 malformed" in w for w in report.warnings)
    assert all(b.accuracy is None for b in report.backends)

    no_header = tmp_path / "labels.csv"
    no_header.write_text("q0,1\n")
    with pytest.raises(ReportInputError, match="request_id and label"):
        build_report(traces, no_header)
    with pytest.raises(ReportInputError, match="does not exist"):
        build_report(traces, tmp_path / "missing.csv")


def test_collector_shapes_and_several_shadows(tmp_path: Path) -> None:
    rng = random.Random(5)
    calls = []
    for i in range(40):
        others = [
            Answer("b-shadow", labels=["1"], compared=True, agree=i % 4 != 0, differing=[]),
            Answer("a-shadow", labels=["1"], compared=True, agree=True, differing=[]),
            Answer("twin", "reference", labels=["1"], compared=True, agree=True, differing=[]),
        ]
        calls.append(Call(f"c{i}", Answer("prod", "production", labels=["1"]), others))
    spans = [span for call in calls for span in call_spans(call, rng)]
    half = len(spans) // 2
    # A Collector may write several resources in a line, the older
    # instrumentationLibrarySpans key, and metrics in the same file.
    line = {
        "resourceSpans": [
            {"resource": {}, "scopeSpans": [{"scope": {}, "spans": spans[:10]}]},
            {"resource": {}, "instrumentationLibrarySpans": [{"spans": spans[10:half]}]},
        ]
    }
    metrics: dict[str, Any] = {"resourceMetrics": [{"scopeMetrics": []}]}
    path = write_traces(
        tmp_path / "collector.jsonl",
        spans[half:],
        per_line=50,
        extra_lines=[(0, orjson.dumps(line)), (1, orjson.dumps(metrics))],
    )
    report = build_report(path)
    assert report.calls == 40
    assert [b.column for b in report.backends] == [
        "production:prod",
        "shadow:a-shadow",
        "shadow:b-shadow",
        "reference:twin",
    ]
    assert report.skipped == {"lines of metrics or logs, not traces": 1}
    b = report.backend("shadow", "b-shadow")
    assert b.agreement is not None and (b.agreement.successes, b.agreement.total) == (30, 40)
    verdicts = {c.name: c.verdict.decision for c in report.candidates if c.verdict}
    # 40 calls are too few to call a-shadow safe; b-shadow's 75% is bad however many more.
    assert verdicts == {"a-shadow": "cannot tell", "b-shadow": "not safe"}
    text = render_text(report)
    assert "a-shadow: CANNOT TELL" in text and "b-shadow: NOT safe" in text


# ---------------------------------------------------------------------------------------
# The real OpenTelemetry JSON file exporter, as the proxy uses it


def test_spans_written_by_the_opentelemetry_file_exporter(tmp_path: Path) -> None:
    from opentelemetry import trace
    from opentelemetry.exporter.otlp.json.file import FileSpanExporter
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor

    path = tmp_path / "sdk.jsonl"
    exporter = FileSpanExporter(path)
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    tracer = provider.get_tracer("shadow-proxy")
    t0 = START_NS
    for i, (labels, agree) in enumerate([(["1"], True), (["0"], False), (["1"], True)]):
        proxy = tracer.start_span(
            "predict.v1.PredictionService/Predict",
            kind=trace.SpanKind.SERVER,
            start_time=t0 + i * 10**9,
            attributes={
                "shadow.role": "proxy",
                "shadow.request_id": f"s{i}",
                "rpc.grpc.status_code": 0,
                "shadow.production": "prod",
                "shadow.sampled": ["cand"],
                "shadow.dropped": [],
                "shadow.sampled_out": [],
            },
        )
        context = trace.set_span_in_context(proxy)
        for role, name, predicted, ms in (
            ("production", "prod", ["1"], 4),
            ("shadow", "cand", labels, 9),
        ):
            attributes: dict[str, Any] = {
                "shadow.role": role,
                "shadow.backend": name,
                "shadow.request_id": f"s{i}",
                "rpc.grpc.status_code": 0,
                "shadow.predicted_labels": predicted,
            }
            if role == "shadow":
                attributes.update(
                    {
                        "shadow.compared": True,
                        "shadow.agree": agree,
                        "shadow.max_abs_diff": 0.0 if agree else 1.0,
                        "shadow.mean_abs_diff": 0.0 if agree else 0.5,
                        "shadow.differing_outputs": [] if agree else ["label"],
                    }
                )
            span = tracer.start_span(
                f"{role} {name}",
                context=context,
                kind=trace.SpanKind.CLIENT,
                start_time=t0 + i * 10**9,
                attributes=attributes,
            )
            span.add_event("response", {"payload": '{"outputs": []}'})
            span.end(end_time=t0 + i * 10**9 + ms * 10**6)
        proxy.end(end_time=t0 + i * 10**9 + 5 * 10**6)
    feedback = tracer.start_span(
        "feedback",
        attributes={"shadow.role": "feedback", "shadow.request_id": "s1", "shadow.labels": ["0"]},
    )
    feedback.end()
    provider.shutdown()

    report = build_report(path)
    cand = report.backend("shadow", "cand")
    assert report.calls == 3
    assert cand.agreement is not None and (cand.agreement.successes, cand.agreement.total) == (2, 3)
    assert cand.max_abs_diff == 1.0
    assert cand.latency.max_ms == pytest.approx(9.0, rel=0.01)
    assert cand.accuracy is not None and (cand.accuracy.successes, cand.accuracy.total) == (1, 1)
    assert [d.request_id for d in cand.top_disagreements] == ["s1"]


# ---------------------------------------------------------------------------------------
# HTML, JSON and the command line


def test_html_report_is_self_contained_with_plots_and_tables(scenario: dict[str, Any]) -> None:
    page = render_html(scenario["report"])
    assert page.startswith("<!DOCTYPE html>")
    assert page.count("<svg") == 4  # latency, its tail, agreement over time, a confusion matrix
    for title in (
        "Latency: share of calls",
        "Agreement with production over time",
        "Predicted labels: production vs cand",
    ):
        assert title in page
    assert "<polyline" in page and "<rect" in page
    assert page.count("<table") == 2  # the figures side by side and the top disagreements
    assert scenario["report"].backend("shadow", "cand").top_disagreements[0].trace_id in page
    assert "<script" not in page and "http://" not in page.replace("http://www.w3.org/2000/svg", "")
    assert "https://" not in page


def _parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="shadow-proxy")
    add_report_parser(parser.add_subparsers(dest="command"))
    return parser.parse_args(["report", *argv])


def test_cli_writes_text_json_and_html(
    scenario: dict[str, Any], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out_json, out_html = tmp_path / "r.json", tmp_path / "r.html"
    code = run_report(
        _parse(
            [str(scenario["path"]), "--json", str(out_json), "--html", str(out_html), "--top", "3"]
        )
    )
    assert code == 0
    printed = capsys.readouterr()
    assert "Shadow report" in printed.out and "Verdict" in printed.out
    assert printed.err == ""  # no progress bar: stderr is not a terminal
    figures = json.loads(out_json.read_text())
    e = scenario["expected"]
    backends = {b["column"]: b for b in figures["backends"]}
    cand = backends["shadow:cand"]
    assert cand["calls"] == e["calls"]["cand"]
    assert cand["agreement"]["successes"] == e["agreed"]["cand"]
    assert (
        cand["agreement"]["ci95_low"] < cand["agreement"]["rate"] < cand["agreement"]["ci95_high"]
    )
    assert cand["noise"] == e["noise"]
    assert len(cand["top_disagreements"]) == 3
    assert cand["top_disagreements"][0]["trace_id"]
    assert cand["verdict"]["decision"] in ("safe", "not safe", "cannot tell")
    assert cand["confusion"]["total"] == sum(e["confusion"].values())
    assert backends["production:prod"]["latency"]["p99_ms"] > 0
    assert backends["production:prod"]["latency"]["histogram"]
    assert backends["reference:ref"]["noise_rate"]["total"] == e["compared"]["ref"]
    assert (
        sum(b["backends"].get("shadow:cand", {}).get("compared", 0) for b in figures["timeline"])
        == e["compared"]["cand"]
    )
    for key in ("thresholds", "labels", "skipped", "warnings", "methods", "first_call_ns"):
        assert key in figures
    assert "<svg" in out_html.read_text()


def test_cli_help_explains_every_flag(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        _parse(["--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    for flag in (
        "--labels",
        "--html",
        "--json",
        "--min-agreement",
        "--max-error-rate",
        "--max-latency-ratio",
        "--min-calls",
        "--top",
        "--buffer-calls",
        "--jobs",
        "--progress",
        "how to read the report",
        "exit codes",
    ):
        assert flag in text


def test_cli_exit_codes_and_messages(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert run_report(_parse([str(tmp_path / "nope.jsonl")])) == 2
    assert "shadow-proxy report: error: traces file" in capsys.readouterr().err
    assert run_report(_parse([str(tmp_path), "--min-agreement", "2"])) == 2
    assert "min_agreement" in capsys.readouterr().err
    traces = write_calls(tmp_path / "t.jsonl", _labelled_calls())
    assert run_report(_parse([str(traces), "--json", str(tmp_path / "no" / "r.json")])) == 2
    assert "cannot write" in capsys.readouterr().err


def test_cli_in_a_subprocess_with_a_progress_bar(tmp_path: Path) -> None:
    traces = write_calls(tmp_path / "t.jsonl", _labelled_calls())
    program = (
        "import argparse, sys\n"
        "from proxy.compare.report import add_report_parser, run_report\n"
        "parser = argparse.ArgumentParser(prog='shadow-proxy')\n"
        "add_report_parser(parser.add_subparsers(dest='command'))\n"
        "sys.exit(run_report(parser.parse_args(['report', *sys.argv[1:]])))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", program, str(traces), "--progress"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    assert "calls" in done.stderr and "B" in done.stderr  # tqdm's bar, by bytes
    assert "Shadow report" in done.stdout
    bad = tmp_path / "bad.jsonl"
    bad.write_text("hello\n")
    done = subprocess.run(
        [sys.executable, "-c", program, str(bad)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 2
    assert "bad.jsonl:1: not OTLP JSON" in done.stderr
    assert done.stdout == ""


def test_gen_traces_script_writes_a_file_the_report_reads(tmp_path: Path) -> None:
    out = tmp_path / "gen.jsonl"
    done = subprocess.run(
        [
            sys.executable,
            str(ROOT / "scripts" / "gen_traces.py"),
            "--calls",
            "400",
            "--out",
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    report = build_report(out)
    never = report.skipped.get("calls on which production was never called", 0)
    assert report.calls + never == 400
    columns = [b.column for b in report.backends]
    assert columns == ["production:prod", "shadow:candidate", "reference:reference"]
    assert report.labels.feedback_request_ids > 200
    assert report.labels.labelled_calls == report.labels.feedback_request_ids
    assert report.backend("shadow", "candidate").agreement is not None
    # Every line is one OTLP document of at most 512 spans.
    for line in out.read_bytes().splitlines():
        spans = orjson.loads(line)["resourceSpans"][0]["scopeSpans"][0]["spans"]
        assert 0 < len(spans) <= 512
