"""Shadow isolation: slow, failing, hanging or dead shadows never touch production."""

from __future__ import annotations

import asyncio
import statistics
import time

import grpc
import pytest

from proxy.sampling import should_shadow
from tests.backends import Behaviour, wait_for

PRODUCTION_DELAY = 0.010


async def _latencies(channel, calls: int, prefix: str) -> list[float]:
    method = channel.unary_unary("/m.S/M")
    latencies = []
    for i in range(calls):
        start = time.perf_counter()
        reply = await method(
            f"{prefix}-{i}".encode(), metadata=(("x-request-id", f"{prefix}-{i}"),)
        )
        latencies.append(time.perf_counter() - start)
        assert reply == f"{prefix}-{i}".encode()
    return latencies


@pytest.mark.parametrize(
    "shadow_kind",
    ["sleeps 2s", "returns errors", "hangs", "is down"],
)
async def test_bad_shadow_leaves_production_reply_and_latency_unchanged(
    shadow_kind, backends, make_proxy, channel_to
):
    production = await backends(Behaviour(delay=PRODUCTION_DELAY))
    behaviour = {
        "sleeps 2s": Behaviour(delay=2.0),
        "returns errors": Behaviour(error=(grpc.StatusCode.INTERNAL, "candidate crashed")),
        "hangs": Behaviour(hang=True),
        "is down": Behaviour(),
    }[shadow_kind]
    shadow = await backends(behaviour)
    shadow_address = shadow.address
    if shadow_kind == "is down":
        await shadow.stop()
    proxy, _ = await make_proxy(
        f"prod={production.address}", [f"cand={shadow_address},timeout=3s"], shadow_grace=0.2
    )
    channel = channel_to(proxy.address)
    await _latencies(channel, 3, "warm")
    latencies = await _latencies(channel, 15, shadow_kind.replace(" ", "-"))
    # Production sleeps 10 ms; a shadow that sleeps 2 s or hangs would show as >= 2 s.
    assert max(latencies) < 0.5, latencies
    assert statistics.median(latencies) < 0.1, latencies
    stats = proxy.shadows.stats["cand"]
    if shadow_kind == "is down":
        # The health check found it down at start: copies are skipped and counted, not sent.
        assert (stats.sent, stats.unhealthy_skipped) == (0, 18)
        return
    assert stats.sent == 18
    if shadow_kind == "returns errors":
        await wait_for(lambda: stats.failed == 18)


async def test_shadow_that_dies_unnoticed_fails_without_touching_production(
    backends, make_proxy, channel_to
):
    production = await backends(Behaviour(delay=PRODUCTION_DELAY))
    shadow = await backends()
    # Health checked only at start: the shadow dies between checks.
    proxy, _ = await make_proxy(
        f"prod={production.address}", [f"cand={shadow.address}"], health_interval=60
    )
    await shadow.stop()
    latencies = await _latencies(channel_to(proxy.address), 10, "dead")
    assert max(latencies) < 0.5, latencies
    stats = proxy.shadows.stats["cand"]
    await wait_for(lambda: stats.failed == 10)
    assert stats.errors_by_code == {"UNAVAILABLE": 10}


async def test_shadow_starts_with_production_not_after(backends, make_proxy, channel_to):
    production = await backends(Behaviour(delay=0.5))
    shadow = await backends()
    proxy, _ = await make_proxy(f"prod={production.address}", [f"cand={shadow.address}"])
    await channel_to(proxy.address).unary_unary("/m.S/M")(b"x")
    gap = shadow.received[0].at - production.received[0].at
    assert abs(gap) < 0.2, f"shadow started {gap:.3f}s after production"


async def test_in_flight_bound_drops_and_counts(backends, make_proxy, channel_to):
    production = await backends()
    shadow = await backends(Behaviour(hang=True))
    proxy, spans = await make_proxy(
        f"prod={production.address}",
        [f"cand={shadow.address},max_in_flight=3,timeout=30s"],
        shadow_grace=0.1,
    )
    method = channel_to(proxy.address).unary_unary("/m.S/M")
    for i in range(10):
        assert await method(b"x", metadata=(("x-request-id", f"r{i}"),)) == b"x"
    stats = proxy.shadows.stats["cand"]
    assert (stats.sent, stats.dropped) == (3, 7)
    assert proxy.shadows.in_flight()["cand"] == 3
    await wait_for(lambda: len(shadow.received) == 3)
    assert proxy.recorder.flush()
    proxy_spans = {
        s.attributes["shadow.request_id"]: s
        for s in spans.get_finished_spans()
        if s.attributes["shadow.role"] == "proxy"
    }
    assert [proxy_spans[f"r{i}"].attributes["shadow.dropped"] for i in range(10)] == [()] * 3 + [
        ("cand",)
    ] * 7
    # Stopping cancels the hanging calls after the grace and still records them.
    await proxy.stop()
    assert stats.cancelled == 3
    shadow_spans = [s for s in spans.get_finished_spans() if s.name == "shadow cand"]
    assert len(shadow_spans) == 3
    assert {s.attributes["rpc.grpc.status_code"] for s in shadow_spans} == {
        grpc.StatusCode.CANCELLED.value[0]
    }


async def test_shadow_timeout_is_its_own(backends, make_proxy, channel_to):
    production = await backends()
    shadow = await backends(Behaviour(delay=1.0))
    proxy, _ = await make_proxy(
        f"prod={production.address}", [f"cand={shadow.address},timeout=200ms"]
    )
    await channel_to(proxy.address).unary_unary("/m.S/M")(b"x")
    stats = proxy.shadows.stats["cand"]
    await wait_for(lambda: stats.timed_out == 1, timeout=2)
    assert stats.errors_by_code == {"DEADLINE_EXCEEDED": 1}


async def test_shadow_outlives_the_client_call(backends, make_proxy, channel_to):
    production = await backends()
    shadow = await backends(Behaviour(delay=0.3))
    proxy, _ = await make_proxy(f"prod={production.address}", [f"cand={shadow.address}"])
    # The client's deadline is far shorter than the shadow's work; the shadow still finishes.
    assert await channel_to(proxy.address).unary_unary("/m.S/M")(b"x", timeout=0.1) == b"x"
    await wait_for(lambda: proxy.shadows.stats["cand"].ok == 1, timeout=2)
    assert shadow.completed == 1 and shadow.cancelled == 0


async def test_sampling_is_deterministic_per_request_id(backends, make_proxy, channel_to):
    production = await backends()
    half = await backends()
    tenth = await backends()
    proxy, _ = await make_proxy(
        f"prod={production.address}",
        [f"half={half.address},sample=0.5", f"tenth={tenth.address},sample=0.1"],
    )
    method = channel_to(proxy.address).unary_unary("/m.S/M")
    ids = [f"user-{i}" for i in range(200)]
    for _round in range(2):  # the same ids twice: the same decisions twice
        for request_id in ids:
            await method(request_id.encode(), metadata=(("x-request-id", request_id),))
    expected_half = [i for i in ids if should_shadow(i, 0.5)]
    expected_tenth = [i for i in ids if should_shadow(i, 0.1)]
    await wait_for(lambda: len(half.received) == 2 * len(expected_half))
    await wait_for(lambda: len(tenth.received) == 2 * len(expected_tenth))
    got_half = [r.metadata["x-request-id"] for r in half.received]
    got_tenth = [r.metadata["x-request-id"] for r in tenth.received]
    assert sorted(got_half) == sorted(expected_half * 2)
    assert sorted(got_tenth) == sorted(expected_tenth * 2)
    assert 60 <= len(expected_half) <= 140 and 5 <= len(expected_tenth) <= 40
    assert set(expected_tenth) <= set(expected_half)
    assert proxy.shadows.stats["half"].sampled_out == 2 * (200 - len(expected_half))


async def test_many_concurrent_calls_with_a_hanging_shadow_stay_bounded(
    backends, make_proxy, channel_to
):
    production = await backends()
    shadow = await backends(Behaviour(hang=True))
    proxy, _ = await make_proxy(
        f"prod={production.address}",
        [f"cand={shadow.address},max_in_flight=16,timeout=60s"],
        shadow_grace=0.1,
    )
    method = channel_to(proxy.address).unary_unary("/m.S/M")
    replies = await asyncio.gather(*(method(f"{i}".encode()) for i in range(300)))
    assert replies == [f"{i}".encode() for i in range(300)]
    stats = proxy.shadows.stats["cand"]
    assert proxy.shadows.in_flight()["cand"] == 16
    assert stats.sent == 16 and stats.dropped == 284
