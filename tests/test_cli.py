"""The `ferrous` command as a user runs it: real processes, real servers."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import jwt

from gateway.auth import load_or_create_secret

from .conftest import SCRIPT


def ferrous(
    home: Path, *args: str, stdin: str | None = None, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    full_env = {**os.environ, "FERROUS_HOME": str(home), **(env or {})}
    return subprocess.run(
        [sys.executable, "-m", "gateway.cli", *args],
        input=stdin,
        capture_output=True,
        text=True,
        env=full_env,
        timeout=120,
        check=False,
    )


def test_run_one_shot_starts_an_embedded_server_and_streams(
    tmp_path: Path, script_model: Path
) -> None:
    out = ferrous(
        tmp_path,
        "run",
        str(script_model),
        "Say",
        "it",
        "--temperature",
        "0",
        "--max-tokens",
        "13",
        "--port",
        "1",
    )  # nothing listens on port 1: the command starts its own server
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == SCRIPT
    assert "starting one in this process" in out.stderr and "13 tokens" in out.stderr


def test_run_interactive_keeps_the_conversation(tmp_path: Path, script_model: Path) -> None:
    out = ferrous(
        tmp_path,
        "run",
        str(script_model),
        "--temperature",
        "0",
        "--max-tokens",
        "13",
        "--port",
        "1",
        stdin="first\nsecond\n/bye\n",
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.count(SCRIPT) == 2


def test_token_is_accepted_by_the_local_secret(tmp_path: Path) -> None:
    out = ferrous(tmp_path, "token", "--sub", "dana", "--tenant", "acme", "--ttl", "60")
    assert out.returncode == 0, out.stderr
    claims = jwt.decode(
        out.stdout.strip(), load_or_create_secret(tmp_path / "secret"), algorithms=["HS256"]
    )
    assert (
        claims["sub"] == "dana"
        and claims["tenant"] == "acme"
        and claims["exp"] - claims["iat"] == 60
    )
    assert (tmp_path / "secret").stat().st_mode & 0o777 == 0o600


def test_config_layers_and_errors(tmp_path: Path) -> None:
    (tmp_path / "config.toml").write_text('port = 9100\n[log]\nformat = "json"\n')
    out = ferrous(tmp_path, "config", env={"FERROUS_PORT": "9200"})
    assert out.returncode == 0, out.stderr
    assert "port = 9200" in out.stdout and 'format = "json"' in out.stdout
    (tmp_path / "config.toml").write_text("[limits]\nmax_frme_bytes = 5\n")
    bad = ferrous(tmp_path, "config")
    assert bad.returncode == 2 and "limits.max_frme_bytes" in bad.stderr
    (tmp_path / "config.toml").write_text('port = "many"\n')
    bad = ferrous(tmp_path, "config")
    assert bad.returncode == 2 and "port" in bad.stderr and "int" in bad.stderr


def test_serve_refuses_a_public_address_without_auth(tmp_path: Path) -> None:
    out = ferrous(tmp_path, "serve", "--host", "0.0.0.0", "--no-auth", "--port", "0")
    assert out.returncode == 2
    assert "auth disabled" in out.stderr


def test_version(tmp_path: Path) -> None:
    out = ferrous(tmp_path, "version")
    assert out.returncode == 0 and out.stdout.startswith("ferrousforge ")


def test_api_keys_are_created_listed_and_revoked(tmp_path: Path) -> None:
    key = ferrous(tmp_path, "key", "create", "--user", "erin", "--name", "laptop").stdout.strip()
    assert key.startswith("ffk_")
    listing = ferrous(tmp_path, "key", "list").stdout
    assert "user=erin" in listing and key not in listing
    assert key not in (tmp_path / "api_keys.json").read_text()
    assert ferrous(tmp_path, "key", "revoke", key).returncode == 0
    assert "erin" not in ferrous(tmp_path, "key", "list").stdout


def test_failures_are_one_line_with_an_exit_status(tmp_path: Path) -> None:
    """Every failure exits non-zero with one line (no traceback), naming the likely
    intended command or model."""
    out = ferrous(tmp_path, "lst")
    assert out.returncode == 2 and "did you mean 'list'" in out.stderr
    missing = ferrous(tmp_path, "run", str(tmp_path / "missing.gguf"), "hi", "--port", "1")
    assert missing.returncode == 1 and "does not exist" in missing.stderr
    unknown = ferrous(tmp_path, "run", "smollm3", "hi", "--port", "1")
    assert unknown.returncode == 1 and "did you mean 'smollm2'" in unknown.stderr
    assert "Traceback" not in missing.stderr + unknown.stderr
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = str(busy.getsockname()[1])
        out = ferrous(tmp_path, "serve", "--port", port, "--no-auth")
    assert out.returncode == 1 and "address is in use" in out.stderr
    assert "Traceback" not in out.stderr


def test_chat_commands_and_piped_input(tmp_path: Path, script_model: Path) -> None:
    """Commands are carried out, never sent to the model; piped input shows no prompt;
    a message of several lines is one turn; a cut answer says so."""
    lines = [
        "/?",
        "/set parameter temperature 0",
        "/set parameter num_predict 13",
        "/show parameters",
        "/set format json",
        "/set noformat",
        "/show modelfile",
        "/sett system x",
        '"""',
        "first line",
        'second line"""',
        "/set parameter num_predict 3",
        "again",
        "/bye",
    ]
    out = ferrous(tmp_path, "run", str(script_model), "--port", "1", stdin="\n".join(lines) + "\n")
    assert out.returncode == 0, out.stderr
    assert ">>>" not in out.stdout and "..." not in out.stdout
    assert "/set parameter NAME VALUE" in out.stdout  # the help
    assert "temperature      0.0" in out.stdout and "max_tokens       13" in out.stdout
    assert "Set format to 'json'." in out.stdout and "Cleared the format." in out.stdout
    assert f"FROM {script_model.stem.lower()}" in out.stdout  # /show modelfile
    assert "Unknown command '/sett' (did you mean /set?)" in out.stderr
    # Two turns reached the model: the two-line message and "again" (3 tokens, cut).
    assert out.stdout.count(SCRIPT) == 1
    assert out.stderr.count("tokens, ") == 2
    assert "stopped at the token limit" in out.stderr


def test_chat_save_and_load(tmp_path: Path, script_model: Path) -> None:
    """/save stores the session as a model (its parameters, system message and the
    conversation as MESSAGEs); /load continues with it."""
    lines = [
        "/set parameter temperature 0",
        "/set parameter num_predict 13",
        "/set system Be brief.",
        "hello",
        "/save mine",
        "/load mine",
        "again",
        "/bye",
    ]
    out = ferrous(tmp_path, "run", str(script_model), "--port", "1", stdin="\n".join(lines) + "\n")
    assert out.returncode == 0, out.stderr
    assert "Created new model 'mine'." in out.stdout
    assert out.stdout.count(SCRIPT) == 2  # answered before and after /load
    shown = ferrous(tmp_path, "show", "mine", "--modelfile")
    assert shown.returncode == 0, shown.stderr
    modelfile = shown.stdout
    assert "PARAMETER temperature 0" in modelfile and "PARAMETER num_predict 13" in modelfile
    assert 'SYSTEM """Be brief."""' in modelfile, modelfile
    assert "MESSAGE user hello" in modelfile, modelfile
    assert f'MESSAGE assistant "{SCRIPT}"' in modelfile, modelfile
