"""Generic image inputs for steps that work on arrays: an array with its physical scale, opened lazily.

Besides single files, a folder of single-page 2D TIFFs (one file per z plane, in natural name order:
``2.tif`` before ``10.tif``) opens as one lazy 3D volume; see :class:`TiffPages`.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import dask.array as da
import numpy as np
import zarr

from .omezarr import is_ome_zarr, open_ome_zarr

__all__ = ["ImageData", "open_image", "IMAGE_SUFFIXES", "TiffPages", "tiff_plane_files", "is_tiff_plane_folder",
           "natural_sort_key"]

IMAGE_SUFFIXES = (".tif", ".tiff", ".btf", ".zarr", ".npy")
PLANE_SUFFIXES = (".tif", ".tiff")


@dataclass
class ImageData:
    """An image or label array with its physical voxel size.

    Attributes
    ----------
    data : array-like
        numpy, dask or zarr array (kept lazy; steps read it block by block).
    scale : tuple of float
        Voxel size per axis (millimetres for spatial axes; 1 where unknown).
    name : str
    axes : tuple of str, optional
    source : Path, optional
        File or folder it was read from.
    """

    data: object
    scale: tuple[float, ...]
    name: str = ""
    axes: tuple[str, ...] | None = None
    source: Path | None = None
    metadata: dict = field(default_factory=dict)

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.data.shape)

    @property
    def dtype(self) -> np.dtype:
        return np.dtype(self.data.dtype)

    @property
    def ndim(self) -> int:
        return len(self.shape)

    def as_dask(self) -> da.Array:
        """The data as a dask array (zarr chunks kept)."""
        if isinstance(self.data, da.Array):
            return self.data
        chunks = getattr(self.data, "chunks", None)
        if isinstance(chunks, tuple) and chunks and isinstance(chunks[0], int):
            return da.from_array(self.data, chunks=chunks)
        return da.asarray(self.data)


def _is_zarr_array(path: Path) -> bool:
    meta = path / "zarr.json"
    if meta.is_file():
        return json.loads(meta.read_text()).get("node_type") == "array"
    return (path / ".zarray").is_file()


def natural_sort_key(name: str) -> tuple:
    """Sort key putting numbers in numeric order: ``"z2.tif"`` before ``"z10.tif"`` (case-insensitive)."""
    # re.split with a group alternates text and digits, so equal positions always compare like with like.
    parts = re.split(r"(\d+)", name)
    return (tuple(int(p) if i % 2 else p.lower() for i, p in enumerate(parts)), name)


def _visible_entries(folder: Path):
    # Names starting with a dot are hidden files and our own half-written temporaries (atomic outputs).
    with os.scandir(folder) as entries:
        return [e for e in entries if not e.name.startswith(".")]


def tiff_plane_files(folder: str | os.PathLike) -> list[Path]:
    """The ``*.tif``/``*.tiff`` files of a folder (hidden files skipped), in natural name order."""
    folder = Path(folder)
    files = [e.name for e in _visible_entries(folder)
             if e.name.lower().endswith(PLANE_SUFFIXES) and e.is_file()]
    return [folder / n for n in sorted(files, key=natural_sort_key)]


def is_tiff_plane_folder(path: str | os.PathLike) -> bool:
    """Cheap check (one directory listing, no reads) that ``path`` is a folder holding only TIFF files.

    Stricter than :func:`open_image`, which ignores other files: a reader offered every folder must not claim
    one that merely contains a TIFF among other things.
    """
    path = Path(path)
    if not path.is_dir():
        return False
    try:
        entries = _visible_entries(path)
    except OSError:
        return False
    return bool(entries) and all(e.name.lower().endswith(PLANE_SUFFIXES) and e.is_file() for e in entries)


class TiffPages:
    """A TIFF stack, or a folder of single-page 2D TIFFs (one per plane), as a read-only 3D array of pages.

    Slicing reads only the pages asked for (whole pages, then cropped), so it can back a lazy dask array
    or be read directly (no dask overhead per call).

    Parameters
    ----------
    path : path
        A TIFF file, or a folder of ``*.tif``/``*.tiff`` planes in natural name order.
    check_headers : bool
        Folder only: read every file's header (not its pixels) and check that all planes are one 2D page of
        the same shape and dtype. Without it, only the first file is looked at (planes are still checked
        when read).

    Raises
    ------
    ValueError
        Naming the folder or file: no TIFF files, a file that is not one 2D page, planes of different
        shapes or dtypes, an unreadable file.
    """

    def __init__(self, path: str | os.PathLike, check_headers: bool = True):
        import tifffile

        self.path = Path(path)
        if self.path.is_dir():
            self.files = tiff_plane_files(self.path)
            if not self.files:
                empty = "the folder is empty" if not _visible_entries(self.path) else "no *.tif/*.tiff files in it"
                raise ValueError(f"{self.path}: not an OME-Zarr image, a zarr array or a folder of per-plane "
                                 f"TIFFs ({empty})")
            self._tiff = None
            shape, dtype = _plane_header(self.files[0])
            for file in self.files[1:] if check_headers else ():
                other_shape, other_dtype = _plane_header(file)
                if other_shape != shape or other_dtype != dtype:
                    raise ValueError(f"{self.path}: planes differ: {file.name} is {other_shape} {other_dtype}, "
                                     f"{self.files[0].name} is {shape} {dtype}")
            self.shape = (len(self.files), *shape)
            self.dtype = dtype
        else:
            self.files = None
            self._tiff = tifffile.TiffFile(self.path)
            # Page objects are not kept: memory must not grow with the number of slices read.
            self._tiff.pages.cache = False
            self._tiff.pages.useframes = True
            series = self._tiff.series[0]
            self.shape, self.dtype = tuple(series.shape), series.dtype
            self._first_page = series.pages[0].index if hasattr(series.pages[0], "index") else 0
            if len(self.shape) == 2:
                self.shape = (1, *self.shape)
        self.ndim = len(self.shape)

    def _read_plane(self, index: int) -> np.ndarray:
        import tifffile

        if self.files is None:
            return self._tiff.pages[self._first_page + index].asarray()
        file = self.files[index]
        plane = tifffile.imread(file)
        if plane.shape != self.shape[1:] or plane.dtype != self.dtype:
            raise ValueError(f"{file}: plane is {plane.shape} {plane.dtype}, the others "
                             f"{self.shape[1:]} {self.dtype}")
        return plane

    def __getitem__(self, key):
        if not isinstance(key, tuple):
            key = (key,)
        first, rest = key[0], key[1:]
        indices = range(self.shape[0])[first] if isinstance(first, slice) else [first]
        pages = [self._read_plane(i) for i in indices]
        stack = np.stack(pages) if pages else np.empty((0, *self.shape[1:]), self.dtype)
        stack = stack[(slice(None), *rest)]
        return stack if isinstance(first, slice) else stack[0]

    def __len__(self) -> int:
        return self.shape[0]

    def close(self) -> None:
        if self._tiff is not None:
            self._tiff.close()


def _plane_header(file: Path) -> tuple[tuple[int, ...], np.dtype]:
    """Shape and dtype of a single-page 2D TIFF from its header (no pixels read)."""
    import tifffile

    try:
        with tifffile.TiffFile(file) as tif:
            n_pages = len(tif.pages)
            page = tif.pages.first
            shape, dtype = tuple(int(s) for s in page.shape), np.dtype(page.dtype)
    except (tifffile.TiffFileError, ValueError, OSError) as err:
        raise ValueError(f"{file}: cannot read as TIFF ({err})") from None
    if n_pages != 1 or len(shape) != 2:
        raise ValueError(f"{file}: a folder of per-plane TIFFs needs one 2D page per file; this one has "
                         f"{n_pages} page(s) of shape {shape}")
    return shape, dtype


def _open_tiff_planes(folder: Path, name: str) -> ImageData:
    from dask.base import tokenize

    pages = TiffPages(folder)
    # The name identifies the files and their versions, so dask never mixes two different folders' blocks.
    stats = [(f.name, f.stat().st_mtime_ns, f.stat().st_size) for f in pages.files]
    data = da.from_array(pages, chunks=(1, *pages.shape[1:]), name=f"tiff-planes-{tokenize(str(folder), stats)}",
                         meta=np.empty((0,) * pages.ndim, pages.dtype))
    return ImageData(data, (1.0,) * 3, name, None, folder)


def open_image(path: str | os.PathLike) -> ImageData:
    """Open an image lazily: OME-Zarr (level 0), a plain zarr array, TIFF/BigTIFF, ``.npy`` (memory-mapped),
    or a folder of single-page 2D TIFFs (one per z plane, natural name order; one dask chunk per plane).

    Raises
    ------
    FileNotFoundError
        If ``path`` does not exist.
    ValueError
        If the format is not one of those, or the planes of a TIFF folder differ in shape or dtype, naming
        the path.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such file or folder")
    name = path.name.split(".")[0]
    if path.is_dir():
        if is_ome_zarr(path):
            image = open_ome_zarr(path)
            return ImageData(image.as_dask(0), image.scales_mm[0], name, image.axes, path, image.attributes)
        if _is_zarr_array(path):
            arr = zarr.open_array(str(path), mode="r")
            return ImageData(da.from_zarr(arr), (1.0,) * arr.ndim, name, None, path)
        return _open_tiff_planes(path, path.name)
    suffix = path.suffix.lower()
    if suffix in (".tif", ".tiff", ".btf"):
        import tifffile

        try:
            store = tifffile.imread(path, aszarr=True)
        except (tifffile.TiffFileError, ValueError) as err:
            raise ValueError(f"{path}: cannot read as TIFF ({err})") from None
        arr = zarr.open(store, mode="r")
        if isinstance(arr, zarr.Group):  # pyramidal TIFF: level 0
            arr = arr["0"]
        return ImageData(da.from_zarr(arr), (1.0,) * arr.ndim, name, None, path)
    if suffix == ".npy":
        arr = np.load(path, mmap_mode="r")
        return ImageData(arr, (1.0,) * arr.ndim, name, None, path)
    raise ValueError(f"{path}: unsupported image format (use OME-Zarr, zarr, TIFF, .npy or a folder of per-plane "
                     "TIFFs)")
