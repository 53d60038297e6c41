"""Tests of model_servers (real grpc.aio servers on free ports) and proxy/tensors.py."""

from __future__ import annotations

import asyncio
import math
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from model_servers import (
    CLASS_NAMES,
    FAMILY,
    FEATURE_COUNT,
    MODELS,
    BindError,
    ModelServerOptions,
    RunningModelServer,
    heldout,
    start_model_server,
)
from model_servers.cli import main as cli_main
from model_servers.models import fitted_model
from model_servers.server import PROTOCOLS, parse_listen
from proxy.gen import predict_pb2, predict_pb2_grpc
from proxy.tensors import TensorError, dtype_name, from_tensor, to_tensor

REPO_ROOT = Path(__file__).resolve().parent.parent
PREDICT_METHOD = "/predict.v1.PredictionService/Predict"
FP32 = predict_pb2.DATA_TYPE_FP32
FP64 = predict_pb2.DATA_TYPE_FP64

# ---------------------------------------------------------------------------- helpers


def _request(
    rows: Any = None, *, dtype: int | None = None, **fields: Any
) -> predict_pb2.PredictRequest:
    """A PredictRequest with `rows` (default: 3 held-out rows) as its 'features' input."""
    features = heldout()[0][:3] if rows is None else rows
    return predict_pb2.PredictRequest(inputs=[to_tensor("features", features, dtype)], **fields)


def _outputs(reply: predict_pb2.PredictResponse) -> dict[str, np.ndarray]:
    return {tensor.name: from_tensor(tensor) for tensor in reply.outputs}


async def _predict(
    server: RunningModelServer,
    request: predict_pb2.PredictRequest,
    *,
    metadata: Sequence[tuple[str, str | bytes]] = (),
    rpc_timeout: float = 5.0,
) -> predict_pb2.PredictResponse:
    async with grpc.aio.insecure_channel(server.address) as channel:
        stub = predict_pb2_grpc.PredictionServiceStub(channel)
        return await stub.Predict(request, metadata=metadata, timeout=rpc_timeout)


async def _predict_raw(server: RunningModelServer, payload: bytes) -> bytes:
    """Send bytes as they are, so tests can send what no stub would serialize."""
    async with grpc.aio.insecure_channel(server.address) as channel:
        return await channel.unary_unary(PREDICT_METHOD)(payload, timeout=5.0)


async def _rpc_error(call: Any) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await call
    return caught.value


@pytest.fixture
async def logreg() -> AsyncIterator[RunningModelServer]:
    server = await start_model_server(ModelServerOptions(seed=0))
    yield server
    await server.stop(grace=None)


@pytest.fixture
async def gboost() -> AsyncIterator[RunningModelServer]:
    server = await start_model_server(ModelServerOptions(model="gboost-v2", seed=0))
    yield server
    await server.stop(grace=None)


# ------------------------------------------------------------------------ predictions


async def test_prediction_has_labels_and_probabilities(logreg: RunningModelServer) -> None:
    features, _ = heldout()
    reply = await _predict(logreg, _request(features[:5], request_id="req-1"))

    assert (reply.model_name, reply.model_version, reply.request_id) == ("logreg-v1", "1", "req-1")
    assert [(t.name, t.dtype) for t in reply.outputs] == [
        ("label", predict_pb2.DATA_TYPE_INT64),
        ("probabilities", FP32),
    ]
    outputs = _outputs(reply)
    assert outputs["label"].shape == (5,)
    assert outputs["probabilities"].shape == (5, 2)
    np.testing.assert_allclose(outputs["probabilities"].sum(axis=1), 1.0, atol=1e-6)
    assert (outputs["label"] == outputs["probabilities"].argmax(axis=1)).all()


async def test_one_fp32_row_of_shape_30_is_a_batch_of_one(logreg: RunningModelServer) -> None:
    row = heldout()[0][0].astype(np.float32)
    assert row.shape == (FEATURE_COUNT,)
    outputs = _outputs(await _predict(logreg, _request(row)))
    assert outputs["label"].shape == (1,)
    assert outputs["probabilities"].shape == (1, 2)


async def test_request_id_falls_back_to_x_request_id_metadata(logreg: RunningModelServer) -> None:
    from_metadata = await _predict(logreg, _request(), metadata=[("x-request-id", "meta-7")])
    field_wins = await _predict(
        logreg, _request(request_id="field-7"), metadata=[("x-request-id", "meta-7")]
    )
    neither = await _predict(logreg, _request())
    assert from_metadata.request_id == "meta-7"
    assert field_wins.request_id == "field-7"
    assert neither.request_id == ""


@pytest.mark.parametrize(
    ("model_name", "model_version"), [("", ""), (FAMILY, "1"), ("logreg-v1", "")]
)
async def test_accepts_family_own_name_and_empty(
    logreg: RunningModelServer, model_name: str, model_version: str
) -> None:
    reply = await _predict(logreg, _request(model_name=model_name, model_version=model_version))
    assert reply.model_name == "logreg-v1"


async def test_models_disagree_on_a_few_heldout_rows(
    logreg: RunningModelServer, gboost: RunningModelServer
) -> None:
    features, truth = heldout()
    production = _outputs(await _predict(logreg, _request(features)))["label"]
    candidate = _outputs(await _predict(gboost, _request(features)))["label"]

    disagreements = int((production != candidate).sum())
    assert 0 < disagreements <= 20, disagreements  # 10 of 171 with scikit-learn 1.9
    assert (production == truth).mean() > 0.9
    assert (candidate == truth).mean() > 0.9
    # The server answers exactly what the model says locally.
    local_labels, _ = fitted_model("gboost-v2").predict(features)
    assert (candidate == local_labels).all()


def test_heldout_split_and_class_names() -> None:
    from sklearn.datasets import load_breast_cancer

    features, labels = heldout()
    assert features.shape == (171, FEATURE_COUNT)
    assert (features.dtype, labels.dtype) == (np.float64, np.int64)
    assert tuple(load_breast_cancer().target_names) == CLASS_NAMES
    features[:] = 0  # a copy: the next caller still gets the real rows
    assert heldout()[0].any()


# ----------------------------------------------------------------------- bad requests


def _tensor_request(**tensor_fields: Any) -> bytes:
    return predict_pb2.PredictRequest(
        inputs=[predict_pb2.Tensor(**tensor_fields)]
    ).SerializeToString()


def _rows(n: int, width: int = FEATURE_COUNT) -> list[float]:
    return [1.0] * (n * width)


_BAD_REQUESTS = {
    "unknown model": (
        _request(model_name="iris").SerializeToString(),
        grpc.StatusCode.NOT_FOUND,
        "unknown model 'iris': this server serves 'logreg-v1' version '1' (breast-cancer)",
    ),
    "unknown version": (
        _request(model_version="7").SerializeToString(),
        grpc.StatusCode.NOT_FOUND,
        "unknown version '7' of model 'logreg-v1'",
    ),
    "no inputs": (
        b"",
        grpc.StatusCode.INVALID_ARGUMENT,
        "expected exactly one input tensor named 'features'",
    ),
    "wrong input name": (
        _tensor_request(name="x", dtype=FP64, shape=[1, 30], contents={"fp64_contents": _rows(1)}),
        grpc.StatusCode.INVALID_ARGUMENT,
        "expected exactly one input tensor named 'features' (FP32 or FP64, shape [batch, 30]), "
        "got ['x']",
    ),
    "two inputs": (
        predict_pb2.PredictRequest(
            inputs=[to_tensor("features", [_rows(1)]), to_tensor("extra", [1.0])]
        ).SerializeToString(),
        grpc.StatusCode.INVALID_ARGUMENT,
        "got ['features', 'extra']",
    ),
    "int64 dtype": (
        _tensor_request(name="features", dtype=predict_pb2.DATA_TYPE_INT64, shape=[30]),
        grpc.StatusCode.INVALID_ARGUMENT,
        "expected FP32 or FP64, got INT64",
    ),
    "unspecified dtype": (
        _tensor_request(name="features", shape=[30]),
        grpc.StatusCode.INVALID_ARGUMENT,
        "expected FP32 or FP64, got UNSPECIFIED",
    ),
    "29 columns": (
        _tensor_request(name="features", dtype=FP64, shape=[2, 29]),
        grpc.StatusCode.INVALID_ARGUMENT,
        "expected shape [batch, 30] with batch >= 1 (or [30] for one row), got [2, 29]",
    ),
    "empty batch": (
        _tensor_request(name="features", dtype=FP64, shape=[0, 30]),
        grpc.StatusCode.INVALID_ARGUMENT,
        "expected shape [batch, 30]",
    ),
    "three dimensions": (
        _tensor_request(name="features", dtype=FP64, shape=[1, 30, 1]),
        grpc.StatusCode.INVALID_ARGUMENT,
        "expected shape [batch, 30]",
    ),
    "too few values": (
        _tensor_request(
            name="features", dtype=FP32, shape=[2, 30], contents={"fp32_contents": _rows(2)[1:]}
        ),
        grpc.StatusCode.INVALID_ARGUMENT,
        "tensor 'features' has shape [2, 30] (60 values) but 59 FP32 values",
    ),
    "nan": (
        _tensor_request(
            name="features",
            dtype=FP64,
            shape=[2, 30],
            contents={"fp64_contents": [*_rows(1), math.nan, *_rows(1)[1:]]},
        ),
        grpc.StatusCode.INVALID_ARGUMENT,
        "row 1 holds NaN or infinity; values must be finite",
    ),
    "undecodable": (
        b"\x0a\x05ab",  # field 1, length 5, but only 2 bytes follow
        grpc.StatusCode.INVALID_ARGUMENT,
        "request is not a valid predict.v1.PredictRequest",
    ),
}


@pytest.mark.parametrize(("payload", "code", "message"), _BAD_REQUESTS.values(), ids=_BAD_REQUESTS)
async def test_bad_request_is_rejected_with_a_clear_message(
    logreg: RunningModelServer, payload: bytes, code: grpc.StatusCode, message: str
) -> None:
    error = await _rpc_error(_predict_raw(logreg, payload))
    assert error.code() == code
    assert message in (error.details() or "")


# -------------------------------------------------------------------- fault injection


async def test_latency_is_injected() -> None:
    server = await start_model_server(
        ModelServerOptions(latency_ms=150, latency_jitter_ms=30, seed=1)
    )
    try:
        started = time.monotonic()
        await _predict(server, _request())
        elapsed = time.monotonic() - started
    finally:
        await server.stop(grace=None)
    assert 0.115 <= elapsed < 2.0, elapsed


async def test_error_rate_one_always_fails_unavailable() -> None:
    server = await start_model_server(ModelServerOptions(error_rate=1.0))
    try:
        error = await _rpc_error(_predict(server, _request()))
    finally:
        await server.stop(grace=None)
    assert error.code() == grpc.StatusCode.UNAVAILABLE
    assert error.details() == "injected failure (--error-rate 1)"


async def test_error_rate_half_fails_some_calls_repeatably() -> None:
    async def outcomes() -> list[bool]:
        server = await start_model_server(ModelServerOptions(error_rate=0.5, seed=3))
        results = []
        try:
            async with grpc.aio.insecure_channel(server.address) as channel:
                stub = predict_pb2_grpc.PredictionServiceStub(channel)
                for _ in range(30):
                    try:
                        await stub.Predict(_request(), timeout=5.0)
                        results.append(True)
                    except grpc.aio.AioRpcError as exc:
                        assert exc.code() == grpc.StatusCode.UNAVAILABLE
                        results.append(False)
        finally:
            await server.stop(grace=None)
        return results

    first = await outcomes()
    assert 0 < sum(first) < len(first)
    assert await outcomes() == first  # the seed makes the run repeatable


async def test_hang_never_answers_and_stop_stays_prompt() -> None:
    server = await start_model_server(ModelServerOptions(hang=True))
    async with grpc.aio.insecure_channel(server.address) as channel:
        stub = predict_pb2_grpc.PredictionServiceStub(channel)
        timed_out = await _rpc_error(stub.Predict(_request(), timeout=0.3))
        assert timed_out.code() == grpc.StatusCode.DEADLINE_EXCEEDED

        # A call with no deadline is still held when the server stops.
        held = asyncio.ensure_future(stub.Predict(_request()))
        # The server offers a counter, not an event, so poll it.
        while server.calls < 2:  # noqa: ASYNC110
            await asyncio.sleep(0.01)
        started = time.monotonic()
        await server.stop(grace=5.0)
        assert time.monotonic() - started < 1.0
        stopped = await _rpc_error(held)
        assert stopped.code() == grpc.StatusCode.UNAVAILABLE


# ------------------------------------------------------- health, reflection, received


async def test_health_is_serving(logreg: RunningModelServer) -> None:
    async with grpc.aio.insecure_channel(logreg.address) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        for service in ("", "predict.v1.PredictionService"):
            reply = await stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=5)
            assert reply.status == health_pb2.HealthCheckResponse.SERVING


async def test_reflection_lists_the_services(logreg: RunningModelServer) -> None:
    async with grpc.aio.insecure_channel(logreg.address) as channel:
        stub = reflection_pb2_grpc.ServerReflectionStub(channel)
        request = reflection_pb2.ServerReflectionRequest(list_services="")
        replies = [reply async for reply in stub.ServerReflectionInfo(iter([request]))]
    names = {service.name for service in replies[0].list_services_response.service}
    assert names == {
        "predict.v1.PredictionService",
        "grpc.health.v1.Health",
        "grpc.reflection.v1alpha.ServerReflection",
    }


async def test_received_holds_exact_bytes_and_metadata(logreg: RunningModelServer) -> None:
    request = _request(request_id="r-1", parameters={"threshold": "0.5"})
    before = time.monotonic()
    await _predict(logreg, request, metadata=[("x-request-id", "m-1"), ("trace-bin", b"\x00\x01")])
    await _rpc_error(_predict_raw(logreg, b"\x0a\x05ab"))

    assert logreg.calls == 2
    first, second = logreg.received
    assert first.request_bytes == request.SerializeToString()
    assert ("x-request-id", "m-1") in first.metadata
    assert ("trace-bin", b"\x00\x01") in first.metadata
    assert second.request_bytes == b"\x0a\x05ab"  # rejected calls are recorded too
    assert before <= first.received_at <= second.received_at <= time.monotonic()


# ------------------------------------------------------------------- options, binding


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"model": "iris"}, "unknown model 'iris'; known models: gboost-v2, logreg-v1"),
        ({"error_rate": 1.5}, "error_rate must be between 0 and 1"),
        ({"error_rate": math.nan}, "error_rate must be between 0 and 1"),
        ({"latency_ms": -1}, "latency_ms must be a finite number >= 0"),
        ({"latency_jitter_ms": math.inf}, "latency_jitter_ms must be a finite number >= 0"),
        ({"listen": "localhost"}, "listen address must be HOST:PORT"),
        ({"listen": "localhost:http"}, "listen address must be HOST:PORT"),
        ({"listen": "localhost:70000"}, "PORT in 0..65535"),
        ({"listen": ":50061"}, "listen address must be HOST:PORT"),
        ({"listen": "::1:50061"}, "IPv6 as [ADDR]:PORT"),
    ],
)
def test_bad_options_are_refused(fields: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=re.escape(message)):
        ModelServerOptions(**fields)


def test_parse_listen() -> None:
    assert parse_listen("127.0.0.1:0") == ("127.0.0.1", 0)
    assert parse_listen("[::1]:50061") == ("::1", 50061)
    assert parse_listen("localhost:1") == ("localhost", 1)


async def test_port_in_use_is_a_clear_error(logreg: RunningModelServer) -> None:
    with pytest.raises(BindError, match="port is in use"):
        await start_model_server(ModelServerOptions(listen=f"127.0.0.1:{logreg.port}"))


# ----------------------------------------------------------------------------- tensors


@pytest.mark.parametrize(
    ("array", "dtype"),
    [
        (np.arange(6, dtype=np.float32).reshape(2, 3) / 7, predict_pb2.DATA_TYPE_FP32),
        (np.arange(6, dtype=np.float64).reshape(3, 2) / 7, predict_pb2.DATA_TYPE_FP64),
        (np.array([-(2**62), 0, 2**62], dtype=np.int64), predict_pb2.DATA_TYPE_INT64),
        (np.array([[-(2**31)], [2**31 - 1]], dtype=np.int32), predict_pb2.DATA_TYPE_INT32),
        (np.array([True, False, True]), predict_pb2.DATA_TYPE_BOOL),
        (np.array(2.5), predict_pb2.DATA_TYPE_FP64),  # a scalar: shape []
        (np.zeros((0, 30), dtype=np.float32), predict_pb2.DATA_TYPE_FP32),
    ],
)
def test_tensor_round_trip(array: np.ndarray, dtype: int) -> None:
    tensor = to_tensor("t", array)
    assert tensor.dtype == dtype
    assert list(tensor.shape) == list(array.shape)
    wire = predict_pb2.Tensor.FromString(tensor.SerializeToString())
    back = from_tensor(wire)
    assert back.dtype == array.dtype
    np.testing.assert_array_equal(back, array)


def test_bytes_tensors_keep_every_element_exactly() -> None:
    strings = to_tensor("s", np.array([["a", "é"], ["", "xyz"]]))
    assert strings.dtype == predict_pb2.DATA_TYPE_BYTES
    assert list(strings.contents.bytes_contents) == [b"a", "é".encode(), b"", b"xyz"]
    raw = from_tensor(to_tensor("b", [b"\x00\x01\x00", b"trailing\x00"]))
    assert raw.dtype == object
    assert raw.tolist() == [b"\x00\x01\x00", b"trailing\x00"]
    mixed = from_tensor(to_tensor("o", np.array(["text", b"bytes"], dtype=object)))
    assert mixed.tolist() == [b"text", b"bytes"]


def test_explicit_dtype_converts_lists() -> None:
    tensor = to_tensor("f", [[1, 2], [3, 4]], predict_pb2.DATA_TYPE_FP32)
    assert tensor.dtype == FP32
    assert list(tensor.contents.fp32_contents) == [1.0, 2.0, 3.0, 4.0]
    assert from_tensor(tensor).dtype == np.float32
    assert to_tensor("i", [1, 2]).dtype == predict_pb2.DATA_TYPE_INT64  # Python ints


def test_tensor_errors_say_what_is_wrong() -> None:
    mismatch = predict_pb2.Tensor(name="features", dtype=FP32, shape=[2, 30])
    mismatch.contents.fp32_contents.extend([0.0] * 59)
    with pytest.raises(TensorError) as caught:
        from_tensor(mismatch)
    assert str(caught.value) == "tensor 'features' has shape [2, 30] (60 values) but 59 FP32 values"

    with pytest.raises(TensorError, match=r"tensor 'x' has no dtype \(DATA_TYPE_UNSPECIFIED\)"):
        from_tensor(predict_pb2.Tensor(name="x", shape=[1]))
    with pytest.raises(TensorError, match="negative dimension"):
        from_tensor(predict_pb2.Tensor(name="x", dtype=FP32, shape=[-1]))
    with pytest.raises(TensorError, match=r"no predict\.v1 DataType for numpy dtype float16"):
        to_tensor("h", np.zeros(2, dtype=np.float16))
    with pytest.raises(TensorError, match="BYTES elements must be str or bytes, got int"):
        to_tensor("o", np.array([1, "a"], dtype=object))
    with pytest.raises(TensorError, match="tensor 'u': cannot convert object values to FP64"):
        to_tensor("u", ["a"], FP64)
    assert issubclass(TensorError, ValueError)
    assert dtype_name(predict_pb2.DATA_TYPE_INT64) == "INT64"
    assert dtype_name(99) == "DataType(99)"


# --------------------------------------------------------------------------------- CLI


def test_help_mentions_every_flag_and_model(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        cli_main(["--help"])
    assert exited.value.code == 0
    text = capsys.readouterr().out
    flags = ["--listen", "--model", "--latency-ms", "--latency-jitter-ms", "--error-rate"]
    flags += ["--hang", "--seed", "--ready-file", "--log-level", "--protocol"]
    for word in [*flags, *MODELS, *PROTOCOLS]:
        assert word in text, word


def _model_server_command(*args: str) -> list[str]:
    return [sys.executable, "-m", "model_servers", *args]


def test_bad_flag_value_exits_2_with_one_line() -> None:
    finished = subprocess.run(
        _model_server_command("--error-rate", "2"),
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert finished.returncode == 2
    assert finished.stderr.splitlines() == [
        "model-server: error: argument --error-rate: expected a number from 0 to 1, got '2' "
        "(see --help)"
    ]


def test_cli_serves_until_sigterm(tmp_path: Path) -> None:
    ready_file = tmp_path / "ready"
    process = subprocess.Popen(
        _model_server_command("--listen", "127.0.0.1:0", "--ready-file", str(ready_file)),
        cwd=REPO_ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 15  # ~1 s in practice; generous for slow CI
        while not ready_file.exists():
            assert process.poll() is None, process.communicate()[1]
            assert time.monotonic() < deadline, "model-server did not become ready"
            time.sleep(0.05)
        address = ready_file.read_text()
        assert address.endswith("\n")
        address = address.strip()
        host, port = parse_listen(address)
        assert host == "127.0.0.1" and port > 0

        with grpc.insecure_channel(address) as channel:
            stub = predict_pb2_grpc.PredictionServiceStub(channel)
            reply = stub.Predict(_request(request_id="cli"), timeout=5)
        assert (reply.model_name, reply.request_id) == ("logreg-v1", "cli")

        process.send_signal(signal.SIGTERM)
        _, stderr = process.communicate(timeout=10)
    finally:
        if process.poll() is None:
            process.kill()
            process.communicate()
    assert process.returncode == 0, stderr
    assert f"model-server: serving logreg-v1 (version 1, breast-cancer) on {address}" in stderr
    assert "SIGTERM received" in stderr
    assert not ready_file.exists()


def test_cli_reports_a_port_in_use(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # In-process, so the model is already trained; a plain socket holds the port.
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        status = cli_main(["--listen", f"127.0.0.1:{port}", "--ready-file", str(tmp_path / "r")])
    assert status == 1
    assert f"model-server: error: cannot listen on 127.0.0.1:{port}" in capsys.readouterr().err
    assert not (tmp_path / "r").exists()
