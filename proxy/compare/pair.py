"""Compare one shadow (or reference) reply with production's reply to the same request."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import grpc
import numpy as np

from proxy.protocols import Outputs, codec_for
from proxy.protocols.predict_v1 import PREDICT_METHOD

__all__ = [
    "BYTES_MARKER",
    "LABEL_OUTPUT",
    "PREDICT_METHOD",
    "Comparison",
    "compare_replies",
    "decode_outputs",
    "predicted_labels",
]

LABEL_OUTPUT = "label"
BYTES_MARKER = "<bytes>"


@dataclass(slots=True)
class Comparison:
    """The outcome of comparing a reply with production's, as span attributes."""

    status_mismatch: bool
    """One of the two failed and the other did not."""
    compared: bool
    """Both replied OK and the replies could be compared."""
    agree: bool | None = None
    """Same predicted label (when both have a ``label`` output), else every output equal
    within the tolerance; None when not compared."""
    max_abs_diff: float | None = None
    mean_abs_diff: float | None = None
    differing_outputs: tuple[str, ...] = ()
    latency_diff_ms: float | None = None

    def attributes(self) -> dict[str, Any]:
        attributes: dict[str, Any] = {
            "shadow.compared": self.compared,
            "shadow.status_mismatch": self.status_mismatch,
            "shadow.differing_outputs": self.differing_outputs,
        }
        if self.agree is not None:
            attributes["shadow.agree"] = self.agree
        if self.max_abs_diff is not None:
            attributes["shadow.max_abs_diff"] = self.max_abs_diff
        if self.mean_abs_diff is not None:
            attributes["shadow.mean_abs_diff"] = self.mean_abs_diff
        if self.latency_diff_ms is not None:
            attributes["shadow.latency_diff_ms"] = self.latency_diff_ms
        return attributes


def decode_outputs(reply: bytes, method: str = PREDICT_METHOD) -> Outputs | None:
    """A reply's outputs as arrays by name, or None when the method has no codec that
    reads outputs or the bytes do not parse."""
    codec = codec_for(method)
    return codec.outputs(reply) if codec is not None else None


def predicted_labels(outputs: Outputs | None) -> tuple[str, ...] | None:
    """The ``label`` output as strings (one per batch row), when the reply has one."""
    if outputs is None or LABEL_OUTPUT not in outputs.arrays:
        return None
    values = outputs.arrays[LABEL_OUTPUT].ravel().tolist()
    return tuple(v.decode("utf-8", "replace") if isinstance(v, bytes) else str(v) for v in values)


def compare_replies(
    method: str,
    production_code: grpc.StatusCode,
    production_reply: bytes | None,
    other_code: grpc.StatusCode,
    other_reply: bytes | None,
    tolerance: float,
    *,
    production_outputs: Outputs | None = None,
    other_outputs: Outputs | None = None,
) -> Comparison:
    """Compare a backend's reply with production's.

    Replies of a method with a codec (:mod:`proxy.protocols`) are compared output by
    output: numeric outputs within ``tolerance`` (absolute), others exactly. Any other
    method, or replies that do not decode, are compared byte for byte. Outputs already
    decoded by the caller can be passed in so that no reply is decoded twice.
    """
    production_ok = production_code is grpc.StatusCode.OK
    other_ok = other_code is grpc.StatusCode.OK
    mismatch = production_ok != other_ok
    if not (production_ok and other_ok) or production_reply is None or other_reply is None:
        return Comparison(status_mismatch=mismatch, compared=False)
    codec = codec_for(method)
    ours = theirs = None
    if codec is not None:
        ours = production_outputs or codec.outputs(production_reply)
        theirs = other_outputs or codec.outputs(other_reply)
    if ours is None or theirs is None:
        same = production_reply == other_reply
        return Comparison(False, True, same, differing_outputs=() if same else (BYTES_MARKER,))
    return _compare_outputs(ours, theirs, tolerance)


def _compare_outputs(ours: Outputs, theirs: Outputs, tolerance: float) -> Comparison:
    differing: list[str] = []
    count = 0
    total = 0.0
    largest: float | None = None
    for name in sorted(ours.arrays.keys() | theirs.arrays.keys()):
        a, b = ours.arrays.get(name), theirs.arrays.get(name)
        if a is None or b is None or a.shape != b.shape:
            differing.append(name)
            continue
        if name in ours.numeric and name in theirs.numeric:
            if not a.size:
                continue
            if a.size <= _SMALL:
                # A label and a few probabilities: Python floats beat a dozen numpy calls.
                # Both paths compare in float64, so ints give float differences (and int64
                # beyond 2**53 compares as the numpy path does).
                diffs = list(
                    map(
                        _abs_diff,
                        a.ravel().astype(np.float64).tolist(),
                        b.ravel().astype(np.float64).tolist(),
                    )
                )
                most, added = max(diffs), math.fsum(diffs)
            else:
                diff = _abs_diffs(a, b)
                most, added = float(diff.max()), float(diff.sum())
            count += a.size
            total += added
            largest = most if largest is None else max(largest, most)
            if most > tolerance:
                differing.append(name)
        elif not np.array_equal(a, b):
            differing.append(name)
    if LABEL_OUTPUT in ours.arrays and LABEL_OUTPUT in theirs.arrays:
        agree = LABEL_OUTPUT not in differing
    else:
        agree = not differing
    comparison = Comparison(False, True, agree, differing_outputs=tuple(differing))
    if largest is not None:
        comparison.max_abs_diff = largest
        comparison.mean_abs_diff = total / count if math.isfinite(total) else math.inf
    return comparison


_SMALL = 64


def _abs_diff(x: float, y: float) -> float:
    """|x - y|, where equal values (infinities included) and two NaNs differ by 0 and a NaN
    against anything else differs infinitely."""
    if x == y:
        return 0.0
    if x != x or y != y:  # NaN
        return 0.0 if x != x and y != y else math.inf
    return abs(x - y)


def _abs_diffs(a: np.ndarray[Any, Any], b: np.ndarray[Any, Any]) -> np.ndarray[Any, Any]:
    """_abs_diff element by element, for arrays too large for the Python loop."""
    x, y = a.astype(np.float64).ravel(), b.astype(np.float64).ravel()
    with np.errstate(invalid="ignore", over="ignore"):
        diff = np.abs(x - y)
    diff[np.isnan(x) | np.isnan(y)] = math.inf
    diff[(x == y) | (np.isnan(x) & np.isnan(y))] = 0.0
    return diff
