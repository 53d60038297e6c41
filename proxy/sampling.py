"""Decide whether to copy a request to a shadow: a pure function of the request id and rate."""

from __future__ import annotations

import hashlib

_SCALE = float(1 << 64)


def sample_point(request_id: str) -> float:
    """Where a request id falls in [0, 1): the same id always lands on the same point.

    Every shadow compares its rate against the same point, so with rates 0.1 and 0.5 the
    first shadow's requests are a subset of the second's: shadows can be compared with each
    other on the requests they share.
    """
    digest = hashlib.blake2b(request_id.encode("utf-8", "surrogatepass"), digest_size=8).digest()
    return int.from_bytes(digest, "big") / _SCALE


def should_shadow(request_id: str, sample_rate: float) -> bool:
    """True when the request with this id is to be copied to a shadow sampled at this rate."""
    if sample_rate >= 1.0:
        return True
    if sample_rate <= 0.0:
        return False
    return sample_point(request_id) < sample_rate
