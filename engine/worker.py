"""The worker process: one decode loop over the models it has loaded.

Started by the pool as ``python -m engine.worker --fd N`` where N is its end of
a Unix socket pair. Everything runs on the main thread, in this cycle::

    read control frames   (block when idle; never block while a sequence can run)
    admit                 (start queued sequences while the backend has room,
                           pausing one for another: engine.workeradmit)
    step                  (one token for every runnable sequence)
    emit                  (text deltas into each generation's ring)
    retire                (finished, cancelled, stalled, failed)

A sequence whose ring is full is *paused*: it is not stepped, so nothing is
dropped, reordered or buffered beyond one step's output; the consumer's
:class:`~engine.ipc.Resume` frame (or a periodic re-check) un-pauses it. One
paused longer than its stall timeout ends with reason ``stalled``.

Requests of other kinds, *jobs* (embeddings, transcriptions: :mod:`engine.jobs`), run on
this thread too (llama.cpp's thread pool follows the calling thread), a slice
of units of work (a forward pass each) per cycle after the step, most urgent then
oldest job first: running streams wait about one unit per token, as they do for a
chunk of a long prompt.
"""

from __future__ import annotations

import argparse
import itertools
import os
import resource
import select
import signal
import socket
import sys
import time
from collections import deque
from collections.abc import Callable

from engine import ipc
from engine.backends import (
    Backend,
    TextGenerator,
    available_backends,
    generator_of,
)
from engine.interrupt import Interrupt
from engine.jobs import JobQueue
from engine.netring import NET_PREFIX, NetRingWriter, is_net_ring
from engine.prompts import prompt_tokens, with_tool_grammar
from engine.readahead import READ_AHEAD_MODES, ReadAhead
from engine.requests import FinishReason
from engine.rings import Ring, RingFull
from engine.workeradmit import admissible, admit, resume_suspended
from engine.workerload import load_backend, load_failure
from engine.workerseq import WorkerSeq
from protocol.errors import (
    ErrorCode,
    FerrousError,
    ModelNotFound,
)

__all__ = ["Worker", "main"]

PAUSED_RECHECK_S = 0.25  # safety net only: Resume frames normally end a pause


def _rss_bytes() -> int:
    """Current resident set size (not the peak), from /proc."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


class Worker:
    def __init__(
        self,
        sock: socket.socket,
        interrupt: Interrupt | None = None,
        *,
        nonce: str = "",
        read_ahead: str = "idle",
    ) -> None:
        self._sock = sock
        self._nonce = nonce
        self._interrupt = interrupt
        # Reading chats' next turn markers while idle needs a step a request can stop.
        self._ahead = (
            None
            if interrupt is None or read_ahead == "off"
            else ReadAhead(sock, interrupt, machine_idle=read_ahead == "idle")
        )
        self._frames = ipc.FrameBuffer()
        self._models: dict[str, tuple[Backend, float]] = {}
        self._queued: dict[str, deque[WorkerSeq]] = {}
        self._running: dict[int, WorkerSeq] = {}
        self._jobs = JobQueue(
            self._send, self._sock.sendall
        )  # requests of every kind but text generation
        self._stopping = False
        self._order = itertools.count(1)  # numbers sequences as they start
        self._tokens_generated = 0
        self._handlers: dict[type, Callable[..., None]] = {
            ipc.LoadModel: self._on_load,
            ipc.UnloadModel: self._on_unload,
            ipc.Generate: self._on_generate,
            ipc.Cancel: self._on_cancel,
            ipc.Resume: self._on_resume,
            ipc.Ping: self._on_ping,
            ipc.Shutdown: self._on_shutdown,
        }
        for message in self._jobs.handles():
            self._handlers[message] = self._on_job
        self._handlers[ipc.CancelJob] = self._on_cancel_job

    # -- I/O ------------------------------------------------------------------------

    def _send(self, msg: ipc.FromWorker) -> None:
        self._sock.sendall(ipc.encode(msg))

    def _poll(self, timeout: float | None) -> None:
        readable, _, _ = select.select([self._sock], [], [], timeout)
        if not readable:
            return
        data = self._sock.recv(1 << 16)
        if not data:  # the gateway is gone: nothing left to serve
            self._stopping = True
            return
        for body in self._frames.feed(data):
            msg = ipc.decode_to_worker(body)
            self._handlers[type(msg)](msg)

    def run(self) -> None:
        self._send(
            ipc.Hello(
                pid=os.getpid(),
                backends=available_backends(),
                nonce=self._nonce,
                host=socket.gethostname(),
            )
        )
        while not self._stopping:
            if self._interrupt is not None:
                # Raised after the client sent a request that should not wait for a
                # step (engine.interrupt): that request is read below.
                self._interrupt.clear()
            self._poll(self._timeout())
            if self._stopping:
                break
            self._admit()
            self._step()
            self._jobs.step()
            self._unpause()
            idle = self._idle_reader()
            if idle is not None and self._ahead is not None and self._ahead.may_read():
                self._ahead.read(idle)
        for seq in list(self._running.values()) + [s for q in self._queued.values() for s in q]:
            self._finalize(seq, FinishReason.CANCELLED, notify=False)
        self._jobs.close()
        for backend, _ in self._models.values():
            backend.free()
        if self._ahead is not None:
            self._ahead.close()

    def _idle_reader(self) -> TextGenerator | None:
        """A model with a chat's next turn to read ahead, when nothing else is to be done."""
        if self._ahead is None or self._running or self._jobs or any(self._queued.values()):
            return None
        return self._ahead.reader(backend for backend, _ in self._models.values())

    def _timeout(self) -> float | None:
        if self._jobs or any(not s.outbox and not s.suspended for s in self._running.values()):
            return 0.0
        if self._admissible():
            return 0.0
        if self._running:  # all paused: wait for a Resume, re-check now and then
            now = time.perf_counter()
            deadline = min(
                (s.paused_since or now) + s.msg.stall_timeout for s in self._running.values()
            )
            return max(0.0, min(PAUSED_RECHECK_S, deadline - now))
        if self._ahead is not None and self._idle_reader() is not None:
            return self._ahead.wait()
        return None

    # -- control --------------------------------------------------------------------

    def _on_load(self, msg: ipc.LoadModel) -> None:
        try:
            backend, load_ms = load_backend(msg)
        except Exception as exc:
            self._send(load_failure(msg, exc))
            return
        if msg.model in self._models:
            self._drop_model(msg.model)
        if self._interrupt is not None and isinstance(backend, TextGenerator):
            backend.set_interrupt(self._interrupt.address)
        self._models[msg.model] = (backend, load_ms)
        self._send(
            ipc.ModelLoaded(
                req=msg.req,
                model=msg.model,
                load_ms=load_ms,
                n_ctx=backend.n_ctx,
                providers=list(backend.providers),
            )
        )

    def _drop_model(self, model: str) -> None:
        for seq in [s for s in self._running.values() if s.model == model] + list(
            self._queued.pop(model, ())
        ):
            self._finalize(seq, FinishReason.CANCELLED)
        self._jobs.drop_model(model)
        backend, _ = self._models.pop(model)
        if self._ahead is not None and isinstance(backend, TextGenerator):
            self._ahead.forget(backend)
        backend.free()

    def _on_unload(self, msg: ipc.UnloadModel) -> None:
        if msg.model in self._models:
            self._drop_model(msg.model)
        self._send(ipc.Ack(req=msg.req))

    def _on_generate(self, msg: ipc.Generate) -> None:
        entry = self._models.get(msg.model)
        if entry is None:
            self._reject(msg.gen, ModelNotFound(f"model {msg.model!r} is not loaded"))
            return
        try:
            ring: Ring | NetRingWriter
            if is_net_ring(msg.ring):
                ring = NetRingWriter(self._send, msg.gen, int(msg.ring[len(NET_PREFIX) :]))
            else:
                ring = Ring.attach(msg.ring)
        except (OSError, ValueError) as exc:
            self._reject(msg.gen, FerrousError(f"cannot attach ring: {exc}"))
            return
        try:
            backend = generator_of(entry[0])  # an embedding model is refused here
            msg = with_tool_grammar(msg)
            # Before queueing: a bad grammar or schema fails now, not after a wait for a slot.
            backend.check_sampling(msg.sampling)
            seq = WorkerSeq(msg, ring, backend, msg.model)
            seq.prompt = prompt_tokens(backend, msg)
        except FerrousError as exc:
            ring.close()
            self._reject(msg.gen, exc)
            return
        self._queued.setdefault(msg.model, deque()).append(seq)

    def _reject(self, gen: int, exc: FerrousError) -> None:
        self._send(ipc.Finished.ended(gen, FinishReason.ERROR.value, exc.code.value, exc.message))

    def _on_cancel(self, msg: ipc.Cancel) -> None:
        seq = self._running.get(msg.gen)
        if seq is None:
            for q in self._queued.values():
                seq = next((s for s in q if s.gen == msg.gen), None)
                if seq is not None:
                    q.remove(seq)
                    break
        if seq is not None:
            self._finalize(seq, FinishReason.CANCELLED)

    def _on_resume(self, msg: ipc.Resume) -> None:
        seq = self._running.get(msg.gen)
        if seq is not None:
            if isinstance(seq.ring, NetRingWriter):
                seq.ring.confirmed(msg.tail)
            self._drain(seq)

    def _on_ping(self, msg: ipc.Ping) -> None:
        rss = _rss_bytes()
        self._send(
            ipc.Pong(
                req=msg.req,
                models=sorted(self._models),
                active=len(self._running),
                queued=sum(len(q) for q in self._queued.values()),
                rss_bytes=rss,
                tokens_generated=self._tokens_generated,
                tokens_read_ahead=0 if self._ahead is None else self._ahead.tokens,
            )
        )

    def _on_job(self, msg: ipc.Embed | ipc.Transcribe | ipc.Synthesize) -> None:
        entry = self._models.get(msg.model)
        self._jobs.start(msg, None if entry is None else entry[0], msg.req, msg.model)

    def _on_cancel_job(self, msg: ipc.CancelJob) -> None:
        self._jobs.cancel(msg.req)

    def _on_shutdown(self, msg: ipc.Shutdown) -> None:
        self._stopping = True

    # -- the decode loop ------------------------------------------------------------

    def _admissible(self) -> bool:
        return admissible(self._models, self._queued, self._running)

    def _admit(self) -> None:
        admit(self._queued, self._running, self._order, self._fail)
        resume_suspended(self._running, self._fail)

    def _step(self) -> None:
        """One decode step per model: every runnable sequence advances together."""
        groups: dict[str, list[WorkerSeq]] = {}
        for seq in list(self._running.values()):
            if seq.outbox or seq.ending is not None or seq.suspended:
                continue  # paused on a full ring, finishing, or suspended for another
            if seq.n_out and seq.backend.context_used(seq.gen) >= seq.backend.n_ctx:
                self._end(seq, FinishReason.LENGTH)
                continue
            groups.setdefault(seq.model, []).append(seq)
        for seqs in groups.values():
            backend = seqs[0].backend
            try:
                tokens = backend.step([s.gen for s in seqs])
            except Exception as exc:
                for seq in seqs:
                    self._fail(seq, exc)
                continue
            failed = backend.failed()
            for seq in seqs:
                if seq.gen in failed:
                    self._fail(seq, failed[seq.gen])
                    continue
                token = tokens.get(seq.gen)
                if token is not None:
                    self._on_token(seq, backend, token)

    def _on_token(self, seq: WorkerSeq, backend: TextGenerator, token: int) -> None:
        if not seq.n_out:
            seq.t_first = time.perf_counter()
        lp = backend.take_logprobs(seq.gen)
        if backend.is_end(token) and not seq.msg.sampling.ignore_eos:
            self._end(seq, FinishReason.STOP)
            return
        self._tokens_generated += 1
        if seq.add_token(token, backend.token_bytes, lp):
            self._drain(seq)
        max_tokens = seq.msg.sampling.max_tokens
        if seq.stream.stopped:
            self._end(seq, FinishReason.STOP)
        elif max_tokens is not None and seq.n_out >= max_tokens:
            self._end(seq, FinishReason.LENGTH)

    def _drain(self, seq: WorkerSeq) -> None:
        """Move queued records into the ring; pause the sequence if it is full."""
        while seq.outbox:
            ids, data, extra = seq.outbox[0]
            try:
                wake = seq.ring.write(ids, data, extra)
            except RingFull:
                if seq.paused_since is None:
                    seq.paused_since = time.perf_counter()
                return
            seq.outbox.popleft()
            if wake:
                self._send(ipc.Wake(gen=seq.gen))
        seq.paused_since = None
        if seq.ending is not None:
            self._finalize(seq, seq.ending)

    def _unpause(self) -> None:
        now = time.perf_counter()
        for seq in list(self._running.values()):
            if seq.paused_since is None:
                continue
            self._drain(seq)
            if seq.paused_since is not None and now - seq.paused_since > seq.msg.stall_timeout:
                self._finalize(seq, FinishReason.STALLED)

    def _end(self, seq: WorkerSeq, reason: FinishReason) -> None:
        """Normal end: release held text, then finish once the ring took everything."""
        seq.close_text(reason)
        self._drain(seq)

    def _fail(self, seq: WorkerSeq, exc: Exception) -> None:
        err = exc if isinstance(exc, FerrousError) else FerrousError(f"{type(exc).__name__}: {exc}")
        if not isinstance(exc, FerrousError):
            err.code = ErrorCode.ENGINE_ERROR
        self._finalize(seq, FinishReason.ERROR, error=err)

    def _finalize(
        self,
        seq: WorkerSeq,
        reason: FinishReason,
        *,
        error: FerrousError | None = None,
        notify: bool = True,
    ) -> None:
        cached = 0
        if self._running.pop(seq.gen, None) is not None and seq.started:
            cached = seq.backend.prompt_reused(seq.gen)
            if self._ahead is not None and notify and error is None:
                self._ahead.ended(seq, reason)
            seq.backend.finish(seq.gen)
        if notify:
            load_ms = self._models.get(seq.model, (None, 0.0))[1]
            self._send(seq.finished(reason, error, load_ms, cached))
        seq.ring.close()


def connect_back(address: str) -> socket.socket:
    """A control connection to the gateway at ``host:port`` (a worker on another machine)."""
    host, _, port = address.rpartition(":")
    sock = socket.create_connection((host.strip("[]"), int(port)), timeout=30)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock.setblocking(True)
    return sock


def serve_remote(address: str, nonce: str) -> None:
    """Run a worker whose gateway is at ``address`` (``host:port``), until it is told to stop
    or the connection goes; its generations' text goes over the connection."""
    sock = connect_back(address)
    try:
        Worker(sock, None, nonce=nonce).run()
    except (BrokenPipeError, ConnectionResetError):
        pass
    finally:
        sock.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="engine.worker")
    parser.add_argument("--fd", type=int, help="control socket file descriptor")
    parser.add_argument("--interrupt-fd", type=int, help="the step interrupt flag (memfd)")
    parser.add_argument("--connect", metavar="HOST:PORT", help="the gateway's worker port")
    parser.add_argument("--nonce", default="", help="the start this worker answers (--connect)")
    parser.add_argument(
        "--read-ahead",
        choices=READ_AHEAD_MODES,
        default="idle",
        help="read finished chats' next turn markers ahead (engine.readahead)",
    )
    args = parser.parse_args(argv)
    # The gateway owns Ctrl-C: it shuts workers down in order.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    if args.connect:
        serve_remote(args.connect, args.nonce)
        return 0
    if args.fd is None:
        parser.error("--fd or --connect is required")
    sock = socket.socket(fileno=args.fd)
    sock.setblocking(True)
    try:
        interrupt = None if args.interrupt_fd is None else Interrupt.attach(args.interrupt_fd)
        Worker(sock, interrupt, read_ahead=args.read_ahead).run()
    except (BrokenPipeError, ConnectionResetError):
        return 0
    finally:
        sock.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
