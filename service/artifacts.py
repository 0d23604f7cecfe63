"""The artifact store: the files the service keeps and serves itself, as MLflow's artifact
proxy does, so that no download depends on a disk the service shares with the Ray nodes.

    checkpoints/<job id>/<trial key>/<sha256>.pt   a trial's best model, uploaded by its rank 0
    models/<model id>                              a model file a user uploaded to evaluate

It lives at ``ADVORCH_ARTIFACTS``: a folder (by default ``$ADVORCH_HOME/artifacts``) or any
fsspec URL (``s3://bucket/prefix`` with the ``advorch[s3]`` extra). A file is named by its
content's SHA-256 where it can change, so the database only ever points at a whole file: a new
upload is written under its own name before the trial is pointed at it.

Uploads arrive as a stream: ``receive`` writes it to a local file while hashing and counting it,
refuses it past the size limit or when the checksum the sender gave does not match, and only
then puts it in the store.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from collections.abc import AsyncIterator, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import IO

import fsspec
from fsspec.implementations.local import LocalFileSystem

CHUNK_BYTES = 1 << 20


class UploadRefused(ValueError):
    """An upload that is too large, or whose bytes are not what its checksum says."""

    def __init__(self, message: str, *, too_large: bool = False) -> None:
        super().__init__(message)
        self.too_large = too_large


class ArtifactMissing(FileNotFoundError):
    pass


@dataclass(frozen=True)
class ReceivedFile:
    """An upload written whole to a local temporary file, with its digest and size."""

    path: Path
    sha256: str
    size: int


class ArtifactStore:
    def __init__(self, url: str) -> None:
        self.url = url
        self.fs, self.root = fsspec.core.url_to_fs(url)
        if isinstance(self.fs, LocalFileSystem):
            Path(self.root).mkdir(parents=True, exist_ok=True)

    def _path(self, key: str) -> str:
        if key.startswith("/") or ".." in key.split("/"):
            raise ValueError(f"not an artifact key: {key!r}")
        return f"{self.root.rstrip('/')}/{key}"

    def put(self, key: str, local_file: Path) -> None:
        """Store ``local_file`` under ``key``; readers see the old content or the new, whole."""
        target = self._path(key)
        if isinstance(self.fs, LocalFileSystem):
            Path(target).parent.mkdir(parents=True, exist_ok=True)
            draft = f"{target}.{os.getpid()}.part"
            self.fs.put_file(str(local_file), draft)
            os.replace(draft, target)
        else:  # object stores write an object whole or not at all
            self.fs.put_file(str(local_file), target)

    def exists(self, key: str) -> bool:
        return bool(self.fs.exists(self._path(key)))

    def delete(self, key: str) -> None:
        if self.exists(key):
            self.fs.rm_file(self._path(key))

    def local_path(self, key: str) -> Path | None:
        """The file on this machine's disk, when the store is a folder (served as it is)."""
        return Path(self._path(key)) if isinstance(self.fs, LocalFileSystem) else None

    def chunks(self, key: str) -> Iterator[bytes]:
        """The artifact's bytes, a chunk at a time; ArtifactMissing if it is not there."""
        try:
            file: IO[bytes] = self.fs.open(self._path(key), "rb")
        except FileNotFoundError as err:
            raise ArtifactMissing(f"artifact {key!r} is missing from the store") from err
        with file:
            while chunk := file.read(CHUNK_BYTES):
                yield chunk


@contextmanager
def temporary_upload(directory: Path) -> Iterator[Path]:
    """A local file for an upload to land in, removed when the block ends."""
    directory.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(dir=directory, prefix="upload-", suffix=".part")
    os.close(fd)
    try:
        yield Path(name)
    finally:
        Path(name).unlink(missing_ok=True)


async def receive(
    body: AsyncIterator[bytes], path: Path, *, max_bytes: int, expected_sha256: str | None
) -> ReceivedFile:
    """Write a streamed request body to ``path``, hashing and counting it as it comes.

    Raises UploadRefused past ``max_bytes`` (at once, not after reading it all), or when the
    SHA-256 the sender declared is not the content's.
    """
    digest = hashlib.sha256()
    size = 0
    with path.open("wb") as file:
        async for chunk in body:
            size += len(chunk)
            if size > max_bytes:
                raise UploadRefused(
                    f"upload above {max_bytes} bytes (ADVORCH_MAX_UPLOAD_BYTES)", too_large=True
                )
            digest.update(chunk)
            file.write(chunk)
    sha256 = digest.hexdigest()
    if expected_sha256 is not None and expected_sha256.lower() != sha256:
        raise UploadRefused(
            f"the upload's SHA-256 is {sha256}, not the {expected_sha256} it was sent with: "
            "it was damaged on the way"
        )
    if size == 0:
        raise UploadRefused("the upload is empty")
    return ReceivedFile(path=path, sha256=sha256, size=size)
