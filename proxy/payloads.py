"""Turn request and reply bytes into readable, capped, redacted span-event attributes."""

from __future__ import annotations

import base64
from collections.abc import Iterable
from typing import Any

import orjson

from proxy.protocols import REDACTED, codec_for
from proxy.records import Metadata

__all__ = ["REDACTED", "PayloadCodec", "metadata_attributes"]


class PayloadCodec:
    """Encodes payloads for span events: JSON for methods the proxy can read
    (:mod:`proxy.protocols`), base64 otherwise."""

    def __init__(self, max_bytes: int, redact_tensors: Iterable[str] = ()) -> None:
        self.max_bytes = max_bytes
        self.redact_tensors = frozenset(redact_tensors)

    def decode(self, method: str, data: bytes, *, reply: bool) -> dict[str, Any] | None:
        """The message as a JSON-ready dict (tensor redaction applied), or None when the
        method is not one the proxy reads or the bytes do not parse."""
        codec = codec_for(method)
        if codec is None:
            return None
        as_dict = codec.payload(data, reply=reply)
        if as_dict is not None and self.redact_tensors:
            codec.redact(as_dict, self.redact_tensors)
        return as_dict

    def event_attributes(self, method: str, data: bytes, *, reply: bool) -> dict[str, Any]:
        """Attributes of one payload event: type, encoding, the (capped) payload, sizes."""
        codec = codec_for(method)
        decoded = self.decode(method, data, reply=reply) if codec is not None else None
        attributes: dict[str, Any] = {"payload.size": len(data)}
        if decoded is not None and codec is not None:
            attributes["message.type"] = codec.reply_type if reply else codec.request_type
            attributes["payload.encoding"] = "json"
            encoded = orjson.dumps(decoded)
            truncated = len(encoded) > self.max_bytes
            text = (encoded[: self.max_bytes] if truncated else encoded).decode("utf-8", "ignore")
        elif codec is not None and self.redact_tensors:
            # Undecodable bytes of a known message may hold a redacted tensor: keep them out.
            attributes["payload.decode_error"] = True
            attributes["payload.encoding"] = "redacted"
            text, truncated = "[REDACTED: undecodable message]", False
        else:
            if codec is not None:
                attributes["payload.decode_error"] = True
            attributes["payload.encoding"] = "base64"
            # Cut before encoding so the event holds at most max_bytes of base64 text.
            keep = (self.max_bytes // 4) * 3
            truncated = len(data) > keep
            text = base64.b64encode(data[:keep] if truncated else data).decode("ascii")
        attributes["payload"] = text
        attributes["payload.truncated"] = truncated
        return attributes


def metadata_attributes(prefix: str, metadata: Metadata, redact: frozenset[str]) -> dict[str, Any]:
    """gRPC metadata as ``<prefix>.<key>`` string-array attributes (the RPC conventions' form),
    with redacted keys' values replaced and binary values base64-encoded."""
    grouped: dict[str, list[str]] = {}
    for key, value in metadata:
        if key in redact:
            text = REDACTED
        elif isinstance(value, bytes):
            text = base64.b64encode(value).decode("ascii")
        else:
            text = value
        grouped.setdefault(f"{prefix}.{key}", []).append(text)
    return {key: tuple(values) for key, values in grouped.items()}
