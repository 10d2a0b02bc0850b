"""Model management through the `ferrous` command: real processes, a real store, a real server.

pull / list / show / cp / rm / create work on FERROUS_HOME/models directly;
ps / stop (and rm, when a server answers) talk to a running `ferrous serve`.
"""

from __future__ import annotations

import os
import re
import signal
import stat
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

from engine.store.modelfile import parse_modelfile
from engine.tinymodels import write_tiny_llama

from .fileserver import serve_payload
from .gateway_helpers import free_port
from .test_cli import ferrous

_SIZE = r"\d+(?:\.\d)? [KMGT]?B"
_FERROUS = (sys.executable, "-m", "gateway.cli")


def _ok(out: subprocess.CompletedProcess[str]) -> subprocess.CompletedProcess[str]:
    assert out.returncode == 0, (
        f"exit {out.returncode}\nstdout:\n{out.stdout}\nstderr:\n{out.stderr}"
    )
    return out


def _parallel(home: Path, *commands: tuple[str, ...]) -> list[subprocess.CompletedProcess[str]]:
    """Run independent read-only commands at once (each one pays Python's start-up)."""
    with ThreadPoolExecutor(len(commands)) as pool:
        return list(pool.map(lambda args: ferrous(home, *args), commands))


def _rows(table: str) -> dict[str, str]:
    """A `ferrous list`/`ps` table: first column -> the whole (right-stripped) line."""
    lines = [line.rstrip() for line in table.splitlines() if line.strip()]
    return {line.split()[0]: line for line in lines[1:]}


def _header(table: str) -> list[str]:
    return table.splitlines()[0].split()


def _parameters(text: str) -> dict[str, list[str]]:
    """`ferrous show --parameters`: one `name value` line per value (stop may repeat)."""
    out: dict[str, list[str]] = {}
    for line in text.splitlines():
        name, value = line.split(maxsplit=1)
        out.setdefault(name, []).append(value)
    return out


# -- the store, no server ----------------------------------------------------------------


def test_pull_list_show_cp_rm_a_local_gguf(tmp_path: Path) -> None:
    src = write_tiny_llama(tmp_path / "CLI_Tiny.gguf", script="Okay.", script_eos=True)
    no_server = {"FERROUS_PORT": str(free_port())}  # rm must fall back to the store

    pulled = _ok(ferrous(tmp_path, "pull", str(src)))
    name, model_id, size = re.fullmatch(
        rf"(\S+)  ([0-9a-f]{{12}})  ({_SIZE})\n", pulled.stdout
    ).groups()  # type: ignore[union-attr]
    assert name == "cli_tiny"  # the file stem, lower-cased
    assert "success" in pulled.stderr

    listed, shown = _parallel(tmp_path, ("list",), ("show", "cli_tiny"))
    _ok(listed)
    assert _header(listed.stdout) == ["NAME", "ID", "SIZE", "FORMAT", "KIND", "MODIFIED"]
    row = _rows(listed.stdout)
    assert list(row) == ["cli_tiny"]
    assert re.fullmatch(
        rf"cli_tiny\s+{model_id}\s+{size}\s+gguf\s+text\s+\d+ seconds? ago", row["cli_tiny"]
    ), row
    _ok(shown)
    assert re.search(r"^\s*name\s+cli_tiny:latest$", shown.stdout, re.M), shown.stdout
    assert re.search(rf"^\s*id\s+{model_id}$", shown.stdout, re.M)
    assert re.search(r"^\s*format\s+gguf$", shown.stdout, re.M)
    assert re.search(r"^\s*kind\s+text$", shown.stdout, re.M)
    assert re.search(rf"^\s*size\s+{size}$", shown.stdout, re.M)
    assert f"file://{os.path.abspath(src)}" in shown.stdout  # the source it came from

    copied = _ok(ferrous(tmp_path, "cp", "cli_tiny", "other:v2"))
    assert "copied 'cli_tiny' to 'other:v2'" in copied.stdout
    row = _rows(_ok(ferrous(tmp_path, "list")).stdout)
    assert sorted(row) == ["cli_tiny", "other:v2"]
    assert re.match(rf"other:v2\s+{model_id}\s+{size}\s+gguf", row["other:v2"])  # same manifest

    removed = _ok(ferrous(tmp_path, "rm", "cli_tiny", env=no_server))
    assert removed.stdout.strip() == "deleted 'cli_tiny'"
    listed, shown_gone, shown_copy = _parallel(
        tmp_path, ("list",), ("show", "cli_tiny"), ("show", "other:v2")
    )
    assert list(_rows(_ok(listed).stdout)) == ["other:v2"]
    assert shown_gone.returncode != 0 and "'cli_tiny' is not in the store" in shown_gone.stderr
    assert re.search(r"^\s*file\s+CLI_Tiny\.gguf", _ok(shown_copy).stdout, re.M)  # blob kept

    unknown = ferrous(tmp_path, "rm", "no-such-model", env=no_server)
    assert unknown.returncode != 0
    assert unknown.stdout == ""
    assert unknown.stderr.strip() == "ferrous: model 'no-such-model' is not in the store"


def test_pull_catalog_tiny_script_then_run_it(tmp_path: Path) -> None:
    pulled = _ok(ferrous(tmp_path, "pull", "tiny-script"))
    assert pulled.stdout.startswith("tiny-script  ")
    row = _rows(_ok(ferrous(tmp_path, "list")).stdout)
    assert list(row) == ["tiny-script"] and " gguf " in row["tiny-script"]

    out = _ok(ferrous(tmp_path, "run", "tiny-script", "hi", "--temperature", "0", "--port", "1"))
    assert out.stdout.strip() == "Hi!"
    assert "starting one in this process" in out.stderr


# -- Modelfiles --------------------------------------------------------------------------


def test_create_from_a_modelfile_show_it_derive_from_it_and_run_it(tmp_path: Path) -> None:
    recipes = tmp_path / "recipes"  # FROM ./base.gguf resolves here, not in the working dir
    recipes.mkdir()
    base = write_tiny_llama(recipes / "base.gguf", script="Okay.", script_eos=True)
    (recipes / "Modelfile").write_text(
        "# a terse model\n"
        "FROM ./base.gguf\n"
        "PARAMETER temperature 0\n"
        "PARAMETER num_ctx 256\n"
        'PARAMETER stop "."\n'
        'SYSTEM """You are terse."""\n'
        'LICENSE """MIT"""\n'
    )
    created = _ok(ferrous(tmp_path, "create", "mine", "-f", str(recipes / "Modelfile")))
    assert created.stdout.startswith("created mine  ")

    modelfile, params, system, licence, plain = _parallel(
        tmp_path,
        ("show", "mine", "--modelfile"),
        ("show", "mine", "--parameters"),
        ("show", "mine", "--system"),
        ("show", "mine", "--license"),
        ("show", "mine"),
    )
    mf = parse_modelfile(_ok(modelfile).stdout)
    assert mf.from_ == f"file://{os.path.abspath(base)}"
    assert mf.parameters == {"temperature": 0.0, "num_ctx": 256, "stop": ["."]}
    assert mf.system == "You are terse."
    assert mf.license == ["MIT"]
    assert mf.template is None and mf.messages == []
    assert _parameters(_ok(params).stdout) == {
        "num_ctx": ["256"],
        "stop": ["."],
        "temperature": ["0.0"],
    }
    assert _ok(system).stdout == "You are terse.\n"
    assert _ok(licence).stdout == "MIT\n"
    assert "parent" not in _ok(plain).stdout

    (recipes / "Modelfile2").write_text("FROM mine\nPARAMETER temperature 0.5\n")
    _ok(ferrous(tmp_path, "create", "derived", "-f", str(recipes / "Modelfile2")))
    params, plain, modelfile = _parallel(
        tmp_path,
        ("show", "derived", "--parameters"),
        ("show", "derived"),
        ("show", "derived", "--modelfile"),
    )
    assert _parameters(_ok(params).stdout) == {
        "num_ctx": ["256"],  # inherited from mine
        "stop": ["."],
        "temperature": ["0.5"],  # overridden
    }
    assert re.search(r"^\s*parent\s+mine$", _ok(plain).stdout, re.M), plain.stdout
    derived_mf = parse_modelfile(_ok(modelfile).stdout)
    assert derived_mf.from_ == "mine"
    assert derived_mf.system == "You are terse." and derived_mf.license == ["MIT"]

    # The Modelfile's temperature 0 and stop "." apply: the model says "Okay." and the stop
    # sequence cuts the final period.
    out = _ok(ferrous(tmp_path, "run", "mine", "hi", "--port", "1"))
    assert out.stdout.rstrip("\n") == "Okay", repr(out.stdout)
    assert "starting one in this process" in out.stderr


def test_modelfile_errors_are_reported_with_file_line_and_directive(tmp_path: Path) -> None:
    write_tiny_llama(tmp_path / "base.gguf", script="Okay.", script_eos=True)
    bad = tmp_path / "Bad.Modelfile"
    bad.write_text("FROM ./base.gguf\nPARAMETER temperature 0\nPARAMATER num_ctx 256\n")
    go = tmp_path / "Go.Modelfile"
    go.write_text('FROM ./base.gguf\nTEMPLATE """{{ .Prompt }}"""\n')
    missing = tmp_path / "Missing.Modelfile"

    unknown, go_template, absent = _parallel(
        tmp_path,
        ("create", "bad", "-f", str(bad)),
        ("create", "bad", "-f", str(go)),
        ("create", "bad", "-f", str(missing)),
    )
    assert unknown.returncode != 0
    assert f"{bad}:3 (PARAMATER): unknown directive 'PARAMATER'" in unknown.stderr
    assert "did you mean PARAMETER?" in unknown.stderr

    assert go_template.returncode != 0
    assert "TEMPLATE must be a Jinja2 chat template" in go_template.stderr
    assert "Go templates ({{ .Prompt }}) are not supported" in go_template.stderr

    assert absent.returncode != 0
    assert f"ferrous: cannot read {missing}: No such file or directory" in absent.stderr

    assert "Traceback" not in unknown.stderr + go_template.stderr + absent.stderr
    assert _rows(_ok(ferrous(tmp_path, "list")).stdout) == {}  # nothing was created


# -- a running server: ps, stop, rm ------------------------------------------------------


def _healthy(port: int) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=0.5) as r:
            return bool(r.status == 200)
    except (urllib.error.URLError, OSError):
        return False


@contextmanager
def _serve(home: Path, port: int) -> Iterator[subprocess.Popen[str]]:
    """`ferrous serve --port PORT` until healthy; SIGTERM on exit, which must end with 0."""
    env = {**os.environ, "FERROUS_HOME": str(home)}
    with (
        open(home / "serve.out", "w") as out,
        open(home / "serve.err", "w") as err,
        subprocess.Popen(
            [*_FERROUS, "serve", "--port", str(port), "--workers", "1", "--threads", "1"],
            stdout=out,
            stderr=err,
            text=True,
            env=env,
        ) as proc,
    ):
        try:
            deadline = time.monotonic() + 30
            while not _healthy(port):
                assert proc.poll() is None, (home / "serve.err").read_text()
                assert time.monotonic() < deadline, "the server did not become healthy"
                time.sleep(0.05)
            yield proc
        finally:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
            try:
                code = proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
                raise
        assert code == 0, (home / "serve.err").read_text()


def test_ps_stop_and_rm_against_a_running_server(tmp_path: Path) -> None:
    src = write_tiny_llama(tmp_path / "served.gguf", script="Okay.", script_eos=True)
    _ok(ferrous(tmp_path, "pull", str(src)))
    port = free_port()
    at = ("--port", str(port))

    with _serve(tmp_path, port):
        # Printed once the server listens; healthy may be seen a moment before it. Output
        # is not a terminal here, so the token goes to a 0600 file, not into the output.
        line = f"chat page: http://127.0.0.1:{port}/ (the link with its token is in "
        deadline = time.monotonic() + 10
        while line not in (tmp_path / "serve.out").read_text():
            assert time.monotonic() < deadline, (tmp_path / "serve.out").read_text()
            time.sleep(0.05)
        assert "#token=" not in (tmp_path / "serve.out").read_text()
        chat_url = tmp_path / "chat-url"
        assert stat.S_IMODE(chat_url.stat().st_mode) == 0o600
        assert chat_url.read_text().startswith(f"http://127.0.0.1:{port}/#token=")

        empty = _ok(ferrous(tmp_path, "ps", *at))
        assert _header(empty.stdout) == ["NAME", "SIZE", "CONTEXT", "BACKEND", "UNTIL"]
        assert _rows(empty.stdout) == {}

        ran = _ok(ferrous(tmp_path, "run", "served", "hi", "--temperature", "0", *at))
        assert ran.stdout.strip() == "Okay."
        assert "starting one in this process" not in ran.stderr  # it used the running server

        ps = _ok(ferrous(tmp_path, "ps", *at))
        rows = _rows(ps.stdout)
        assert list(rows) == ["served:latest"], ps.stdout
        assert re.fullmatch(
            rf"served:latest\s+{_SIZE}\s+512\s+llama_cpp\s+(4m \d+s|5m 0s) from now",
            rows["served:latest"],
        ), rows  # the tiny model's 512-token context; default keep_alive 5m

        nothing = ferrous(tmp_path, "stop", "nothing", *at)
        assert nothing.returncode != 0
        assert nothing.stderr.strip() == "ferrous: model 'nothing:latest' is not loaded"

        stopped = _ok(ferrous(tmp_path, "stop", "served:latest", *at))
        assert stopped.stdout == "stopped served:latest\n"
        assert _rows(_ok(ferrous(tmp_path, "ps", *at)).stdout) == {}

        # Load it again, then remove it: `rm` asks the running server, which unloads the
        # model before deleting it.
        _ok(ferrous(tmp_path, "run", "served", "hi", "--temperature", "0", *at))
        assert list(_rows(_ok(ferrous(tmp_path, "ps", *at)).stdout)) == ["served:latest"]
        removed = _ok(ferrous(tmp_path, "rm", "served", *at))
        assert removed.stdout.strip() == "deleted 'served'"
        ps, listed = _parallel(tmp_path, ("ps", *at), ("list",))
        assert _rows(_ok(ps).stdout) == {}  # unloaded: the server handled the delete
        assert _rows(_ok(listed).stdout) == {}


def test_ps_without_a_server_says_none_answers(tmp_path: Path) -> None:
    port = free_port()
    out = ferrous(tmp_path, "ps", env={"FERROUS_PORT": str(port)})
    assert out.returncode != 0
    assert out.stdout == ""
    assert out.stderr.strip() == (
        f"ferrous: no server answers on 127.0.0.1:{port} (start `ferrous serve`)"
    )


def test_ps_and_stop_without_a_server_name_the_port_asked_for(tmp_path: Path) -> None:
    port = free_port()
    ps, stop = _parallel(tmp_path, ("ps", "--port", str(port)), ("stop", "x", "--port", str(port)))
    for out in (ps, stop):
        assert out.returncode != 0
        assert f"no server answers on 127.0.0.1:{port}" in out.stderr, out.stderr


def _sigint_default() -> None:
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def test_pull_over_http_plain_progress_interrupt_and_resume(tmp_path: Path) -> None:
    """Piped output gets plain progress lines; Ctrl-C says how much is kept, and pulling
    again resumes from there."""
    payload = write_tiny_llama(tmp_path / "src.gguf", script="Okay.").read_bytes()
    with serve_payload(payload) as srv:
        srv.behaviour.slow_requests, srv.behaviour.slow_delay = 1, 0.2  # the first one trickles
        env = {**os.environ, "FERROUS_HOME": str(tmp_path)}
        proc = subprocess.Popen(
            [sys.executable, "-m", "gateway.cli", "pull", "web", srv.url],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
            # Ctrl-C as a terminal delivers it: a shell running the suite in the
            # background starts its children with SIGINT ignored, and they inherit that.
            preexec_fn=_sigint_default,
        )
        deadline = time.monotonic() + 60
        while srv.behaviour.sent() < 3 * 64 * 1024 and time.monotonic() < deadline:
            time.sleep(0.05)
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=60)
        assert proc.returncode == 130, err
        assert "pull interrupted" in err and "run the same command again to resume" in err
        again = _ok(ferrous(tmp_path, "pull", "web", srv.url))
        resumed = [r.range for r in srv.behaviour.requests]
        assert resumed[0] is None and resumed[-1] is not None and resumed[-1].startswith("bytes=")
    assert re.search(r"pulling: 100% \(\S+ \S+ of \S+ \S+\)", again.stderr), again.stderr
    assert "━" not in again.stderr  # no progress bar drawn into a pipe
    assert again.stdout.startswith("web  ")
