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
) -> Comparison:
    """Compare a backend's reply with production's.

    Replies of a method with a codec (:mod:`proxy.protocols`) are compared output by
    output: numeric outputs within ``tolerance`` (absolute), others exactly. Any other
    method, or replies that do not decode, are compared byte for byte.
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
        theirs = codec.outputs(other_reply)
    if ours is None or theirs is None:
        same = production_reply == other_reply
        return Comparison(False, True, same, differing_outputs=() if same else (BYTES_MARKER,))
    return _compare_outputs(ours, theirs, tolerance)


def _compare_outputs(ours: Outputs, theirs: Outputs, tolerance: float) -> Comparison:
    differing: list[str] = []
    diffs: list[np.ndarray[Any, Any]] = []
    for name in sorted(set(ours.arrays) | set(theirs.arrays)):
        a, b = ours.arrays.get(name), theirs.arrays.get(name)
        if a is None or b is None or a.shape != b.shape:
            differing.append(name)
            continue
        if name in ours.numeric and name in theirs.numeric:
            diff = np.abs(a.astype(np.float64) - b.astype(np.float64)).ravel()
            # NaN where both are NaN is equal; NaN against a number differs infinitely.
            both_nan = (
                np.isnan(a.astype(np.float64)).ravel() & np.isnan(b.astype(np.float64)).ravel()
            )
            diff = np.where(both_nan, 0.0, np.nan_to_num(diff, nan=math.inf))
            if diff.size:
                diffs.append(diff)
                if float(diff.max()) > tolerance:
                    differing.append(name)
        elif not np.array_equal(a, b):
            differing.append(name)
    if LABEL_OUTPUT in ours.arrays and LABEL_OUTPUT in theirs.arrays:
        agree = LABEL_OUTPUT not in differing
    else:
        agree = not differing
    comparison = Comparison(False, True, agree, differing_outputs=tuple(differing))
    if diffs:
        joined = np.concatenate(diffs)
        comparison.max_abs_diff = float(joined.max())
        comparison.mean_abs_diff = float(joined.mean())
    return comparison
