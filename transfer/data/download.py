"""Fetch a dataset archive once, verify its checksum and keep it in a cache directory.

Real downloads over HTTP(S); tests point them at a loopback server.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
import urllib.error
import urllib.request
import zipfile
import tarfile
from pathlib import Path

from transfer.errors import DataError

CHUNK = 1 << 20


def file_digest(path: Path, algorithm: str) -> str:
    digest = hashlib.new(algorithm)
    with open(path, "rb") as stream:
        for chunk in iter(lambda: stream.read(CHUNK), b""):
            digest.update(chunk)
    return digest.hexdigest()


def checksum_matches(path: Path, checksum: str | None) -> bool:
    """``checksum`` is ``"<algorithm>:<hex>"`` (e.g. ``sha1:fba4...``); ``None`` accepts any file."""
    if checksum is None:
        return True
    algorithm, _, expected = checksum.partition(":")
    return file_digest(path, algorithm).lower() == expected.lower()


def download(url: str, destination: Path, checksum: str | None, timeout: float = 60.0) -> Path:
    """Download ``url`` to ``destination`` unless a verified copy is already there.

    The file is written under a temporary name and renamed only once complete and verified, so an
    interrupted download never leaves a file that a later run would trust.
    """
    destination = Path(destination)
    if destination.is_file() and checksum_matches(destination, checksum):
        return destination
    destination.parent.mkdir(parents=True, exist_ok=True)
    handle, partial = tempfile.mkstemp(dir=destination.parent, prefix=destination.name, suffix=".part")
    try:
        with os.fdopen(handle, "wb") as out, urllib.request.urlopen(url, timeout=timeout) as response:
            shutil.copyfileobj(response, out, CHUNK)
        if not checksum_matches(Path(partial), checksum):
            raise DataError(
                f"The file downloaded from {url} does not match its checksum {checksum}: the download "
                "was corrupted or the file changed on the server. Delete any partial copy and retry, "
                "or set the expected checksum in the data config if the new file is trusted."
            )
        os.replace(partial, destination)
    except (urllib.error.URLError, TimeoutError, ConnectionError) as error:
        raise DataError(
            f"Could not download {url} ({getattr(error, 'reason', error)}). This machine may be "
            f"offline or the host unreachable. Download the file by other means and place it at "
            f"'{destination}', or use an extracted copy with data=folder data.root=PATH."
        ) from error
    finally:
        if os.path.exists(partial):
            os.remove(partial)
    return destination


def extract(archive: Path, directory: Path) -> Path:
    """Unpack a zip or tar archive into ``directory`` (once; a marker file records completion)."""
    marker = directory / f".{archive.name}.extracted"
    if marker.is_file():
        return directory
    directory.mkdir(parents=True, exist_ok=True)
    if zipfile.is_zipfile(archive):
        with zipfile.ZipFile(archive) as bundle:
            bundle.extractall(directory)
    elif tarfile.is_tarfile(archive):
        with tarfile.open(archive) as bundle:
            bundle.extractall(directory, filter="data")
    else:
        raise DataError(f"'{archive}' is neither a zip nor a tar archive; delete it and download again.")
    marker.touch()
    return directory
