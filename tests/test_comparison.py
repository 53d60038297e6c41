"""Comparing one reply with production's: labels, tolerances, bytes, statuses."""

from __future__ import annotations

import math

import grpc
import numpy as np

from proxy.compare.pair import (
    BYTES_MARKER,
    PREDICT_METHOD,
    compare_replies,
    decode_outputs,
    predicted_labels,
)
from proxy.gen import predict_pb2
from proxy.tensors import to_tensor

OK = grpc.StatusCode.OK


def _reply(
    label: list[int] | None = None, probabilities: list[list[float]] | None = None, **extra
) -> bytes:
    outputs = []
    if label is not None:
        outputs.append(to_tensor("label", np.array(label, dtype=np.int64)))
    if probabilities is not None:
        outputs.append(to_tensor("probabilities", np.array(probabilities, dtype=np.float32)))
    for name, value in extra.items():
        outputs.append(to_tensor(name, value))
    return predict_pb2.PredictResponse(outputs=outputs).SerializeToString()


def _compare(production: bytes, other: bytes, tolerance: float = 1e-6):
    return compare_replies(PREDICT_METHOD, OK, production, OK, other, tolerance)


def test_same_label_agrees_even_when_probabilities_differ():
    result = _compare(_reply([1], [[0.2, 0.8]]), _reply([1], [[0.4, 0.6]]))
    assert result.compared and result.agree is True
    assert result.differing_outputs == ("probabilities",)
    assert math.isclose(result.max_abs_diff, 0.2, rel_tol=1e-5)
    # Mean over the numeric outputs: label diff 0, two probability diffs of 0.2.
    assert math.isclose(result.mean_abs_diff, 0.4 / 3, rel_tol=1e-5)


def test_different_label_disagrees():
    result = _compare(_reply([1], [[0.4, 0.6]]), _reply([0], [[0.6, 0.4]]))
    assert result.agree is False
    assert set(result.differing_outputs) == {"label", "probabilities"}
    assert math.isclose(result.max_abs_diff, 1.0)


def test_batch_label_disagreement_in_one_row_disagrees():
    result = _compare(_reply([1, 0, 1]), _reply([1, 1, 1]))
    assert result.agree is False and result.differing_outputs == ("label",)


def test_without_label_output_equal_within_tolerance_agrees():
    production = _reply(score=np.array([1.0, 2.0]))
    assert _compare(production, _reply(score=np.array([1.0 + 1e-9, 2.0]))).agree is True
    nearly = _compare(production, _reply(score=np.array([1.001, 2.0])), tolerance=0.01)
    assert nearly.agree is True and nearly.differing_outputs == ()
    far = _compare(production, _reply(score=np.array([1.1, 2.0])), tolerance=0.01)
    assert far.agree is False and far.differing_outputs == ("score",)


def test_missing_output_or_other_shape_differs():
    assert _compare(
        _reply(score=np.array([1.0])), _reply(other=np.array([1.0]))
    ).differing_outputs == (
        "other",
        "score",
    )
    shape = _compare(_reply(score=np.array([1.0, 2.0])), _reply(score=np.array([[1.0, 2.0]])))
    assert shape.agree is False and shape.differing_outputs == ("score",)


def test_string_outputs_compare_exactly():
    result = _compare(
        _reply(word=np.array([b"yes"], dtype=object)), _reply(word=np.array([b"no"], dtype=object))
    )
    assert result.agree is False and result.max_abs_diff is None


def test_nan_equals_nan_but_not_a_number():
    assert (
        _compare(_reply(score=np.array([math.nan])), _reply(score=np.array([math.nan]))).agree
        is True
    )
    result = _compare(_reply(score=np.array([math.nan])), _reply(score=np.array([1.0])))
    assert result.agree is False and math.isinf(result.max_abs_diff)


def test_equal_infinities_agree_and_infinity_against_a_number_differs_infinitely():
    inf = math.inf
    same = _compare(_reply(score=np.array([inf, -inf])), _reply(score=np.array([inf, -inf])))
    assert same.agree is True and same.max_abs_diff == 0.0 and same.mean_abs_diff == 0.0
    apart = _compare(_reply(score=np.array([inf, 1.0])), _reply(score=np.array([-inf, 1.0])))
    assert apart.agree is False and apart.max_abs_diff == inf and apart.mean_abs_diff == inf
    finite = _compare(_reply(score=np.array([inf])), _reply(score=np.array([1e308])))
    assert finite.agree is False and finite.max_abs_diff == inf


def test_small_and_large_outputs_give_the_same_differences():
    # Up to 64 values are compared in Python floats, more with numpy: one definition.
    rng = np.random.default_rng(3)
    specials = [math.nan, math.inf, -math.inf, 0.0, -0.0, 1e308, -1e308]
    for size in (8, 64, 65, 500):
        a = rng.normal(size=size)
        b = a + rng.normal(scale=1e-3, size=size)
        a[:7], b[:7] = specials, specials[::-1]
        result = _compare(_reply(score=a), _reply(score=b), tolerance=0.01)
        small = [
            _compare(_reply(score=a[i : i + 1]), _reply(score=b[i : i + 1])).max_abs_diff
            for i in range(size)
        ]
        assert result.max_abs_diff == max(small), size
        assert result.agree is False


def test_unknown_method_is_compared_byte_for_byte():
    same = compare_replies("/x.Y/Z", OK, b"abc", OK, b"abc", 0.0)
    assert same.compared and same.agree is True and same.differing_outputs == ()
    other = compare_replies("/x.Y/Z", OK, b"abc", OK, b"abd", 0.0)
    assert other.agree is False and other.differing_outputs == (BYTES_MARKER,)
    assert other.max_abs_diff is None


def test_status_mismatch_and_both_failed():
    failed = grpc.StatusCode.UNAVAILABLE
    mismatch = compare_replies(PREDICT_METHOD, OK, _reply([1]), failed, None, 0.0)
    assert mismatch.status_mismatch and not mismatch.compared and mismatch.agree is None
    reverse = compare_replies(PREDICT_METHOD, failed, None, OK, _reply([1]), 0.0)
    assert reverse.status_mismatch
    both = compare_replies(PREDICT_METHOD, failed, None, grpc.StatusCode.INTERNAL, None, 0.0)
    assert not both.status_mismatch and not both.compared


def test_undecodable_reply_falls_back_to_bytes():
    result = _compare(_reply([1]), b"\x0a\x05ab")
    assert result.compared and result.agree is False
    assert result.differing_outputs == (BYTES_MARKER,)


def test_attributes_and_predicted_labels():
    result = _compare(_reply([1], [[0.2, 0.8]]), _reply([0], [[0.9, 0.1]]))
    attributes = result.attributes()
    assert attributes["shadow.agree"] is False
    assert attributes["shadow.compared"] is True
    assert attributes["shadow.status_mismatch"] is False
    assert attributes["shadow.differing_outputs"] == ("label", "probabilities")
    assert predicted_labels(decode_outputs(_reply([1, 0]))) == ("1", "0")
    assert predicted_labels(decode_outputs(_reply(score=np.array([1.0])))) is None


def test_integer_outputs_give_float_differences_on_both_paths():
    # Span attributes keep one type per key, and OTLP cannot carry ints beyond int64.
    for size in (1, 100):
        small = _compare(
            _reply(score=np.zeros(size, dtype=np.int64)),
            _reply(score=np.ones(size, dtype=np.int64)),
        )
        assert type(small.max_abs_diff) is float and small.max_abs_diff == 1.0
    flags = _compare(_reply(flag=np.array([True])), _reply(flag=np.array([False])))
    assert type(flags.max_abs_diff) is float and flags.max_abs_diff == 1.0
