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
