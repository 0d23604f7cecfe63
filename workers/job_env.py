"""What a job's processes on Ray are told by the service: the whole of what workers know of it.

The dispatcher puts a ``JobEnv`` into the Ray Job's ``runtime_env`` as environment variables;
every process of the job (the entrypoint, each Tune trial, each Ray Train worker) inherits them
and reads them back with ``JobEnv.from_environ()``. The service builds one without
importing Ray Tune or torch.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass, fields
from pathlib import Path
from urllib.parse import urlparse

import fsspec
import pyarrow.fs

# The environment variable of each field.
ENV_VARS: dict[str, str] = {
    "job_id": "ADVORCH_JOB_ID",
    "service_url": "ADVORCH_SERVICE_URL",
    "worker_token": "ADVORCH_WORKER_TOKEN",
    "spec_json": "ADVORCH_JOB_SPEC",
    "storage_uri": "ADVORCH_STORAGE_URI",
    "data_dir": "ADVORCH_DATA_DIR",
    "node_wait_s": "ADVORCH_NODE_WAIT_S",
}


@dataclass(frozen=True)
class JobEnv:
    job_id: str
    # Where the internal routes are (the service's public URL).
    service_url: str
    # The job-scoped token that opens this job's internal routes, and only them.
    worker_token: str
    # The JobSpec as the user submitted it (JobSpec.submitted()), as JSON: each trial resolves
    # its own defaults from it.
    spec_json: str
    # Where Ray Train and Tune keep their runs and resume checkpoints: a folder (shared on a
    # cluster) or a URI Ray's storage takes (s3://...).
    storage_uri: str
    # Where data sets such as cifar-10-batches-py live.
    data_dir: str
    # How long a trial to be run again after its node was lost waits for a live node with the
    # resources it asks for, before the sweep fails it (workers.sweep.FailWhereNoNodeFits).
    node_wait_s: float

    def as_env_vars(self) -> dict[str, str]:
        return {ENV_VARS[f.name]: str(getattr(self, f.name)) for f in fields(self)}

    @classmethod
    def from_environ(cls, environ: Mapping[str, str] = os.environ) -> JobEnv:
        missing = [name for name in ENV_VARS.values() if name not in environ]
        if missing:
            raise RuntimeError(f"not started by the advorch dispatcher: {', '.join(missing)} unset")
        text = {field: environ[name] for field, name in ENV_VARS.items()}
        node_wait_s = float(text.pop("node_wait_s"))
        return cls(**text, node_wait_s=node_wait_s)

    def scratch_dir(self, trial_key: str) -> Path:
        """A folder of this node's own for a trial's working files (AutoAttack's state, an
        evaluate job's model): it outlives the trial's process, so a restart on the same node
        finds what the last run left there."""
        return Path(tempfile.gettempdir()) / "advorch" / self.job_id / trial_key

    def ray_storage(self) -> tuple[str, pyarrow.fs.FileSystem | None]:
        """Where Ray Tune and Ray Train keep this job's runs (Train's resume checkpoints), as
        their ``storage_path`` and ``storage_filesystem``: a folder as it is, or a URI through
        the fsspec filesystem of its scheme (s3fs for s3://), wrapped for pyarrow, so any
        store fsspec knows works whatever pyarrow was built with."""
        uri = f"{self.storage_uri.rstrip('/')}/{self.job_id}/ray"
        if urlparse(uri).scheme in ("", "file"):
            return uri, None
        filesystem, path = fsspec.core.url_to_fs(uri)
        return path, pyarrow.fs.PyFileSystem(pyarrow.fs.FSSpecHandler(filesystem))
