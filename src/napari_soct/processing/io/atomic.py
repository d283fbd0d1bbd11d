"""Atomic outputs: write under a temporary name next to the target, rename when complete."""

from __future__ import annotations

import contextlib
import os
import shutil
import re
import uuid
from pathlib import Path

__all__ = [
    "OutputExistsError", "atomic_output", "check_can_write", "IF_EXISTS_CHOICES", "output_name",
    "remove_stale_temporaries",
]

IF_EXISTS_CHOICES = ("error", "skip", "overwrite")


class OutputExistsError(FileExistsError):
    """A result already exists and the caller did not ask to overwrite or skip it."""


def check_can_write(path: str | os.PathLike, if_exists: str) -> bool:
    """Decide what to do with an output path.

    Returns
    -------
    bool
        True when the output must be (re)written, False when an existing one is kept (``if_exists="skip"``).

    Raises
    ------
    OutputExistsError
        If the path exists and ``if_exists == "error"``.
    """
    if if_exists not in IF_EXISTS_CHOICES:
        raise ValueError(f"if_exists must be one of {IF_EXISTS_CHOICES}, got {if_exists!r}")
    path = Path(path)
    if not path.exists():
        return True
    if if_exists == "skip":
        return False
    if if_exists == "error":
        raise OutputExistsError(
            f"{path}: already exists; choose another output folder, or pass if_exists='overwrite' "
            "(CLI: --if-exists overwrite) to replace it or 'skip' to keep it"
        )
    return True


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


@contextlib.contextmanager
def atomic_output(path: str | os.PathLike, if_exists: str = "error"):
    """Context manager yielding a temporary path that becomes ``path`` when the block succeeds.

    The temporary sits in the same folder (same file system, so the final rename is atomic) and starts with
    a dot, so readers never see a half-written result. On error it is removed and ``path`` is untouched.

    Examples
    --------
    >>> with atomic_output(out / "result.ome.zarr") as tmp:   # doctest: +SKIP
    ...     write_zarr(tmp)
    """
    path = Path(path)
    check_can_write(path, "overwrite" if if_exists == "skip" else if_exists)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex[:8]}")
    try:
        yield tmp
    except BaseException:
        _remove(tmp)
        raise
    if path.exists():
        # Overwrite requested: move the old result aside first so a crash never leaves neither.
        old = path.with_name(f".{path.name}.old-{uuid.uuid4().hex[:8]}")
        os.replace(path, old)
        os.replace(tmp, path)
        _remove(old)
    else:
        os.replace(tmp, path)


_LEFTOVER = re.compile(r"^\.(?P<name>.+)\.(?P<kind>tmp|old)-[0-9a-f]{8}$")


def output_name(path: str | os.PathLike) -> str:
    """The name ``path`` will have once complete: that of the final output for a temporary of
    :func:`atomic_output` (which files record as their own name), else the path's name."""
    name = Path(path).name
    match = _LEFTOVER.match(name)
    return match.group("name") if match else name


def remove_stale_temporaries(folder: str | os.PathLike) -> list[Path]:
    """Clean what a killed process left in ``folder`` (not recursively): half-written temporaries are removed;
    a result moved aside by an interrupted overwrite is put back when its replacement never arrived.

    Only call this when no other process writes into ``folder``. Returns the paths removed or restored.
    """
    folder = Path(folder)
    if not folder.is_dir():
        return []
    cleaned = []
    for entry in sorted(folder.iterdir()):
        match = _LEFTOVER.match(entry.name)
        if not match:
            continue
        final = folder / match.group("name")
        if match.group("kind") == "old" and not final.exists():
            os.replace(entry, final)
        else:
            _remove(entry)
        cleaned.append(entry)
    return cleaned
