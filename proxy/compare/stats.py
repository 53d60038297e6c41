"""Streaming statistics in bounded memory: proportions with a confidence interval, a
log-bucket latency histogram, time buckets that widen, a bounded top-N and a capped
confusion matrix. Each one merges with another of its kind, so parts of a file can be
read apart and added up."""

from __future__ import annotations

import heapq
import math
from collections.abc import Callable, Hashable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

Z_95 = 1.959963984540054  # the standard normal quantile for a two-sided 95% interval


def wilson_interval(successes: int, total: int, z: float = Z_95) -> tuple[float, float]:
    """The Wilson score interval for a proportion; (0, 1) when total is 0.

    Unlike the normal approximation it stays inside [0, 1] and is honest near 0 and 1,
    where a shadow's agreement usually is (100 agreeing calls of 100 give 0.963..1).
    """
    if total <= 0:
        return 0.0, 1.0
    if not 0 <= successes <= total:
        raise ValueError(f"successes {successes} not within 0..{total}")
    p = successes / total
    z2 = z * z
    denominator = 1.0 + z2 / total
    centre = (p + z2 / (2 * total)) / denominator
    half = z / denominator * math.sqrt(p * (1 - p) / total + z2 / (4 * total * total))
    # At the ends the exact bounds are 0 and 1; keep them so, not 1e-17 off.
    low = 0.0 if successes == 0 else max(0.0, centre - half)
    high = 1.0 if successes == total else min(1.0, centre + half)
    return low, high


@dataclass(frozen=True, slots=True)
class Proportion:
    """``successes`` of ``total``, with the rate and its 95% Wilson interval."""

    successes: int
    total: int
    rate: float | None
    low: float | None
    high: float | None

    @classmethod
    def of(cls, successes: int, total: int) -> Proportion:
        if total <= 0:
            return cls(successes, total, None, None, None)
        low, high = wilson_interval(successes, total)
        return cls(successes, total, successes / total, low, high)

    def to_dict(self) -> dict[str, Any]:
        return {
            "successes": self.successes,
            "total": self.total,
            "rate": self.rate,
            "ci95_low": self.low,
            "ci95_high": self.high,
        }


class LogHistogram:
    """Counts of positive values in logarithmic buckets, DDSketch style.

    Bucket ``i`` holds values in (gamma^(i-1), gamma^i]; a quantile is answered with the
    bucket's middle, so every answer is within ``relative_accuracy`` of a value of the
    right rank. Memory is one counter per bucket in use: about 2,100 buckets cover
    1 ns to a day at 1%, whatever the number of values.
    """

    __slots__ = ("_gamma", "_log_gamma", "count", "counts", "max", "min", "sum", "zeros")

    def __init__(self, relative_accuracy: float = 0.01) -> None:
        if not 0 < relative_accuracy < 1:
            raise ValueError("relative_accuracy must be within (0, 1)")
        self._gamma = (1 + relative_accuracy) / (1 - relative_accuracy)
        self._log_gamma = math.log(self._gamma)
        self.counts: dict[int, int] = {}
        self.zeros = 0
        self.count = 0
        self.sum = 0.0
        self.min = math.inf
        self.max = -math.inf

    @property
    def relative_accuracy(self) -> float:
        return (self._gamma - 1) / (self._gamma + 1)

    def add(self, value: float) -> None:
        self.count += 1
        self.sum += value
        if value < self.min:
            self.min = value
        if value > self.max:
            self.max = value
        if value <= 1e-9:
            self.zeros += 1
            return
        index = math.ceil(math.log(value) / self._log_gamma)
        counts = self.counts
        counts[index] = counts.get(index, 0) + 1

    def merge(self, other: LogHistogram) -> None:
        if abs(other._gamma - self._gamma) > 1e-12:
            raise ValueError("cannot merge histograms of different accuracy")
        for index, n in other.counts.items():
            self.counts[index] = self.counts.get(index, 0) + n
        self.zeros += other.zeros
        self.count += other.count
        self.sum += other.sum
        self.min = min(self.min, other.min)
        self.max = max(self.max, other.max)

    def _value(self, index: int) -> float:
        return 2 * self._gamma**index / (self._gamma + 1)

    def quantile(self, q: float) -> float | None:
        """The value at quantile q (0..1), None when empty; exact at 0 and 1."""
        if self.count == 0:
            return None
        if q <= 0:
            return self.min
        if q >= 1:
            return self.max
        rank = q * (self.count - 1)
        seen = self.zeros
        if rank < seen:
            return max(self.min, 0.0)
        for index in sorted(self.counts):
            seen += self.counts[index]
            if seen > rank:
                return min(max(self._value(index), self.min), self.max)
        return self.max

    @property
    def mean(self) -> float | None:
        return self.sum / self.count if self.count else None

    def buckets(self) -> list[tuple[float, float, int]]:
        """(low, high, count) per bucket in use, in order; zeros as (0, 0, n)."""
        result = [(0.0, 0.0, self.zeros)] if self.zeros else []
        result.extend(
            (self._gamma ** (i - 1), self._gamma**i, self.counts[i]) for i in sorted(self.counts)
        )
        return result


_MS = 1_000_000


class TimeBuckets:
    """Counters per time bucket that stay at most ``max_buckets`` wide.

    Buckets start 1 ms wide, aligned to the epoch; whenever the calls span more buckets
    than allowed, the width doubles and neighbours merge, which is exact because every
    width is a power-of-two multiple of the first. Each bucket holds, per key, a fixed
    number of counters.
    """

    __slots__ = ("buckets", "fields", "max_buckets", "width_ns")

    def __init__(self, fields: int, max_buckets: int = 120, width_ns: int = _MS) -> None:
        if max_buckets < 2:
            raise ValueError("max_buckets must be at least 2")
        self.fields = fields
        self.max_buckets = max_buckets
        self.width_ns = width_ns
        self.buckets: dict[int, dict[Hashable, list[int]]] = {}

    def add(self, time_ns: int, key: Hashable, counts: Iterable[int]) -> None:
        index = time_ns // self.width_ns
        bucket = self.buckets.get(index)
        if bucket is None:
            bucket = self.buckets[index] = {}
            if len(self.buckets) > 1:
                self._fit()
                index = time_ns // self.width_ns
                bucket = self.buckets[index]
        row = bucket.get(key)
        if row is None:
            row = bucket[key] = [0] * self.fields
        for i, n in enumerate(counts):
            row[i] += n

    def _fit(self) -> None:
        while self.buckets and max(self.buckets) - min(self.buckets) + 1 > self.max_buckets:
            self._widen()

    def _widen(self) -> None:
        merged: dict[int, dict[Hashable, list[int]]] = {}
        for index, bucket in self.buckets.items():
            target = merged.setdefault(index // 2, {})
            for key, row in bucket.items():
                into = target.get(key)
                if into is None:
                    target[key] = list(row)
                else:
                    for i, n in enumerate(row):
                        into[i] += n
        self.buckets = merged
        self.width_ns *= 2

    def merge(self, other: TimeBuckets) -> None:
        if other.fields != self.fields:
            raise ValueError("cannot merge time buckets with different fields")
        other_buckets = dict(other.buckets)
        other_width = other.width_ns
        while self.width_ns < other_width:
            self._widen()
        while other_width < self.width_ns:
            folded: dict[int, dict[Hashable, list[int]]] = {}
            for index, bucket in other_buckets.items():
                target = folded.setdefault(index // 2, {})
                for key, row in bucket.items():
                    into = target.setdefault(key, [0] * self.fields)
                    for i, n in enumerate(row):
                        into[i] += n
            other_buckets = folded
            other_width *= 2
        for index, bucket in other_buckets.items():
            target = self.buckets.setdefault(index, {})
            for key, row in bucket.items():
                into = target.setdefault(key, [0] * self.fields)
                for i, n in enumerate(row):
                    into[i] += n
        self._fit()

    def rows(self) -> Iterator[tuple[int, dict[Hashable, list[int]]]]:
        """(bucket start in ns, counters per key), in time order, empty buckets included."""
        if not self.buckets:
            return
        for index in range(min(self.buckets), max(self.buckets) + 1):
            yield index * self.width_ns, self.buckets.get(index, {})


T = TypeVar("T")


class TopN(Generic[T]):
    """The ``n`` items with the largest keys seen so far; ties keep the earliest."""

    __slots__ = ("_heap", "_seq", "n")

    def __init__(self, n: int) -> None:
        self.n = n
        self._heap: list[tuple[Any, int, T]] = []
        self._seq = 0

    def offer(self, key: Any, item: T | Callable[[], T]) -> None:
        """Keep ``item`` if its key is among the top n; ``item`` may be a function that
        makes it, so that an item that would be thrown away is never built."""
        self._seq += 1
        entry_key = (key, -self._seq)
        if len(self._heap) >= self.n and (self.n == 0 or entry_key <= self._heap[0][:2]):
            return
        value: T = item() if callable(item) else item  # type: ignore[assignment]
        entry = (key, -self._seq, value)
        if len(self._heap) < self.n:
            heapq.heappush(self._heap, entry)
        else:
            heapq.heapreplace(self._heap, entry)

    def merge(self, other: TopN[T]) -> None:
        for key, seq, value in other._heap:
            entry = (key, seq - self._seq - 1, value)  # other's items count as later ones
            if len(self._heap) < self.n:
                heapq.heappush(self._heap, entry)
            elif self.n and entry[:2] > self._heap[0][:2]:
                heapq.heapreplace(self._heap, entry)
        self._seq += other._seq + 1

    def items(self) -> list[T]:
        """The kept items, largest key first."""
        return [value for _, _, value in sorted(self._heap, key=lambda e: e[:2], reverse=True)]

    def __len__(self) -> int:
        return len(self._heap)


OTHER_LABEL = "(other)"


def _label_order(label: str) -> tuple[int, float, str]:
    if label == OTHER_LABEL:
        return (2, 0.0, label)
    try:
        return (0, float(label), label)
    except ValueError:
        return (1, 0.0, label)


class Confusion:
    """Counts of (production label, candidate label) pairs, over at most ``max_labels``
    distinct labels; labels first seen after that are counted as ``(other)``."""

    __slots__ = ("counts", "labels", "max_labels", "other")

    def __init__(self, max_labels: int = 50) -> None:
        self.max_labels = max_labels
        self.labels: set[str] = set()
        self.counts: dict[tuple[str, str], int] = {}
        self.other = 0
        """Pairs with a label counted as ``(other)``."""

    def _label(self, label: str) -> str:
        if label in self.labels:
            return label
        if len(self.labels) < self.max_labels:
            self.labels.add(label)
            return label
        return OTHER_LABEL

    def add(self, expected: str, actual: str, n: int = 1) -> None:
        a, b = self._label(expected), self._label(actual)
        if OTHER_LABEL in (a, b):
            self.other += n
        self.counts[a, b] = self.counts.get((a, b), 0) + n

    def merge(self, other: Confusion) -> None:
        for (a, b), n in other.counts.items():
            if OTHER_LABEL in (a, b):
                a = a if a == OTHER_LABEL else self._label(a)
                b = b if b == OTHER_LABEL else self._label(b)
                self.other += n
                self.counts[a, b] = self.counts.get((a, b), 0) + n
            else:
                self.add(a, b, n)

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def axis(self) -> list[str]:
        """Every label on either axis, numbers in numeric order, ``(other)`` last."""
        seen = {a for a, _ in self.counts} | {b for _, b in self.counts}
        return sorted(seen, key=_label_order)

    def matrix(self) -> tuple[list[str], list[list[int]]]:
        """(labels, rows): rows[i][j] counts production label i against candidate label j."""
        labels = self.axis()
        position = {label: i for i, label in enumerate(labels)}
        rows = [[0] * len(labels) for _ in labels]
        for (a, b), n in self.counts.items():
            rows[position[a]][position[b]] += n
        return labels, rows
