"""Shared pytest fixtures: small image trees and a loopback HTTP server (helpers: tests/fixtures.py)."""

from __future__ import annotations

import http.server
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest


@pytest.fixture(autouse=True)
def own_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Each test its own paths.cache_dir (TRANSFER_CACHE): a probe decision cached by one test must
    not answer another's, nor the developer's own runs'."""
    monkeypatch.setenv("TRANSFER_CACHE", str(tmp_path / "transfer_cache"))


@pytest.fixture
def image_folder(tmp_path: Path) -> Path:
    from tests.fixtures import write_image_folder  # here, so that collecting a test imports nothing of transfer

    return write_image_folder(tmp_path / "images", per_class=16)


@pytest.fixture
def loopback_server(tmp_path: Path) -> Iterator[tuple[str, Path]]:
    """A real HTTP server on 127.0.0.1 serving files from a temporary folder."""
    served = tmp_path / "served"
    served.mkdir()

    class Handler(http.server.SimpleHTTPRequestHandler):
        def __init__(self, *args, **kwargs):  # type: ignore[no-untyped-def]
            super().__init__(*args, directory=str(served), **kwargs)

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", served
    finally:
        server.shutdown()
        server.server_close()
