"""Where Ray Train keeps its own checkpoints (``ADVORCH_STORAGE_URI``), checked when the service
starts rather than when a worker first writes there.

Ray Train takes a folder, or a URI of any filesystem fsspec has (``s3://`` with the
``advorch[s3]`` extra, ``gs://`` with gcsfs, ``file://``), which workers hand to Ray Train as a
pyarrow filesystem (``workers.job_env.JobEnv.ray_storage``). On a cluster of several nodes the
folder must be one every node sees at the same path (NFS), or an object store: Ray refuses a
local ``storage_path`` there as soon as a worker on another node checkpoints, so a plain local
folder there earns a warning at start-up.
"""

from __future__ import annotations

import logging
from pathlib import Path
from urllib.parse import urlparse

import fsspec

log = logging.getLogger(__name__)


class StorageMisconfigured(ValueError):
    """ADVORCH_STORAGE_URI cannot be used: the message says why, in one line."""


def check_storage_uri(uri: str) -> str:
    """``uri`` as Ray Train gets it: an absolute folder, or a URI whose filesystem pyarrow
    has. Raises StorageMisconfigured otherwise."""
    scheme = urlparse(uri).scheme
    if not scheme:
        if not Path(uri).is_absolute():
            raise StorageMisconfigured(
                f"ADVORCH_STORAGE_URI={uri!r} is a relative path; give an absolute folder "
                "(every Ray node resolves it for itself) or a URI such as s3://bucket/prefix"
            )
        return uri
    if scheme == "file" and not Path(urlparse(uri).path).is_absolute():
        raise StorageMisconfigured(f"ADVORCH_STORAGE_URI={uri!r}: a file:// URI needs a path")
    try:
        fsspec.core.url_to_fs(uri)  # no I/O: finds the filesystem the scheme needs
    except (ImportError, ValueError) as err:
        raise StorageMisconfigured(
            f"ADVORCH_STORAGE_URI={uri!r}: no filesystem for {scheme}:// is installed "
            f"({str(err).splitlines()[0]}); for s3:// install advorch[s3]"
        ) from err
    return uri


def is_local(uri: str) -> bool:
    """Whether Ray Train would write ``uri`` to the disk of the node it runs on."""
    return urlparse(uri).scheme in ("", "file")


def warn_if_local_on_a_cluster(uri: str, nodes: int) -> None:
    """Ray's rule: on several nodes a local storage path is refused once a remote worker
    checkpoints. Warn, once, when that is the setup (an NFS folder at the same path on every
    node is fine, and this cannot tell one from a local disk)."""
    if nodes > 1 and is_local(uri):
        log.warning(
            "ADVORCH_STORAGE_URI=%s is a local path and the Ray cluster has %d nodes: Ray Train "
            "refuses a local storage_path on several nodes unless every node sees it at that "
            "path (NFS). Use shared storage or an s3:// or gs:// URI.",
            uri,
            nodes,
        )
