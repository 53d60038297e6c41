"""Methods that are never shadowed: health, readiness and metadata calls go to production only."""

from __future__ import annotations

import subprocess
import sys

import pytest

from proxy.errors import ConfigError
from proxy.protocols import DEFAULT_NEVER_SHADOWED
from proxy.settings import load_settings
from tests.backends import wait_for

SERVER_LIVE = "/inference.GRPCInferenceService/ServerLive"
MODEL_METADATA = "/inference.GRPCInferenceService/ModelMetadata"
TF_METADATA = "/tensorflow.serving.PredictionService/GetModelMetadata"
MODEL_INFER = "/inference.GRPCInferenceService/ModelInfer"
TF_PREDICT = "/tensorflow.serving.PredictionService/Predict"


async def _call_each(channel, methods: list[str]) -> None:
    for method in methods:
        reply = await channel.unary_unary(method)(method.encode(), timeout=5)
        assert reply == method.encode()  # production's echo, untouched


async def _settle(proxy, shadow, expected: int) -> None:
    # A copy is counted as sent before the client's reply returns, so the counter is exact
    # at once; the copies themselves arrive a little later.
    assert proxy.shadows.stats["cand"].sent == expected
    await wait_for(lambda: len(shadow.received) == expected)


@pytest.mark.asyncio
async def test_health_and_metadata_methods_go_to_production_only(
    backends, make_proxy, channel_to
) -> None:
    production, shadow = await backends(), await backends()
    proxy, _ = await make_proxy(f"prod={production.address}", [f"cand={shadow.address}"])
    channel = channel_to(proxy.address)
    never = [SERVER_LIVE, MODEL_METADATA, TF_METADATA]
    always = [MODEL_INFER, TF_PREDICT]
    await _call_each(channel, never + always)
    await _settle(proxy, shadow, len(always))
    assert [r.method for r in production.received] == never + always
    assert sorted(r.method for r in shadow.received) == sorted(always)


@pytest.mark.asyncio
async def test_never_shadowed_list_is_configurable_by_method_and_service(
    backends, make_proxy, channel_to
) -> None:
    production, shadow = await backends(), await backends()
    proxy, _ = await make_proxy(
        f"prod={production.address}",
        [f"cand={shadow.address}"],
        never_shadowed=["/tensorflow.serving.PredictionService/", "/other.v1.Svc/Slow"],
    )
    channel = channel_to(proxy.address)
    await _call_each(channel, [TF_PREDICT, TF_METADATA, "/other.v1.Svc/Slow", SERVER_LIVE])
    await _settle(proxy, shadow, 1)
    # The list replaces the default: ServerLive is shadowed now, the whole TF service is not.
    assert [r.method for r in shadow.received] == [SERVER_LIVE]
    assert len(production.received) == 4


@pytest.mark.asyncio
async def test_none_shadows_every_method(backends, make_proxy, channel_to) -> None:
    production, shadow = await backends(), await backends()
    proxy, _ = await make_proxy(
        f"prod={production.address}", [f"cand={shadow.address}"], never_shadowed="none"
    )
    await _call_each(channel_to(proxy.address), [SERVER_LIVE])
    await _settle(proxy, shadow, 1)
    assert [r.method for r in shadow.received] == [SERVER_LIVE]


def test_default_and_parsed_settings() -> None:
    base = {"production": "prod=127.0.0.1:1"}
    assert load_settings(overrides=base, environ={}).never_shadowed == DEFAULT_NEVER_SHADOWED
    parsed = load_settings(
        overrides={**base, "never_shadowed": ["/a.B/C", " /a.B/C ", "/x.Y/"]}, environ={}
    )
    assert parsed.never_shadowed == ("/a.B/C", "/x.Y/")
    assert load_settings(overrides={**base, "never_shadowed": []}, environ={}).never_shadowed == ()
    from_string = load_settings(overrides={**base, "never_shadowed": "/a.B/C,/d.E/F"}, environ={})
    assert from_string.never_shadowed == ("/a.B/C", "/d.E/F")


@pytest.mark.parametrize(
    "bad", ["ServerLive", "/a.B/C/D", "a.B/C", "/", "/a.B/C D", "/tensorflow.serving.Svc"]
)
def test_bad_method_names_are_refused_with_the_expected_form(bad: str) -> None:
    with pytest.raises(ConfigError, match=r"/package\.Service/Method, or .* trailing slash"):
        load_settings(
            overrides={"production": "prod=127.0.0.1:1", "never_shadowed": [bad]}, environ={}
        )


def test_cli_flag_replaces_the_default_and_bad_ones_exit_2(tmp_path) -> None:
    from proxy.cli import build_parser, settings_from_args

    args = build_parser().parse_args(
        ["serve", "--production", "p=127.0.0.1:1", "--never-shadow", "/a.B/C"]
    )
    assert settings_from_args(args).never_shadowed == ("/a.B/C",)
    result = subprocess.run(
        [sys.executable, "-m", "proxy", "serve", "--production", "p=127.0.0.1:1",
         "--never-shadow", "ServerLive", "--state-file", "none"],
        capture_output=True, text=True, timeout=60, cwd=tmp_path,
    )  # fmt: skip
    assert result.returncode == 2
    assert "--never-shadow: 'ServerLive' is not a gRPC method name" in result.stderr
