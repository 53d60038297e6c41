"""Do two predict.v1 replies agree? Same predicted label, or the same outputs."""

from __future__ import annotations

from typing import Any

LABEL_OUTPUT = "label"


def _outputs(reply: dict[str, Any]) -> dict[str, Any]:
    return {
        tensor.get("name", ""): tensor.get("contents", {}) for tensor in reply.get("outputs", [])
    }


def labels_agree(production: dict[str, Any], shadow: dict[str, Any]) -> bool:
    """True when the replies predict the same label (the ``label`` output), or, for models
    without one, when every output is equal."""
    ours, theirs = _outputs(production), _outputs(shadow)
    if LABEL_OUTPUT in ours and LABEL_OUTPUT in theirs:
        return bool(ours[LABEL_OUTPUT] == theirs[LABEL_OUTPUT])
    return ours == theirs
