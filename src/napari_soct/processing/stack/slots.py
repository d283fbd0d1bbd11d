"""Which slice file fills each slot of the stack: common-space slices, interpolated slots, exclusions."""

from __future__ import annotations

import os
from pathlib import Path

from ..io.tables import read_slice_config
from ..slices import find_slice_files

__all__ = ["assembly_slices", "excluded_slice_ids"]


def excluded_slice_ids(slice_config: str | os.PathLike | None) -> set[int]:
    """Slices marked ``use=false`` or ``auto_excluded`` in a ``slice_config.csv`` (empty/None: none)."""
    if not slice_config:
        return set()
    return {r.slice_id for r in read_slice_config(slice_config) if not r.use or r.auto_excluded}


def assembly_slices(common_dir: str | os.PathLike, interpolated_dir: str | os.PathLike | None = "",
                    slice_config: str | os.PathLike | None = "") -> dict[int, Path]:
    """Slice files to assemble, by slice id.

    Common-space slices, minus the excluded ones (``slice_config``), plus interpolated slots from
    ``interpolated_dir`` (they fill a gap or replace an excluded slice).
    """
    files = find_slice_files(common_dir)
    excluded = excluded_slice_ids(slice_config)
    used = {sid: p for sid, p in files.items() if sid not in excluded}
    if interpolated_dir:
        folder = Path(interpolated_dir)
        if not folder.is_dir():
            raise ValueError(f"parameter 'interpolated_dir': {folder} is not a folder")
        # An interpolation folder may hold no slice at all (no gap, or every gate failed).
        if any(e.name.endswith(".ome.zarr") for e in folder.iterdir()):
            used.update(find_slice_files(folder))
    return dict(sorted(used.items()))
