"""Shadow sampling: a pure, stable function of the request id and the shadow's rate."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from proxy.sampling import sample_point, should_shadow

REPO_ROOT = Path(__file__).resolve().parent.parent
# Plain, UUID-like, non-ASCII, empty and lone-surrogate ids: all must hash the same way.
IDS = [
    *(f"req-{i}" for i in range(2000)),
    "3f2b8c9e-1d4a-4e6b-9a7c-0f1e2d3c4b5a",
    "预测-42",
    "",
    "\ud800",
]


def _decisions(rate: float) -> list[bool]:
    return [should_shadow(request_id, rate) for request_id in IDS]


@pytest.mark.parametrize("rate", [0.1, 0.5, 0.9])
def test_same_id_gets_the_same_decision_on_every_call(rate: float) -> None:
    first = _decisions(rate)
    assert _decisions(rate) == first
    assert any(first) and not all(first), "the ids should not all fall on one side"


def test_same_id_gets_the_same_decision_in_a_fresh_process() -> None:
    # Another hash seed in the child shows the decision does not rest on Python's hash().
    child = (
        "import json, sys\n"
        "from proxy.sampling import should_shadow\n"
        "ids = json.load(sys.stdin)\n"
        "print(json.dumps([should_shadow(i, 0.3) for i in ids]))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", child],
        input=json.dumps(IDS),
        capture_output=True,
        text=True,
        cwd=REPO_ROOT,
        env={**os.environ, "PYTHONHASHSEED": "12345"},
        timeout=60,
        check=True,
    )
    assert json.loads(result.stdout) == _decisions(0.3)


@pytest.mark.parametrize("rate", [0.0, -0.5])
def test_rate_zero_never_shadows(rate: float) -> None:
    assert not any(_decisions(rate))


@pytest.mark.parametrize("rate", [1.0, 1.5])
def test_rate_one_always_shadows(rate: float) -> None:
    assert all(_decisions(rate))


def test_sample_point_lies_in_the_unit_interval() -> None:
    assert all(0.0 <= sample_point(request_id) < 1.0 for request_id in IDS)


def test_fraction_sampled_matches_the_rate() -> None:
    ids = [f"request-{i}" for i in range(20_000)]
    fraction = sum(should_shadow(request_id, 0.25) for request_id in ids) / len(ids)
    assert fraction == pytest.approx(0.25, abs=0.02)


def test_lower_rate_samples_a_subset_of_a_higher_rate() -> None:
    # Every shadow compares against the same point per id, so shadows sampled at different
    # rates share requests and can be compared with each other on them.
    ids = [f"request-{i}" for i in range(5000)]
    previous: set[str] = set()
    for rate in (0.05, 0.1, 0.25, 0.5, 0.75, 1.0):
        sampled = {request_id for request_id in ids if should_shadow(request_id, rate)}
        assert previous <= sampled, f"ids sampled below {rate} dropped out at {rate}"
        previous = sampled
    at_tenth = {request_id for request_id in ids if should_shadow(request_id, 0.1)}
    at_half = {request_id for request_id in ids if should_shadow(request_id, 0.5)}
    assert at_tenth
    assert at_tenth < at_half
