"""Dataset archives fetched once into a cache, checked against their checksum, and unpacked: pooch.

pooch downloads to a temporary file and keeps it only once its hash matches (a corrupt or
interrupted download is never trusted later), re-downloads a cached file whose hash no longer
matches, and unpacks again when a file of the archive is missing. Tests point it at a loopback
server.
"""

from __future__ import annotations

import os
from pathlib import Path

from transfer.errors import DataError


def fetch_archive(
    url: str, checksum: str | None, cache_dir: str | os.PathLike[str], name: str, timeout: float = 60.0
) -> Path:
    """Download ``url`` to ``cache_dir/<its file name>`` (unless a copy with ``checksum``, as
    ``"sha1:<hex>"``, ``"sha256:<hex>"`` or ``"md5:<hex>"``, is there), unpack the zip or tar archive
    into ``cache_dir/name`` and return that folder."""
    import pooch
    import requests

    cache = Path(cache_dir).expanduser()
    filename = url.rsplit("/", 1)[-1]
    processor = pooch.Unzip(extract_dir=name) if filename.endswith(".zip") else pooch.Untar(extract_dir=name)
    try:
        pooch.retrieve(
            url,
            known_hash=checksum,
            fname=filename,
            path=cache,
            processor=processor,
            downloader=pooch.HTTPDownloader(timeout=timeout),
            progressbar=False,
        )
    except ValueError as error:  # pooch: the hash of the downloaded file differs
        raise DataError(
            f"The file downloaded from {url} does not match its checksum {checksum}: the download "
            "was corrupted or the file changed on the server. Retry, or set the expected checksum in "
            f"the data config if the new file is trusted. ({error})"
        ) from None
    except requests.RequestException as error:
        raise DataError(
            f"Could not download {url} ({type(error).__name__}). This machine may be offline or the "
            f"host unreachable. Download the file by other means and place it at '{cache / filename}', "
            "or use an extracted copy with data=folder data.root=PATH."
        ) from error
    return cache / name
