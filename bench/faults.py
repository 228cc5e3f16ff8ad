"""Fault injection from outside the code under test: a failing S3 proxy, a worker killer, a slow store.

Nothing here is imported by `cluster/` or `serve/`: faults are injected the way
the world injects them (a network answering 503, a process getting SIGKILL, a
store whose calls take a while), never through hooks in production code.

    FaultyS3Proxy(upstream, every=N)   an HTTP proxy on 127.0.0.1: every N-th request answers
                                       503 SlowDown without reaching the server (S3 said "retry")
    WorkerKiller(delay_s=...)          SIGKILLs a Ray Train worker process after a delay
    slowed(store, seed)                the same store whose object calls each pause a little,
                                       so concurrent callers interleave as over a real network
"""

from __future__ import annotations

import http.client
import os
import random
import signal
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlsplit

import psutil

# -- S3 answering 503 ------------------------------------------------------------------------------

_HOP_BY_HOP = {"connection", "keep-alive", "proxy-connection", "transfer-encoding", "te", "trailer", "upgrade"}
SLOW_DOWN = (b'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>SlowDown</Code>'
             b"<Message>Please reduce your request rate.</Message></Error>")


class FaultyS3Proxy:
    """Forwards HTTP requests to `upstream`; every `every`-th one gets 503 SlowDown and is never forwarded.

    `requests` counts what arrived, `failed` what was answered 503. Loopback only.
    """

    def __init__(self, upstream: str, every: int):
        if every < 2:
            raise ValueError(f"every={every} must be >= 2 (every request failing is an outage, not a fault)")
        parts = urlsplit(upstream)
        if parts.scheme != "http" or not parts.hostname or not parts.port:
            raise ValueError(f"upstream={upstream!r} must be http://host:port")
        self.upstream = (parts.hostname, parts.port)
        self.every = every
        self.requests = self.failed = 0
        self._lock = threading.Lock()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self._server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"
        self._thread = threading.Thread(target=self._server.serve_forever, name="faulty-s3", daemon=True)

    def __enter__(self) -> "FaultyS3Proxy":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._server.shutdown()
        self._server.server_close()

    def _should_fail(self) -> bool:
        with self._lock:
            self.requests += 1
            if self.requests % self.every == 0:
                self.failed += 1
                return True
            return False

    def _handler(self):
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args) -> None:  # quiet
                pass

            def _body(self) -> bytes:
                if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
                    chunks = []
                    while True:
                        size = int(self.rfile.readline().split(b";")[0].strip(), 16)
                        if size == 0:
                            while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                                pass  # trailers
                            return b"".join(chunks)
                        chunks.append(self.rfile.read(size))
                        self.rfile.readline()
                return self.rfile.read(int(self.headers.get("Content-Length") or 0))

            def _relay(self) -> None:
                body = self._body()
                if proxy._should_fail():
                    self.send_response(503)
                    self.send_header("Content-Type", "application/xml")
                    self.send_header("Content-Length", str(len(SLOW_DOWN)))
                    self.end_headers()
                    self.wfile.write(SLOW_DOWN)
                    return
                headers = {k: v for k, v in self.headers.items() if k.lower() not in _HOP_BY_HOP}
                headers["Content-Length"] = str(len(body))
                conn = http.client.HTTPConnection(*proxy.upstream, timeout=60)
                try:
                    conn.request(self.command, self.path, body=body, headers=headers)
                    resp = conn.getresponse()
                    data = resp.read()
                    self.send_response(resp.status, resp.reason)
                    for k, v in resp.getheaders():
                        if k.lower() not in _HOP_BY_HOP and k.lower() != "content-length":
                            self.send_header(k, v)
                    # HEAD answers carry the object's length and no body.
                    length = resp.getheader("Content-Length") if self.command == "HEAD" else str(len(data))
                    self.send_header("Content-Length", length or "0")
                    self.end_headers()
                    if self.command != "HEAD":
                        self.wfile.write(data)
                finally:
                    conn.close()

            do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _relay

        return Handler


# -- SIGKILL for a Ray Train worker -----------------------------------------------------------------

TRAIN_WORKER_TITLE = "ray::RayTrainWorker"


def ray_train_workers() -> list[psutil.Process]:
    """Live Ray Train worker processes of this machine (their process title names the actor class)."""
    return [p for p in psutil.process_iter(["cmdline"])
            if (p.info.get("cmdline") or [""])[0].startswith(TRAIN_WORKER_TITLE)]


@dataclass
class WorkerKiller:
    """Waits for a Ray Train worker, then SIGKILLs it `delay_s` seconds later (once), from this thread.

    `killed` holds (pid, seconds after the worker appeared) when the kill landed;
    it stays empty when no worker lived long enough (the job ended first).
    With `delay_s=None` it only watches: `lifetime_s` is how long the first
    workers lived (to choose kill times for later runs).
    """

    delay_s: float | None
    timeout_s: float = 600.0
    killed: list[tuple[int, float]] = field(default_factory=list)
    lifetime_s: float | None = None
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def __enter__(self) -> "WorkerKiller":
        self._thread = threading.Thread(target=self._run, name="worker-killer", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(timeout=10)

    def _run(self) -> None:
        deadline = time.monotonic() + self.timeout_s
        while not self._stop.is_set() and time.monotonic() < deadline:
            workers = {p.pid for p in ray_train_workers()}
            if not workers:
                self._stop.wait(0.05)
                continue
            seen = time.monotonic()
            if self.delay_s is None:
                while not self._stop.is_set() and workers & {p.pid for p in ray_train_workers()}:
                    self._stop.wait(0.05)
                self.lifetime_s = time.monotonic() - seen
                return
            if self._stop.wait(self.delay_s):
                return
            for pid in workers & {p.pid for p in ray_train_workers()}:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    continue
                self.killed.append((pid, time.monotonic() - seen))
                return
            return  # the workers we saw are gone: the job ended before the delay


# -- a store whose calls take time ---------------------------------------------------------------------

SLOWED_METHODS = ("put_bytes", "get_bytes", "exists", "list_prefix", "delete_prefix", "delete_key",
                  "put_if_absent")


def slowed(store, seed: int, max_delay_s: float = 0.004):
    """`store` with a random pause (up to `max_delay_s`) before each object-layer call.

    Set on the instance, so the concept layer's own calls pause too. For race
    tests: callers interleave as they would over a network.
    """
    rng = random.Random(seed)
    lock = threading.Lock()

    def wrap(method):
        def call(*args, **kwargs):
            with lock:
                pause = rng.uniform(0, max_delay_s)
            time.sleep(pause)
            return method(*args, **kwargs)

        return call

    for name in SLOWED_METHODS:
        if hasattr(store, name):
            setattr(store, name, wrap(getattr(store, name)))
    return store
