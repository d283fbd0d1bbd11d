"""Output of label resampling: sharded OME-Zarr (zarr v3, our own shard encoder) and tiled BigTIFF.

zarr-python creates the metadata (``zarr.json``) and reads the result; the shards are written here. A shard file
is the inner chunks, each encoded with the array's codecs (``bytes`` little endian then zstd or blosc), one
after the other, followed by the shard index (offset and length of every inner chunk, ``2**64 - 1`` twice for
an empty one, little-endian uint64) and its crc32c, as the zarr v3 sharding codec specifies. Encoding here lets
each worker stream a shard chunk by chunk: memory does not depend on the shard size, chunks that are all
background are left out, and a chunk of one label is encoded once per label value.
"""

from __future__ import annotations

import math
import os
import threading
from pathlib import Path

import numpy as np
import zarr

__all__ = ["ZARR_COMPRESSIONS", "TIFF_COMPRESSIONS", "ChunkEncoder", "create_label_pyramid", "write_shard"]

ZARR_COMPRESSIONS = ("blosc", "blosc-lz4", "zstd", "none")
TIFF_COMPRESSIONS = ("zstd", "zlib", "none")
_EMPTY = np.uint64(2**64 - 1)


class ChunkEncoder:
    """Encodes one chunk (a C-contiguous little-endian array) to bytes; caches chunks of one label value.

    The cache holds at most ``cache_bytes`` of encoded chunks (uncompressed constant chunks are not cached).
    """

    def __init__(self, compression: str, dtype, *, tiff: bool = False, cache_bytes: int = 16 << 20):
        import imagecodecs

        self.compression, self.dtype = compression, np.dtype(dtype)
        if compression == "zstd":
            self._encode = lambda a: imagecodecs.zstd_encode(a, level=1, out=self._out(a.nbytes))
        elif compression in ("blosc", "blosc-lz4") and not tiff:
            # No shuffle: label chunks are long runs of one value, which blosclz and lz4 find directly; byte
            # shuffling breaks the runs up (measured: blosclz 5 GB/s per core at ratio ~190 on upscaled atlas
            # chunks, lz4 3.5 GB/s at ~100, zstd level 1 2.5 GB/s at ~400).
            itemsize, cname = self.dtype.itemsize, "blosclz" if compression == "blosc" else "lz4"
            self._encode = lambda a: imagecodecs.blosc_encode(a, level=5, compressor=cname, typesize=itemsize,
                                                              shuffle=0, numthreads=1, out=self._out(a.nbytes))
        elif compression == "zlib" and tiff:
            self._encode = lambda a: imagecodecs.zlib_encode(a, level=1)
        elif compression == "none":
            self._encode = lambda a: a.tobytes()
        else:
            allowed = TIFF_COMPRESSIONS if tiff else ZARR_COMPRESSIONS
            raise ValueError(f"compression must be one of {allowed} for this format, got {compression!r}")
        self._constant: dict[tuple, bytes] = {}
        self._cache_bytes, self._cached = cache_bytes, 0
        self._lock = threading.Lock()

    _local = threading.local()

    @classmethod
    def _out(cls, nbytes: int) -> bytearray:
        """A per-thread output buffer larger than any encoding of ``nbytes`` (no 1 MiB allocation per chunk)."""
        size = nbytes + nbytes // 64 + 4096
        buf = getattr(cls._local, "buffer", None)
        if buf is None or len(buf) < size:
            cls._local.buffer = buf = bytearray(size)
        return buf

    def encode(self, chunk: np.ndarray) -> bytes:
        return bytes(self._encode(np.ascontiguousarray(chunk).astype(self.dtype.newbyteorder("<"), copy=False)))

    def constant(self, value, shape: tuple[int, ...]) -> bytes:
        """Encoded bytes of a chunk filled with ``value`` (computed once per value and shape)."""
        key = (int(value), shape)
        found = self._constant.get(key)
        if found is None:
            found = self.encode(np.full(shape, value, self.dtype))
            if self.compression != "none" and len(found) <= self._cache_bytes // 256:
                with self._lock:
                    if self._cached + len(found) > self._cache_bytes:
                        self._constant.clear()
                        self._cached = 0
                    self._constant[key] = found
                    self._cached += len(found)
        return found


def _codecs_for(compression: str, dtype):
    if compression == "zstd":
        return [zarr.codecs.ZstdCodec(level=1)]
    if compression in ("blosc", "blosc-lz4"):
        cname = "blosclz" if compression == "blosc" else "lz4"
        return [zarr.codecs.BloscCodec(cname=cname, clevel=5, shuffle="noshuffle", typesize=np.dtype(dtype).itemsize)]
    if compression == "none":
        return None
    raise ValueError(f"compression must be one of {ZARR_COMPRESSIONS}, got {compression!r}")


def create_label_pyramid(path, levels, scale: tuple[float, ...], dtype, compression: str, *, name: str,
                         attributes: dict | None = None, axes: tuple[str, ...] = ("z", "y", "x")) -> list[Path]:
    """Create an NGFF 0.5 label image group with one empty sharded array per level; return the array folders.

    Level ``k`` has voxel size ``scale * factor_k`` and a translation of ``scale * (factor_k - 1) / 2`` (its
    voxel centres sit at the centres of the level-0 blocks it summarises).
    """
    path = Path(path)
    group = zarr.open_group(str(path), mode="w", zarr_format=3)
    datasets = []
    for k, level in enumerate(levels):
        transforms = [{"type": "scale", "scale": [float(s * f) for s, f in zip(scale, level.factor)]}]
        if any(f > 1 for f in level.factor):
            transforms.append({"type": "translation",
                               "translation": [float(s * (f - 1) / 2) for s, f in zip(scale, level.factor)]})
        datasets.append({"path": str(k), "coordinateTransformations": transforms})
        group.create_array(
            str(k), shape=level.shape, chunks=level.chunks, shards=level.shards, dtype=dtype,
            compressors=_codecs_for(compression, dtype), fill_value=0, dimension_names=list(axes),
        )
    ome = {
        "version": "0.5",
        "multiscales": [{"name": name, "axes": [{"name": a, "type": "space", "unit": "millimeter"} for a in axes],
                         "datasets": datasets}],
        "image-label": {"version": "0.5"},
    }
    group.attrs.update({"ome": ome, **(attributes or {})})
    return [path / str(k) for k in range(len(levels))]


def write_shard(array_dir: Path, shard_index: tuple[int, ...], chunks_per_shard: tuple[int, ...], encoded) -> int:
    """Write one shard file from ``encoded``: an iterable of ``(inner chunk index, bytes or None)``.

    Chunks are appended to the file as they come (memory holds one chunk); ``None`` marks an empty chunk
    (all fill value). No file is written when every chunk is empty. Returns the bytes written.
    """
    import google_crc32c

    index = np.full(tuple(chunks_per_shard) + (2,), _EMPTY, dtype="<u8")
    path = Path(array_dir, "c", *map(str, shard_index))
    offset = 0
    handle = None
    try:
        for inner, data in encoded:
            if data is None:
                continue
            if handle is None:
                path.parent.mkdir(parents=True, exist_ok=True)
                handle = open(path, "wb", buffering=1 << 20)
            handle.write(data)
            index[inner] = (offset, len(data))
            offset += len(data)
        if handle is None:
            return 0
        raw = index.tobytes()
        handle.write(raw)
        handle.write(np.uint32(google_crc32c.value(raw)).astype("<u4").tobytes())
        return offset + len(raw) + 4
    finally:
        if handle is not None:
            handle.close()


def tiff_tile_size(shape: tuple[int, ...]) -> int:
    """Square TIFF tile edge: a multiple of 16, 512 at most, no larger than the plane needs."""
    edge = max(shape[-2:])
    return int(min(512, max(16, 16 * math.ceil(edge / 16))))


def disk_free_bytes(path) -> int:
    """Free bytes on the file system holding ``path`` (or its nearest existing parent)."""
    path = Path(path).absolute()
    while not path.exists():
        path = path.parent
    st = os.statvfs(path)
    return st.f_bavail * st.f_frsize
