"""Server configuration: layering, validation messages, redaction and TOML output."""

from __future__ import annotations

import tomllib
from pathlib import Path

import msgspec
import pytest

from gateway.config import AuthConfig, ConfigError, ModelEntry, ServerConfig, ferrous_home
from gateway.configload import load_config, redacted, render_toml
from protocol.errors import ErrorCode, FerrousError


def write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


def config_error(*args: object, **kwargs: object) -> str:
    with pytest.raises(ConfigError) as info:
        load_config(*args, **kwargs)  # type: ignore[arg-type]
    return str(info.value)


def test_defaults_without_file_env_or_overrides(tmp_path: Path) -> None:
    config = load_config(env={"FERROUS_HOME": str(tmp_path)})
    assert config == ServerConfig(home=str(tmp_path))
    assert config.port == 11480
    assert config.auth.algorithms == ["HS256"]
    assert config.limits.max_frame_bytes == 1024 * 1024
    assert config.log.level == "info"


def test_each_layer_overrides_the_one_below(tmp_path: Path) -> None:
    toml = write(
        tmp_path / "server.toml",
        'host = "0.0.0.0"\nport = 1000\nworkers = 2\nseqs_per_worker = 2\n'
        "[limits]\nmax_sessions = 5\nmax_conversations = 7\n",
    )
    config = load_config(
        toml,
        env={"FERROUS_PORT": "2000", "FERROUS_WORKERS": "3", "FERROUS_LIMITS__MAX_SESSIONS": "6"},
        overrides={"port": 3000, "limits.max_sessions": 9},
    )
    assert config.host == "0.0.0.0"  # file over default
    assert config.seqs_per_worker == 2  # file over default
    assert config.limits.max_conversations == 7  # file, sibling keys kept by nested layers
    assert config.workers == 3  # environment over file
    assert config.port == 3000  # override over environment over file
    assert config.limits.max_sessions == 9
    assert config.threads_per_worker == 0  # default untouched


def test_file_is_found_in_ferrous_home(tmp_path: Path) -> None:
    write(tmp_path / "config.toml", "port = 1234\n[log]\nformat = 'json'\n")
    config = load_config(env={"FERROUS_HOME": str(tmp_path)})
    assert config.port == 1234
    assert config.log.format == "json"
    assert config.home == str(tmp_path)
    assert ferrous_home(config) == tmp_path


def test_home_override_chooses_the_file(tmp_path: Path) -> None:
    write(tmp_path / "config.toml", "port = 4321\n")
    config = load_config(env={}, overrides={"home": str(tmp_path)})
    assert config.port == 4321


def test_nested_environment_variables() -> None:
    config = load_config(
        env={
            "FERROUS_AUTH__ENABLED": "false",
            "FERROUS_AUTH__ALGORITHMS": "RS256, ES256",
            "FERROUS_AUTH__LEEWAY": "2.5",
            "FERROUS_LIMITS__MAX_FRAME_BYTES": "2048",
            "FERROUS_LOG__FORMAT": "json",
            "FERROUS_PERMESSAGE_DEFLATE": "true",
            "FERROUS_MODELS__TINY__PATH": "/models/tiny.gguf",
            "FERROUS_MODELS__TINY__N_CTX": "512",
            "PATH": "/usr/bin",  # not ours: ignored
        },
    )
    assert config.auth.enabled is False
    assert config.auth.algorithms == ["RS256", "ES256"]
    assert config.auth.leeway == 2.5
    assert config.limits.max_frame_bytes == 2048
    assert config.log.format == "json"
    assert config.permessage_deflate is True
    assert config.models == {"tiny": ModelEntry(path="/models/tiny.gguf", n_ctx=512)}


def test_table_from_json_environment_value() -> None:
    config = load_config(env={"FERROUS_MODELS": '{"a": {"path": "/m/a.gguf"}}'})
    assert config.models == {"a": ModelEntry(path="/m/a.gguf")}
    message = config_error(env={"FERROUS_MODELS": "{nope"})
    assert message.startswith("config: 'models' expected JSON")
    assert "FERROUS_MODELS" in message


def test_models_merge_across_layers(tmp_path: Path) -> None:
    toml = write(tmp_path / "c.toml", '[models.tiny]\npath = "/m/tiny.gguf"\n')
    config = load_config(
        toml,
        env={"FERROUS_MODELS__TINY__BACKEND": "llama_cpp"},
        overrides={"models.big": {"path": "/m/big.gguf", "n_ctx": 4096}},
    )
    assert config.models == {
        "tiny": ModelEntry(path="/m/tiny.gguf", backend="llama_cpp"),
        "big": ModelEntry(path="/m/big.gguf", n_ctx=4096),
    }


def test_unknown_key_in_file_names_the_key_and_file(tmp_path: Path) -> None:
    toml = write(tmp_path / "c.toml", "[limits]\nmax_frme_bytes = 2048\n")
    message = config_error(toml, env={})
    assert message == f"config: unknown key 'limits.max_frme_bytes' (in {toml})"


def test_unknown_top_level_key_in_file(tmp_path: Path) -> None:
    toml = write(tmp_path / "c.toml", "prot = 1\n")
    assert config_error(toml, env={}) == f"config: unknown key 'prot' (in {toml})"


def test_wrong_type_names_key_and_expected_type(tmp_path: Path) -> None:
    toml = write(tmp_path / "c.toml", 'port = "high"\n')
    assert config_error(toml, env={}) == f"config: 'port' expected int, got str (in {toml})"


def test_wrong_type_from_environment_names_the_variable() -> None:
    message = config_error(env={"FERROUS_LIMITS__HEARTBEAT_INTERVAL": "often"})
    assert message == (
        "config: 'limits.heartbeat_interval' expected float, got str "
        "(from environment variable FERROUS_LIMITS__HEARTBEAT_INTERVAL)"
    )


def test_wrong_type_inside_a_model_names_the_model(tmp_path: Path) -> None:
    toml = write(
        tmp_path / "c.toml",
        '[models.good]\npath = "/g"\n[models.bad]\npath = "/b"\nn_ctx = "large"\n',
    )
    message = config_error(toml, env={})
    assert message == f"config: 'models.bad.n_ctx' expected int, got str (in {toml})"


def test_missing_model_path_is_reported() -> None:
    message = config_error(env={"FERROUS_MODELS__TINY__BACKEND": "llama_cpp"})
    assert message == (
        "config: missing key 'models.tiny.path' "
        "(from environment variable FERROUS_MODELS__TINY__BACKEND)"
    )


def test_out_of_range_values_fail() -> None:
    assert config_error(env={"FERROUS_PORT": "70000"}) == (
        "config: 'port' expected int <= 65535 (from environment variable FERROUS_PORT)"
    )
    assert config_error(env={}, overrides={"limits.max_frame_bytes": 0}) == (
        "config: 'limits.max_frame_bytes' expected int >= 1 "
        "(from override 'limits.max_frame_bytes')"
    )


def test_enumerated_values_list_the_choices() -> None:
    message = config_error(env={"FERROUS_LOG__LEVEL": "loud"})
    assert message.startswith("config: 'log.level' expected one of ")
    for level in ("'debug'", "'info'", "'warning'", "'error'"):
        assert level in message
    assert "got 'loud'" in message
    message = config_error(env={"FERROUS_AUTH__ALGORITHMS": "HS256,none"})
    assert message.startswith("config: 'auth.algorithms[1]' expected one of ")
    assert "got 'none'" in message


def test_unknown_environment_variable_fails_naming_it() -> None:
    message = config_error(env={"FERROUS_PROT": "9000"})
    assert message == "config: unknown environment variable FERROUS_PROT (no config key 'prot')"
    message = config_error(env={"FERROUS_LIMITS__MAX_FRME_BYTES": "1"})
    assert "FERROUS_LIMITS__MAX_FRME_BYTES" in message


def test_unknown_override_fails_naming_it() -> None:
    assert config_error(env={}, overrides={"auth.enabld": True}) == (
        "config: unknown key 'auth.enabld' (override)"
    )


def test_string_overrides_are_converted() -> None:
    config = load_config(
        env={}, overrides={"port": "9000", "auth.enabled": "false", "auth.algorithms": "ES256"}
    )
    assert config.port == 9000
    assert config.auth.enabled is False
    assert config.auth.algorithms == ["ES256"]


def test_explicit_missing_file_fails(tmp_path: Path) -> None:
    missing = tmp_path / "nope.toml"
    assert config_error(missing, env={}) == f"config: file not found: {missing}"


def test_malformed_toml_fails_naming_the_file(tmp_path: Path) -> None:
    toml = write(tmp_path / "c.toml", "port = = 1\n")
    assert config_error(toml, env={}).startswith(f"config: {toml} is not valid TOML")


def test_config_error_is_a_bad_request() -> None:
    with pytest.raises(FerrousError) as info:
        load_config(env={"FERROUS_PORT": "x"})
    assert info.value.code is ErrorCode.BAD_REQUEST


def test_ferrous_home_resolution(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HOME", str(tmp_path / "user"))
    monkeypatch.delenv("FERROUS_HOME", raising=False)
    assert ferrous_home() == tmp_path / "user" / ".ferrous"
    monkeypatch.setenv("FERROUS_HOME", str(tmp_path / "env"))
    assert ferrous_home() == tmp_path / "env"
    assert ferrous_home(ServerConfig()) == tmp_path / "env"
    assert ferrous_home(ServerConfig(home=str(tmp_path / "cfg"))) == tmp_path / "cfg"


class ConfigWithSecrets(ServerConfig, kw_only=True):
    admin_token: str = ""
    db_password: str = ""


def test_redacted_hides_secret_values_but_shows_file_paths() -> None:
    config = ConfigWithSecrets(
        admin_token="t0ps3cret",
        auth=AuthConfig(secret_file="/etc/ferrous/secret", api_keys_file="/etc/ferrous/keys.json"),
    )
    out = redacted(config)
    assert out["admin_token"] == "***"
    assert out["db_password"] == ""  # nothing set, nothing hidden
    auth = out["auth"]
    assert isinstance(auth, dict)
    assert auth["secret_file"] == "/etc/ferrous/secret"
    assert auth["api_keys_file"] == "/etc/ferrous/keys.json"
    assert auth["ollama_loopback_without_token"] is False
    assert "t0ps3cret" not in render_toml(out)


def test_redacted_default_config_is_plain_builtins() -> None:
    config = ServerConfig()
    assert redacted(config) == msgspec.to_builtins(config)


def test_render_toml_round_trips_the_default_config() -> None:
    data = redacted(ServerConfig())
    text = render_toml(data)
    assert "[auth]" in text
    assert tomllib.loads(text) == data
    assert msgspec.convert(tomllib.loads(text), ServerConfig) == ServerConfig()


def test_render_toml_round_trips_models_and_awkward_strings(tmp_path: Path) -> None:
    config = ServerConfig(
        host="::1",
        stall_timeout=1e-3,
        models={
            "tiny": ModelEntry(path="/m/tiny.gguf", n_ctx=256),
            "odd name.v2": ModelEntry(path='C:\\models\\"q"\n\t\x7f\x01 ö🙂'),
        },
        auth=AuthConfig(algorithms=["RS256", "ES256"]),
    )
    data = redacted(config)
    text = render_toml(data)
    assert tomllib.loads(text) == data
    path = write(tmp_path / "out.toml", text)
    assert load_config(path, env={}) == config


def test_invalid_model_name_is_reported_as_a_key() -> None:
    message = config_error(env={}, overrides={"models": {"": {"path": "/m/x.gguf"}}})
    assert message == "config: 'models' key expected str of length >= 1 (from override 'models')"
