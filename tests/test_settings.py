"""Settings: backend specs, durations, addresses, flags over a config file, exporters."""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest

from proxy.cli import build_parser, settings_from_args
from proxy.errors import ConfigError
from proxy.settings import (
    DEFAULT_SHADOW_TIMEOUT,
    BackendSettings,
    Settings,
    default_exporters,
    load_settings,
    parse_backend_spec,
    parse_duration,
    read_config_file,
    validate_address,
)

PRODUCTION = "prod=127.0.0.1:50061"


def _settings(config: Mapping[str, Any] | None = None, **overrides: Any) -> Settings:
    """Settings with a production backend and an empty environment, so OTEL_* set on the
    machine running the tests cannot change the result."""
    return load_settings(
        config=config, overrides={"production": PRODUCTION, **overrides}, environ={}
    )


def _message(excinfo: pytest.ExceptionInfo[ConfigError]) -> str:
    """The error's text, checked to be the one line the command line prints."""
    message = str(excinfo.value)
    assert message
    assert "\n" not in message, f"a ConfigError must be one line, got {message!r}"
    return message


# --------------------------------------------------------------------------- backend specs


def test_backend_spec_with_every_option() -> None:
    backend = parse_backend_spec(
        "candidate=10.0.0.2:50062,sample=0.25,timeout=2s,max_in_flight=64", "shadow"
    )
    assert backend == BackendSettings(
        name="candidate",
        address="10.0.0.2:50062",
        sample_rate=0.25,
        timeout=2.0,
        max_in_flight=64,
    )


def test_backend_spec_tolerates_spaces_and_option_aliases() -> None:
    backend = parse_backend_spec(
        " candidate = host:1 , sample_rate = 0.5 , max-in-flight = 3 ", "shadow"
    )
    assert (backend.name, backend.address) == ("candidate", "host:1")
    assert (backend.sample_rate, backend.max_in_flight) == (0.5, 3)


def test_shadow_defaults_to_a_five_second_timeout_and_production_to_none() -> None:
    settings = _settings(shadows=["candidate=127.0.0.1:50062"])
    assert settings.production.timeout is None
    (shadow,) = settings.shadows
    assert shadow.timeout == DEFAULT_SHADOW_TIMEOUT == 5.0
    assert (shadow.sample_rate, shadow.max_in_flight) == (1.0, 256)
    assert settings.backends == (settings.production, shadow)


def test_production_may_have_a_timeout_of_its_own() -> None:
    settings = _settings(production="prod=127.0.0.1:50061,timeout=1500ms")
    assert settings.production.timeout == 1.5


def test_backend_from_a_config_mapping() -> None:
    settings = _settings(
        config={
            "shadows": [
                {"name": "other", "address": "[::1]:50063", "timeout": "2s", "max_in_flight": 64},
                "candidate=127.0.0.1:50062,sample=0.5",
            ]
        }
    )
    assert settings.shadows == (
        BackendSettings("other", "[::1]:50063", timeout=2.0, max_in_flight=64),
        BackendSettings("candidate", "127.0.0.1:50062", sample_rate=0.5, timeout=5.0),
    )


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        ("candidate", "expected NAME=HOST:PORT"),
        ("candidate=host:1,sample", "expected key=value"),
        ("=host:1", "backend name"),
        ("-candidate=host:1", "backend name"),
        ("cand idate=host:1", "backend name"),
        ("candidate=host:1,weight=2", "unknown backend option 'weight'"),
        ("candidate=host:1,max_in_flight=0", "max_in_flight"),
        ("candidate=host:1,max_in_flight=1.5", "max_in_flight"),
        ("candidate=host:1,max_in_flight=many", "max_in_flight"),
    ],
)
def test_malformed_shadow_spec_is_rejected_naming_the_flag(spec: str, expected: str) -> None:
    with pytest.raises(ConfigError) as excinfo:
        _settings(shadows=[spec])
    message = _message(excinfo)
    assert message.startswith("--shadow")
    assert expected in message


def test_unknown_backend_option_lists_the_known_ones() -> None:
    with pytest.raises(ConfigError) as excinfo:
        parse_backend_spec("candidate=host:1,weight=2", "shadow")
    assert "known: ca, max_in_flight, sample, timeout, tls" in _message(excinfo)


def test_config_backend_mapping_without_an_address_is_rejected() -> None:
    with pytest.raises(ConfigError) as excinfo:
        _settings(config={"shadows": [{"name": "candidate"}]})
    assert "needs an address" in _message(excinfo)


# --------------------------------------------------------------------------- durations


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("2s", 2.0),
        ("500ms", 0.5),
        ("1.5", 1.5),
        ("1m", 60.0),
        (" 3 s ", 3.0),
        (".5s", 0.5),
        ("2.", 2.0),
        (2, 2.0),
        (0.25, 0.25),
    ],
)
def test_duration_is_parsed_to_seconds(text: str | float, seconds: float) -> None:
    assert parse_duration(text, "--shutdown-grace") == pytest.approx(seconds)


@pytest.mark.parametrize(
    "text",
    ["0", "0s", "0ms", "-1", "-1s", 0, -2.5, float("nan"), "abc", "1h", "2 seconds", "", ".", True],
)
def test_zero_negative_or_garbage_duration_is_rejected(text: Any) -> None:
    with pytest.raises(ConfigError) as excinfo:
        parse_duration(text, "--shutdown-grace")
    assert _message(excinfo).startswith("--shutdown-grace: ")


@pytest.mark.parametrize("key", ["shutdown_grace", "shadow_grace", "health_interval"])
def test_duration_settings_are_parsed_and_checked(key: str) -> None:
    assert getattr(_settings(config={key: "250ms"}), key) == 0.25
    with pytest.raises(ConfigError) as excinfo:
        _settings(config={key: "0"})
    assert f"--{key.replace('_', '-')}" in _message(excinfo)


def test_zero_backend_timeout_is_rejected_naming_the_backend() -> None:
    with pytest.raises(ConfigError) as excinfo:
        _settings(shadows=["candidate=host:1,timeout=0"])
    message = _message(excinfo)
    assert message.startswith("--shadow")
    assert "candidate" in message
    assert "timeout" in message


# --------------------------------------------------------------------------- addresses


@pytest.mark.parametrize(
    "address",
    ["127.0.0.1:50051", "model-server.internal:443", "localhost:1", "[::1]:50051", "h:65535"],
)
def test_well_formed_address_is_accepted(address: str) -> None:
    assert validate_address(f" {address} ", "--listen") == address
    settings = _settings(listen=address, shadows=[f"candidate={address}"])
    assert settings.listen == address
    assert settings.shadows[0].address == address


def test_listen_port_zero_is_allowed_but_a_backend_port_zero_is_not() -> None:
    assert _settings(listen="127.0.0.1:0").listen == "127.0.0.1:0"
    with pytest.raises(ConfigError) as excinfo:
        _settings(shadows=["candidate=127.0.0.1:0"])
    assert "port must be 1..65535" in _message(excinfo)


MALFORMED_ADDRESSES = [
    "localhost",
    "host:abc",
    "::1:80",
    "h:70000",
    ":80",
    "host:",
    "[::1:80",
    "[]:80",
    "ho st:80",
    "host:-1",
]


@pytest.mark.parametrize("address", MALFORMED_ADDRESSES)
def test_malformed_listen_address_is_rejected_naming_the_flag(address: str) -> None:
    with pytest.raises(ConfigError) as excinfo:
        _settings(listen=address)
    message = _message(excinfo)
    assert message.startswith("--listen: ")


@pytest.mark.parametrize("address", MALFORMED_ADDRESSES)
def test_malformed_backend_address_is_rejected_naming_the_flag(address: str) -> None:
    with pytest.raises(ConfigError) as excinfo:
        _settings(shadows=[f"candidate={address}"])
    assert _message(excinfo).startswith("--shadow (candidate): ")
    with pytest.raises(ConfigError) as excinfo:
        _settings(production=f"prod={address}")
    assert _message(excinfo).startswith("--production (prod): ")


def test_ipv6_host_without_brackets_gets_a_hint() -> None:
    with pytest.raises(ConfigError) as excinfo:
        validate_address("::1:80", "--listen")
    assert "[::1]:PORT" in _message(excinfo)


def test_port_of_non_ascii_digits_is_a_config_error() -> None:
    with pytest.raises(ConfigError) as excinfo:
        validate_address("host:²", "--listen")
    assert _message(excinfo).startswith("--listen: ")


# --------------------------------------------------------------------------- sample rates


@pytest.mark.parametrize(("text", "rate"), [("0", 0.0), ("1", 1.0), ("0.5", 0.5), ("1e-3", 0.001)])
def test_sample_rate_in_range_is_accepted(text: str, rate: float) -> None:
    (shadow,) = _settings(shadows=[f"candidate=host:1,sample={text}"]).shadows
    assert shadow.sample_rate == rate


@pytest.mark.parametrize("text", ["-0.1", "1.5", "abc", "", "nan", "inf"])
def test_sample_rate_outside_zero_to_one_is_rejected(text: str) -> None:
    with pytest.raises(ConfigError) as excinfo:
        _settings(shadows=[f"candidate=host:1,sample={text}"])
    message = _message(excinfo)
    assert message.startswith("--shadow (candidate): ")
    assert "sample rate" in message


def test_sample_on_production_is_rejected() -> None:
    with pytest.raises(ConfigError) as excinfo:
        _settings(production="prod=host:1,sample=0.5")
    assert "drop 'sample'" in _message(excinfo)


# --------------------------------------------------------------------------- whole settings


def test_two_shadows_with_one_name_are_rejected() -> None:
    with pytest.raises(ConfigError) as excinfo:
        _settings(shadows=["candidate=host:1", "candidate=host:2"])
    assert "--shadow: duplicate backend name 'candidate'" in _message(excinfo)
    with pytest.raises(ConfigError) as excinfo:
        _settings(config={"shadows": ["candidate=host:1", "candidate=host:2"]})
    assert "--config: duplicate backend name 'candidate'" in _message(excinfo)


def test_production_and_shadow_with_one_name_are_rejected() -> None:
    with pytest.raises(ConfigError) as excinfo:
        _settings(shadows=["prod=host:2"])
    assert "duplicate backend name 'prod'" in _message(excinfo)
    with pytest.raises(ConfigError) as excinfo:
        _settings(config={"shadows": ["prod=host:2"]})
    assert "duplicate backend name 'prod'" in _message(excinfo)


def test_no_production_is_rejected_with_how_to_give_one() -> None:
    with pytest.raises(ConfigError) as excinfo:
        load_settings(overrides={"shadows": ["candidate=host:1"]}, environ={})
    assert "--production NAME=HOST:PORT" in _message(excinfo)


def test_unknown_config_key_is_rejected() -> None:
    with pytest.raises(ConfigError) as excinfo:
        _settings(config={"listen_on": "127.0.0.1:1"})
    message = _message(excinfo)
    assert "unknown setting 'listen_on'" in message
    assert "listen" in message.split("known:")[1]


def test_flags_override_the_config_file() -> None:
    config = {
        "production": "old=127.0.0.1:1",
        "shadows": ["candidate=127.0.0.1:2,sample=0.5", "other=127.0.0.1:3"],
        "listen": "0.0.0.0:50051",
        "shadow_grace": "3s",
    }
    settings = load_settings(
        config=config,
        overrides={
            "production": "new=127.0.0.1:4",
            "shadows": ["candidate=127.0.0.1:5,timeout=1s", "extra=127.0.0.1:6"],
            "listen": "127.0.0.1:0",
            # An unset flag (None) leaves the file's value alone.
            "shadow_grace": None,
        },
        environ={},
    )
    assert settings.production == BackendSettings("new", "127.0.0.1:4", role="production")
    # The flag's candidate replaces the file's whole: its sample rate is not inherited.
    assert settings.shadows == (
        BackendSettings("candidate", "127.0.0.1:5", sample_rate=1.0, timeout=1.0),
        BackendSettings("other", "127.0.0.1:3", timeout=5.0),
        BackendSettings("extra", "127.0.0.1:6", timeout=5.0),
    )
    assert settings.listen == "127.0.0.1:0"
    assert settings.shadow_grace == 3.0


def test_settings_are_frozen() -> None:
    settings = _settings()
    with pytest.raises(AttributeError):
        settings.listen = "127.0.0.1:1"  # type: ignore[misc]


# --------------------------------------------------------------------------- exporters


@pytest.mark.parametrize(
    ("environ", "expected"),
    [
        ({}, ("file",)),
        ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://localhost:4317"}, ("file", "otlp")),
        ({"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://localhost:4317"}, ("file", "otlp")),
        ({"OTEL_TRACES_EXPORTER": "console"}, ("console",)),
        ({"OTEL_TRACES_EXPORTER": "none"}, ()),
        ({"OTEL_TRACES_EXPORTER": "otlp,file"}, ("otlp", "file")),
        (
            {"OTEL_TRACES_EXPORTER": "console", "OTEL_EXPORTER_OTLP_ENDPOINT": "http://x:4317"},
            ("console",),
        ),
    ],
)
def test_default_exporters_follow_the_otel_variables(
    environ: dict[str, str], expected: tuple[str, ...]
) -> None:
    assert default_exporters(environ) == expected
    settings = load_settings(overrides={"production": PRODUCTION}, environ=environ)
    assert settings.exporters == expected


def test_unknown_otel_traces_exporter_is_rejected() -> None:
    with pytest.raises(ConfigError) as excinfo:
        default_exporters({"OTEL_TRACES_EXPORTER": "zipkin"})
    message = _message(excinfo)
    assert message.startswith("OTEL_TRACES_EXPORTER: ")
    assert "'zipkin'" in message


def test_exporter_setting_beats_the_environment() -> None:
    settings = load_settings(
        overrides={"production": PRODUCTION, "exporters": "console"},
        environ={"OTEL_EXPORTER_OTLP_ENDPOINT": "http://localhost:4317"},
    )
    assert settings.exporters == ("console",)
    assert _settings(exporters=["file", "otlp", "file"]).exporters == ("file", "otlp")


def test_none_exporter_cannot_be_combined() -> None:
    with pytest.raises(ConfigError) as excinfo:
        _settings(exporters="none,file")
    assert _message(excinfo).startswith("--exporter: ")


def test_otlp_protocol_comes_from_the_environment_and_is_checked() -> None:
    environ = {"OTEL_EXPORTER_OTLP_PROTOCOL": "http/protobuf"}
    settings = load_settings(overrides={"production": PRODUCTION}, environ=environ)
    assert settings.otlp_protocol == "http/protobuf"
    with pytest.raises(ConfigError) as excinfo:
        load_settings(
            overrides={"production": PRODUCTION}, environ={"OTEL_EXPORTER_OTLP_PROTOCOL": "udp"}
        )
    assert "'udp'" in _message(excinfo)


# --------------------------------------------------------------------------- redaction


@pytest.mark.parametrize(
    ("configured", "expected"),
    [
        (None, ("authorization",)),
        ([], ("authorization",)),
        (["X-Api-Key", "cookie"], ("authorization", "x-api-key", "cookie")),
        ("x-api-key", ("authorization", "x-api-key")),
        (["Authorization"], ("authorization",)),
    ],
)
def test_authorization_is_always_redacted(
    configured: list[str] | str | None, expected: tuple[str, ...]
) -> None:
    assert _settings(redact_metadata=configured).redact_metadata == expected
    config = {} if configured is None else {"redact_metadata": configured}
    assert _settings(config=config).redact_metadata == expected


def test_redact_metadata_flag_adds_to_a_single_key_in_the_config_file(tmp_path: Path) -> None:
    config = tmp_path / "proxy.yaml"
    config.write_text(f"production: {PRODUCTION}\nredact_metadata: x-api-key\nexporters: none\n")
    args = build_parser().parse_args(
        ["serve", "--config", str(config), "--redact-metadata", "cookie"]
    )
    assert settings_from_args(args).redact_metadata == ("authorization", "x-api-key", "cookie")


# --------------------------------------------------------------------------- config files

CONFIG_FILES = {
    "proxy.yaml": """\
production: prod=127.0.0.1:50061
shadows:
  - candidate=127.0.0.1:50062,sample=0.5
  - {name: other, address: "[::1]:50063", timeout: 2s, max_in_flight: 64}
listen: 127.0.0.1:0
exporters: [file, otlp]
traces-file: traces.jsonl
redact_tensors: [ssn]
""",
    "proxy.toml": """\
production = "prod=127.0.0.1:50061"
shadows = [
  "candidate=127.0.0.1:50062,sample=0.5",
  { name = "other", address = "[::1]:50063", timeout = "2s", max_in_flight = 64 },
]
listen = "127.0.0.1:0"
exporters = ["file", "otlp"]
traces-file = "traces.jsonl"
redact_tensors = ["ssn"]
""",
    "proxy.json": json.dumps(
        {
            "production": "prod=127.0.0.1:50061",
            "shadows": [
                "candidate=127.0.0.1:50062,sample=0.5",
                {"name": "other", "address": "[::1]:50063", "timeout": "2s", "max_in_flight": 64},
            ],
            "listen": "127.0.0.1:0",
            "exporters": ["file", "otlp"],
            "traces-file": "traces.jsonl",
            "redact_tensors": ["ssn"],
        }
    ),
}


@pytest.mark.parametrize("name", sorted(CONFIG_FILES))
def test_config_file_is_read_in_each_format(tmp_path: Path, name: str) -> None:
    path = tmp_path / name
    path.write_text(CONFIG_FILES[name], encoding="utf-8")
    config = read_config_file(path)
    assert "traces_file" in config, "dashes in keys become underscores"
    settings = load_settings(config=config, environ={})
    assert settings.production == BackendSettings("prod", "127.0.0.1:50061", role="production")
    assert settings.shadows == (
        BackendSettings("candidate", "127.0.0.1:50062", sample_rate=0.5, timeout=5.0),
        BackendSettings("other", "[::1]:50063", timeout=2.0, max_in_flight=64),
    )
    assert settings.listen == "127.0.0.1:0"
    assert settings.exporters == ("file", "otlp")
    assert settings.traces_file == Path("traces.jsonl")
    assert settings.redact_tensors == ("ssn",)


def test_yml_suffix_is_yaml_and_an_empty_file_is_no_settings(tmp_path: Path) -> None:
    path = tmp_path / "proxy.yml"
    path.write_text(f"production: {PRODUCTION}\n")
    assert read_config_file(path) == {"production": PRODUCTION}
    path.write_text("")
    assert read_config_file(path) == {}


@pytest.mark.parametrize(
    ("name", "text"),
    [
        ("proxy.yaml", "production: [unclosed\nshadows:\n  - a\n"),
        ("proxy.toml", 'production = "prod=127.0.0.1:1"\nlisten = \n'),
        ("proxy.json", '{"production": "prod=127.0.0.1:1",\n}'),
    ],
)
def test_malformed_config_file_is_one_line_error(tmp_path: Path, name: str, text: str) -> None:
    path = tmp_path / name
    path.write_text(text)
    with pytest.raises(ConfigError) as excinfo:
        read_config_file(path)
    message = _message(excinfo)
    assert message.startswith(f"--config: {path} is not valid {path.suffix}")


def test_missing_config_file_is_one_line_error(tmp_path: Path) -> None:
    path = tmp_path / "absent.yaml"
    with pytest.raises(ConfigError) as excinfo:
        read_config_file(path)
    message = _message(excinfo)
    assert message.startswith(f"--config: cannot read {path}")
    assert "No such file" in message


def test_config_file_must_hold_a_mapping(tmp_path: Path) -> None:
    path = tmp_path / "proxy.yaml"
    path.write_text("- production\n- shadows\n")
    with pytest.raises(ConfigError) as excinfo:
        read_config_file(path)
    assert "mapping" in _message(excinfo)


def test_config_file_that_is_not_utf8_is_one_line_error(tmp_path: Path) -> None:
    path = tmp_path / "proxy.yaml"
    path.write_bytes(b"production: caf\xe9=127.0.0.1:1\n")
    with pytest.raises(ConfigError) as excinfo:
        read_config_file(path)
    assert _message(excinfo).startswith(f"--config: {path}")
