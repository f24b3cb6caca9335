from __future__ import annotations

import contextlib
import os
import socket
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


def shared(*parts: str) -> Path:
    """Path of a file in ../shared/data; skips the test when the shared data are not laid out."""
    path = SHARED_DATA.joinpath(*parts)
    if not path.exists():
        pytest.skip(f"shared test data missing: {path}")
    return path


@pytest.fixture
def scanpy_visium() -> Path:
    return shared("scanpy", "visium_data", "1.0.0")


@pytest.fixture
def perik_visium() -> Path:
    return shared("perik_visium_cytassist_mouse_placenta")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclass
class S3Server:
    """A moto S3 server on loopback that records every request it serves."""

    endpoint: str
    requests: list[tuple[str, str]] = field(default_factory=list)

    @property
    def storage_options(self) -> dict:
        return {"key": "testing", "secret": "testing", "client_kwargs": {"endpoint_url": self.endpoint}}

    def reset(self) -> None:
        self.requests.clear()


@contextlib.contextmanager
def moto_server() -> Iterator[S3Server]:
    """Run moto's S3 HTTP API on a free 127.0.0.1 port (a real HTTP server, as s3fs's own tests do).

    Every server shares moto's in-process backend, so a second server sees the buckets of the first.
    """
    from moto.server import DomainDispatcherApplication, create_backend_app
    from werkzeug.serving import make_server

    for name, value in (
        ("AWS_ACCESS_KEY_ID", "testing"),
        ("AWS_SECRET_ACCESS_KEY", "testing"),
        ("AWS_DEFAULT_REGION", "us-east-1"),
    ):
        os.environ.setdefault(name, value)
    port = free_port()
    server_state = S3Server(endpoint=f"http://127.0.0.1:{port}")
    app = DomainDispatcherApplication(create_backend_app)

    def counting_app(environ, start_response):
        server_state.requests.append((environ["REQUEST_METHOD"], environ.get("PATH_INFO", "")))
        return app(environ, start_response)

    server = make_server("127.0.0.1", port, counting_app, threaded=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server_state
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)


@pytest.fixture(scope="session")
def s3_server() -> Iterator[S3Server]:
    """One moto S3 server for the whole session, stopped after."""
    with moto_server() as server:
        yield server


@pytest.fixture
def s3_bucket(s3_server: S3Server, request: pytest.FixtureRequest) -> Iterator[str]:
    """A fresh bucket for one test; yields its ``s3://`` URL."""
    import s3fs

    fs = s3fs.S3FileSystem(**s3_server.storage_options)
    name = "test-" + request.node.name.lower().replace("_", "-").replace("[", "-").replace("]", "")[:40]
    fs.mkdir(name)
    fs.invalidate_cache()
    s3_server.reset()
    yield f"s3://{name}"
    fs.rm(name, recursive=True)


@pytest.fixture
def http_root(tmp_path: Path) -> Iterator[tuple[Path, str]]:
    """Serve a fresh folder over HTTP on 127.0.0.1 with Range support (as static object hosting does)."""
    import functools
    from http.server import ThreadingHTTPServer

    from RangeHTTPServer import RangeRequestHandler

    class QuietHandler(RangeRequestHandler):
        def log_message(self, *args) -> None:
            pass

    folder = tmp_path / "www"
    folder.mkdir()
    server = ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(QuietHandler, directory=str(folder)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield folder, f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        thread.join(timeout=10)
