"""Block-wise reading and writing of a stitched slice ``(z, y, x)`` for the corrections after stitching."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np

from ..io.omezarr import OmeZarrImage, PyramidWriter, create_ome_zarr_pyramid, open_ome_zarr

__all__ = ["iter_blocks", "write_blocks", "block_size_for", "create_slice_like", "sample_pixels", "open_slice"]

FLOAT_BYTES = 4


def open_slice(path) -> OmeZarrImage:
    """Open a per-slice OME-Zarr (level 0 is what the corrections read)."""
    image = open_ome_zarr(path)
    if image.levels[0].ndim != 3:
        raise ValueError(f"{path}: a slice is 3D (z, y, x), this image has shape {image.levels[0].shape}")
    return image


def block_size_for(shape, budget_bytes: int, copies: int = 4, align: int = 32, smallest: int = 64) -> int:
    """Side of square ``(y, x)`` blocks spanning all depths such that ``copies`` float32 copies fit the budget."""
    depth = shape[0]
    side = int(np.sqrt(max(budget_bytes, 1) / (copies * FLOAT_BYTES * depth)))
    side = max(smallest, side // align * align)
    return min(side, max(shape[1], shape[2]))


def iter_blocks(shape, side: int, halo: int = 0, region: tuple[slice, slice] | None = None,
                ) -> Iterator[tuple[tuple[slice, slice], tuple[slice, slice]]]:
    """Yield ``(core, padded)`` ``(y, x)`` slices: blocks of ``side`` pixels (from the start of ``region``,
    default the whole image) and the same grown by ``halo``."""
    _, ny, nx = shape
    ys, xs = region or (slice(0, ny), slice(0, nx))
    for y0 in range(ys.start, ys.stop, side):
        for x0 in range(xs.start, xs.stop, side):
            y1, x1 = min(y0 + side, ys.stop), min(x0 + side, xs.stop)
            core = (slice(y0, y1), slice(x0, x1))
            padded = (slice(max(0, y0 - halo), min(ny, y1 + halo)), slice(max(0, x0 - halo), min(nx, x1 + halo)))
            yield core, padded


def write_blocks(source_path, block_of, side: int, *args) -> None:
    """``write_region`` of :func:`~napari_soct.processing.slices.write_in_parts` for corrections that work block
    by block: ``args`` are ``([shared,] writer, region, on_block)``; every block of ``side`` pixels in
    ``region`` is ``block_of([shared,] data, core)``, where ``data`` is the source slice's level 0."""
    *shared, writer, region, on_block = args
    data = open_slice(source_path).levels[0]
    for core, _ in iter_blocks(writer.shape, side, region=region):
        writer.write((slice(None), *core), block_of(*shared, data, core))
        on_block()


def create_slice_like(path: Path, source: OmeZarrImage, step: str, depth: int | None = None,
                      extra: dict | None = None, compression: str = "blosc-lz4") -> PyramidWriter:
    """A multiscale slice with the lateral geometry of ``source`` (``depth`` samples, default the same); its
    ``soct`` attributes are the source's (placement, ids) with ``step`` and ``source`` naming this output's
    step and input, plus ``extra``."""
    shape = source.levels[0].shape
    shape = (depth or shape[0], *shape[1:])
    chunks = (shape[0], *(min(256, s) for s in shape[1:]))
    attrs = {"soct": {**source.attributes.get("soct", {}), "step": step, "source": str(source.path),
                      **(extra or {})}}
    return create_ome_zarr_pyramid(path, shape, source.scales_mm[0], chunks=chunks, compression=compression,
                                   name=Path(path).name.split(".")[0], attributes=attrs)


def sample_pixels(array, n_max: int = 200_000, seed: int = 0) -> np.ndarray:
    """A strided sample of A-lines ``(z, n)`` from a slice array, reading about ``n_max`` A-lines at most."""
    _, ny, nx = array.shape
    step = max(1, int(np.ceil(np.sqrt(ny * nx / n_max))))
    rows = np.asarray(array[:, ::step, ::step], dtype=np.float32)
    return rows.reshape(rows.shape[0], -1)
