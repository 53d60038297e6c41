"""The fast OTLP JSON encoder writes exactly what OpenTelemetry's own file exporter writes."""

from __future__ import annotations

import json

import orjson
from opentelemetry import trace
from opentelemetry.exporter.otlp.json.common.trace_encoder import encode_spans as official
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import NonRecordingSpan, SpanContext, SpanKind, TraceFlags, TraceState
from opentelemetry.trace.status import Status, StatusCode

from proxy.otlp_json import JsonLinesSpanExporter, encode_spans


def _spans():
    memory = InMemorySpanExporter()
    provider = TracerProvider(resource=Resource.create({"service.name": "t", "n": 3}))
    provider.add_span_processor(SimpleSpanProcessor(memory))
    tracer = provider.get_tracer("scope-a", "1.2")
    other = provider.get_tracer("scope-b")
    remote = SpanContext(
        0x4BF92F3577B34DA6A3CE929D0E0E4736,
        0x00F067AA0BA902B7,
        is_remote=True,
        trace_flags=TraceFlags(1),
        trace_state=TraceState([("vendor", "abc")]),
    )
    parent = trace.set_span_in_context(NonRecordingSpan(remote))
    span = tracer.start_span(
        "root",
        context=parent,
        kind=SpanKind.SERVER,
        attributes={
            "s": "text ünïcode",
            "i": 7,
            "big": 2**62,
            "f": 1.5,
            "b": True,
            "strings": ("a", "b"),
            "empty": (),
            "ints": (1, 2),
            "bools": (False,),
        },
        links=[trace.Link(remote, {"why": "because"})],
        start_time=1_000,
    )
    span.add_event(
        "request", {"payload": '{"x": 1}', "payload.size": 9, "t": False}, timestamp=1_500
    )
    span.add_event("bare", timestamp=1_600)
    span.set_status(Status(StatusCode.ERROR, "UNAVAILABLE: gone"))
    span.end(end_time=2_000)
    child_context = trace.set_span_in_context(span)
    child = other.start_span("child", context=child_context, kind=SpanKind.CLIENT, start_time=1_100)
    child.set_status(Status(StatusCode.OK))
    child.end(end_time=1_900)
    plain = tracer.start_span("internal", start_time=5)
    plain.end(end_time=6)
    return memory.get_finished_spans()


def test_encoding_matches_the_official_encoder():
    spans = _spans()
    ours = json.loads(orjson.dumps(encode_spans(spans)))
    theirs = json.loads(json.dumps(official(spans).to_dict()))
    assert ours == theirs


def test_exporter_appends_one_line_per_batch(tmp_path):
    path = tmp_path / "t.jsonl"
    exporter = JsonLinesSpanExporter(path)
    spans = _spans()
    exporter.export(spans[:1])
    exporter.export(spans[1:])
    exporter.shutdown()
    lines = path.read_bytes().splitlines()
    assert len(lines) == 2
    names = [
        s["name"]
        for line in lines
        for r in json.loads(line)["resourceSpans"]
        for sc in r["scopeSpans"]
        for s in sc["spans"]
    ]
    assert names == [s.name for s in spans]


def _spans_of(resource: Resource, names: list[str]) -> list:
    memory = InMemorySpanExporter()
    provider = TracerProvider(resource=resource)
    provider.add_span_processor(SimpleSpanProcessor(memory))
    for name in names:
        scope = "scope-a" if name.endswith("a") else "scope-b"
        provider.get_tracer(scope).start_span(name, start_time=1).end(end_time=2)
    return list(memory.get_finished_spans())


def test_spans_of_several_resources_and_scopes_are_grouped_like_the_official_encoder():
    first = _spans_of(Resource.create({"service.name": "one"}), ["1a", "2b", "3a"])
    second = _spans_of(Resource.create({"service.name": "two"}), ["4a", "5b"])
    interleaved = [first[0], second[0], first[1], second[1], first[2]]
    ours = json.loads(orjson.dumps(encode_spans(interleaved)))
    theirs = json.loads(json.dumps(official(interleaved).to_dict()))
    assert ours == theirs


def test_equal_resources_of_different_providers_share_one_group():
    first = _spans_of(Resource.create({"service.name": "same"}), ["1a"])
    second = _spans_of(Resource.create({"service.name": "same"}), ["2a"])
    document = encode_spans([*first, *second])
    (group,) = document["resourceSpans"]
    (scope,) = group["scopeSpans"]
    assert [span["name"] for span in scope["spans"]] == ["1a", "2a"]


def test_cached_entries_encode_exactly_as_uncached_and_stay_bounded():
    from proxy.otlp_json import _EntryCache

    memory = InMemorySpanExporter()
    provider = TracerProvider(resource=Resource.create({"service.name": "t"}))
    provider.add_span_processor(SimpleSpanProcessor(memory))
    tracer = provider.get_tracer("s")
    for n in range(300):
        attributes = {
            "constant": "grpc",
            "flag": n % 2 == 0,
            "one": 1,  # equal to True: must stay an int
            "truth": True,
            "unique": f"request-{n}",
            "size": n,
            "long": "x" * 500 + str(n),
            f"header.{n}": "v",
            "labels": (str(n % 3),),
            "ratio": n / 7,
        }
        span = tracer.start_span("s", attributes=attributes, start_time=1)
        span.add_event("e", {"payload": str(n) * 50, "flag": True}, timestamp=2)
        span.end(end_time=3)
    spans = memory.get_finished_spans()
    cache = _EntryCache()
    for start in range(0, len(spans), 64):
        batch = spans[start : start + 64]
        assert orjson.dumps(encode_spans(batch, cache)) == orjson.dumps(encode_spans(batch))
    cached = {item for entries in cache._by_type.values() for item in entries}
    assert sum(1 for key, _ in cached if key == "unique") == _EntryCache._VALUES_PER_KEY
    assert not any(key == "long" for key, _ in cached)
    assert ("one", 1) in cache._by_type[int] and ("truth", True) in cache._by_type[bool]
    assert len(cache._distinct) <= _EntryCache._KEYS
