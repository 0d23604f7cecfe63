"""Which kind of model file a file is, read from its zip listing alone (no torch, no unpickling),
so the API can refuse a file that is no model before anything loads it.

    advorch       a checkpoint of ``workers.models.save_checkpoint`` (a ``torch.save`` archive:
                  weights and the meta to rebuild the network by name)
    torch_export  a ``torch.export`` program (``torch.export.save``, usually ``.pt2``): any
                  PyTorch classifier, loadable without its code
"""

from __future__ import annotations

import zipfile
from pathlib import Path
from typing import Literal

ModelFormat = Literal["advorch", "torch_export"]


class NotAModelFile(ValueError):
    """The file is neither an advorch checkpoint nor a torch.export program."""


def model_format(path: str | Path) -> ModelFormat:
    """The format of the model file at ``path``; raises NotAModelFile for anything else."""
    try:
        with zipfile.ZipFile(path) as archive:
            names = archive.namelist()
    except (zipfile.BadZipFile, OSError) as err:
        raise NotAModelFile(f"not a model file (not a PyTorch archive): {err}") from err
    # Both are zip archives with one top-level folder: torch.export's holds archive_format and
    # its program's JSON; torch.save's holds data.pkl.
    if any(name.endswith("/archive_format") for name in names):
        return "torch_export"
    if any(name.endswith("/data.pkl") for name in names):
        return "advorch"
    raise NotAModelFile(
        "not a model file: expected an advorch checkpoint (torch.save) or a torch.export program"
    )
