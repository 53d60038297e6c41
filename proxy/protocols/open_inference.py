"""Placeholder: filled in by the work on issue 6."""

from __future__ import annotations

from proxy.protocols import MethodCodec

CODECS: tuple[MethodCodec, ...] = ()
