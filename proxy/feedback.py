"""The Feedback service: true labels for earlier calls, recorded off the request path."""

from __future__ import annotations

import time
from collections.abc import Callable

import grpc
from grpc import aio

from proxy.gen import feedback_pb2, feedback_pb2_grpc
from proxy.records import FeedbackRecord

MAX_LABELS_PER_CALL = 10_000
FEEDBACK_SERVICE = feedback_pb2.DESCRIPTOR.services_by_name["FeedbackService"].full_name


class FeedbackServicer(feedback_pb2_grpc.FeedbackServiceServicer):
    """Validates a batch of labels whole, then hands each to the recorder."""

    def __init__(self, record: Callable[[FeedbackRecord], None]) -> None:
        self._record = record
        self.accepted = 0

    async def SubmitLabels(
        self, request: feedback_pb2.SubmitLabelsRequest, context: aio.ServicerContext
    ) -> feedback_pb2.SubmitLabelsResponse:
        if len(request.labels) > MAX_LABELS_PER_CALL:
            await context.abort(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"{len(request.labels)} labels in one call; send at most {MAX_LABELS_PER_CALL}",
            )
        for index, label in enumerate(request.labels):
            if not label.request_id:
                await context.abort(
                    grpc.StatusCode.INVALID_ARGUMENT, f"labels[{index}]: request_id is empty"
                )
            if not label.labels:
                await context.abort(
                    grpc.StatusCode.INVALID_ARGUMENT,
                    f"labels[{index}] ({label.request_id}): no label values",
                )
        now = time.time_ns()
        for label in request.labels:
            self._record(
                FeedbackRecord(
                    request_id=label.request_id,
                    labels=tuple(label.labels),
                    output=label.output or "label",
                    received_ns=now,
                )
            )
        self.accepted += len(request.labels)
        return feedback_pb2.SubmitLabelsResponse(accepted=len(request.labels))
