"""The label resampling step: upscale (or downscale) a label volume block by block to OME-Zarr or BigTIFF."""

from __future__ import annotations

import contextlib
import json
import math
import threading
import time
from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np

from ..io.atomic import IF_EXISTS_CHOICES, atomic_output, check_can_write
from ..io.images import ImageData, open_image
from ..memory import return_large_buffers_to_os
from ..params import param, validate_params
from ..progress import Cancelled, Progress, ProgressCallback
from .mapping import ALIGN_CHOICES, LevelGeometry, pyramid_geometry, resolve_target
from .resample import LABEL_DTYPES, MODE_BATCH_ENTRIES, LabelMap, parse_label_ids, read_relabel_csv, resample_block
from .sources import SourceSpec, open_source
from .writers import (
    ChunkEncoder,
    create_label_pyramid,
    disk_free_bytes,
    tiff_tile_size,
    write_shard,
)

__all__ = ["UpscaleParams", "UpscaleResult", "upscale_labels"]

GIB = 1024**3
FORMAT_CHOICES = ("auto", "ome-zarr", "bigtiff")
COMPRESSION_CHOICES = ("auto", "blosc", "blosc-lz4", "zstd", "zlib", "none")
_TIFF_SUFFIXES = (".tif", ".tiff", ".btf")


@dataclass
class UpscaleParams:
    """Parameters of the label upscaling step. Exactly one of ``factors``, ``shape``, ``like`` sets the target."""

    factors: str = param("", "Scale factor per axis 'Z,Y,X' (or one for all), e.g. '2,2,2.5'; below 1 downscales")
    shape: str = param("", "Output shape 'Z,Y,X'")
    like: str = param("", "Reference image (OME-Zarr, zarr, TIFF) whose grid, shape and voxel size, to match")
    out_scale: str = param("", "Output voxel size 'Z,Y,X' in mm; empty derives it from the input (or --like)",
                           unit="mm", advanced=True)
    align: str = param("extent", "'extent': output and labels cover the same field of view (centres aligned); "
                       "'scale': ratio from the voxel sizes, origins aligned", choices=ALIGN_CHOICES, advanced=True)
    method: str = param("nearest", "'nearest': label at each output voxel centre; 'mode': label covering most of "
                        "each output voxel (for downscaling)", choices=("nearest", "mode"))
    keep_labels: str = param("", "Label ids to keep ('1,5,7' or a file with one id per line); others become 0")
    relabel: str = param("", "CSV file of 'old,new' label ids to replace (applied after keep_labels)")
    dtype: str = param("same", "Output integer type ('same' keeps the input's)", choices=("same", *LABEL_DTYPES),
                       advanced=True)
    format: str = param("auto", "Output format; 'auto' picks BigTIFF for .tif/.tiff/.btf, else OME-Zarr",
                        choices=FORMAT_CHOICES)
    compression: str = param("auto", "Compression: 'auto' is blosc for OME-Zarr, zstd for BigTIFF; blosc "
                             "(blosclz, fastest) and blosc-lz4 are OME-Zarr only, zlib BigTIFF only; zstd is level 1 "
                             "(smallest files)", choices=COMPRESSION_CHOICES)
    pyramid: str = param("nearest", "OME-Zarr pyramid levels by 'nearest' (centre label) or 'mode' "
                         "downsampling, or 'none'", choices=("nearest", "mode", "none"))
    pyramid_levels: int = param(-1, "Pyramid levels below full resolution; -1 adds 2x levels until the largest "
                                "axis is at most 4 chunks", min=-1, max=32, advanced=True)
    chunk_size: int = param(64, "OME-Zarr chunk edge in voxels", min=8, max=2048, unit="voxels", advanced=True)
    shard_size: int = param(512, "OME-Zarr shard edge in voxels (a multiple of chunk_size; one file each)",
                            min=8, max=16384, unit="voxels", advanced=True)
    workers: int = param(2, "Blocks processed in parallel (threads; at most)", min=1, max=256)
    dask_scheduler: str = param("", "Address of a dask scheduler (e.g. tcp://host:8786) to run the OME-Zarr blocks "
                                "on; its workers must see the input and output paths. Empty: threads here",
                                advanced=True)
    memory_budget_gb: float = param(1.0, "Peak memory the step may use, in GiB", min=1e-3, unit="GiB")
    if_exists: str = param(
        "error", "Existing output: 'error' refuses, 'skip' keeps it, 'overwrite' replaces it", choices=IF_EXISTS_CHOICES
    )


@dataclass
class UpscaleResult:
    """What :func:`upscale_labels` wrote."""

    path: Path
    format: str
    shape: tuple[int, ...]
    dtype: str
    scale_mm: tuple[float, ...]
    level_shapes: list[tuple[int, ...]]
    metrics_path: Path | None
    skipped: bool = False
    seconds: float = 0.0
    voxels_written: int = 0
    bytes_on_disk: int = 0
    workers_used: int = 1
    chunks_encoded: int = 0
    chunks_constant: int = 0
    peak_memory_estimate_bytes: int = 0
    notes: list[str] = field(default_factory=list)

    @property
    def uncompressed_bytes(self) -> int:
        """Size of the full-resolution output uncompressed."""
        return math.prod(self.shape) * np.dtype(self.dtype).itemsize


# ----------------------------------------------------------------------------------------------- shard tasks


@dataclass
class _Job:
    """Everything a block task needs; picklable so dask workers can run it."""

    source: SourceSpec
    label_map: LabelMap
    levels: list[LevelGeometry]
    methods: list[str]
    array_dirs: list[Path]
    compression: str
    read_budget: int


_ENCODERS: dict[tuple, ChunkEncoder] = {}
_LOCAL = threading.local()


def _encoder(compression: str, dtype, tiff: bool = False) -> ChunkEncoder:
    key = (compression, np.dtype(dtype).str, tiff)
    if key not in _ENCODERS:
        _ENCODERS[key] = ChunkEncoder(compression, dtype, tiff=tiff)
    return _ENCODERS[key]


def _buffer(shape, dtype) -> np.ndarray:
    """A per-thread output buffer, reused from chunk to chunk."""
    key = (tuple(shape), np.dtype(dtype).str)
    buffers = getattr(_LOCAL, "buffers", None)
    if buffers is None or key not in buffers:
        _LOCAL.buffers = buffers = {key: np.empty(shape, dtype)}
    return buffers[key]


def _read_cost(n_voxels: int, src_itemsize: int, out_itemsize: int, mapped: bool) -> int:
    """Bytes held while a source box is read and relabelled (np.unique sorts and keeps int64 inverses)."""
    return n_voxels * (src_itemsize + (2 * src_itemsize + 8 + out_itemsize if mapped else 0))


def _source_box(level: LevelGeometry, box, method: str):
    return tuple(axis.source_range(a, b, method) for axis, (a, b) in zip(level.axes, box))


def _read_mapped(job: _Job, src_box) -> np.ndarray:
    return job.label_map(job.source.read(src_box))


def _chunk_boxes(level: LevelGeometry, box):
    """Per chunk row along the first axis: the row box and ``(inner index, chunk box)`` of its chunks."""
    chunks = level.chunks
    per_shard = tuple(s // c for s, c in zip(level.shards, chunks))
    for r in range(per_shard[0]):
        a0 = box[0][0] + r * chunks[0]
        if a0 >= box[0][1]:
            return
        row = ((a0, min(a0 + chunks[0], box[0][1])),) + tuple(box[1:])
        inner = []
        for idx in np.ndindex(*per_shard[1:]):
            cbox = [row[0]]
            for axis, i in enumerate(idx, start=1):
                start = box[axis][0] + i * chunks[axis]
                if start >= box[axis][1]:
                    break
                cbox.append((start, min(start + chunks[axis], box[axis][1])))
            else:
                inner.append(((r, *idx), tuple(cbox)))
        yield row, inner


def _shard_task(job: _Job, level_index: int, shard_index: tuple[int, ...], box, stop=None) -> dict:
    """Resample, encode and write one shard of one level; returns counts for the metrics."""
    level = job.levels[level_index]
    method = job.methods[level_index]
    encoder = _encoder(job.compression, job.label_map.dtype)
    out = _buffer(level.chunks, job.label_map.dtype)
    stats = {"constant": 0, "encoded": 0}
    itemsizes = (job.source.dtype.itemsize, job.label_map.dtype.itemsize, not job.label_map.identity)

    def encoded():
        for row, inner in _chunk_boxes(level, box):
            if stop is not None and stop():
                raise Cancelled("cancelled by the user")
            row_src = _source_box(level, row, method)
            src, origin = None, None
            if _read_cost(math.prod(b - a for a, b in row_src), *itemsizes) <= job.read_budget:
                src, origin = _read_mapped(job, row_src), tuple(a for a, _ in row_src)
            for inner_index, cbox in inner:
                c_src = _source_box(level, cbox, method)
                if src is None:
                    block, b_origin = _read_mapped(job, c_src), tuple(a for a, _ in c_src)
                else:
                    block, b_origin = src, origin
                sub = block[tuple(slice(a - o, b - o) for (a, b), o in zip(c_src, b_origin))]
                low, high = sub.min(), sub.max()
                if low == high:  # one label: the chunk is that label (no chunk at all for background)
                    stats["constant"] += 1
                    yield inner_index, (None if low == 0 else encoder.constant(low, level.chunks))
                    continue
                resample_block(block, b_origin, level.axes, cbox, method, out=out)
                stats["encoded"] += 1
                yield inner_index, encoder.encode(out)

    per_shard = tuple(s // c for s, c in zip(level.shards, level.chunks))
    nbytes = write_shard(job.array_dirs[level_index], shard_index, per_shard, encoded())
    voxels = math.prod(b - a for a, b in box)
    return {"voxels": voxels, "bytes": nbytes, **stats}


# ----------------------------------------------------------------------------------------------- BigTIFF


def _write_bigtiff(job: _Job, path: Path, scale, workers: int, tracker: Progress, stop) -> dict:
    """Tiled BigTIFF, one page per z plane; tiles encoded in threads, a repeated plane reuses its tiles."""
    import tifffile

    level = job.levels[0]
    method = job.methods[0]
    shape = level.shape
    planar = len(shape) == 2
    axes = level.axes if not planar else (None, *level.axes)
    tile = tiff_tile_size(shape)
    out_dtype = job.label_map.dtype
    encoder = _encoder(job.compression, out_dtype, tiff=True)
    n_planes = 1 if planar else shape[0]
    ny, nx = shape[-2:]
    tiles = [((y, min(y + tile, ny)), (x, min(x + tile, nx))) for y in range(0, ny, tile) for x in range(0, nx, tile)]
    stats = {"constant": 0, "encoded": 0}
    stats_lock = threading.Lock()
    cache_limit = job.read_budget

    def plane_key(z):
        if planar:
            return 0
        if method == "nearest":
            return int(axes[0].nearest(z, z + 1)[0])
        idx, w = axes[0].covering(z, z + 1)
        return (tuple(idx[0]), tuple(w[0]))

    def encode_tile(src, origin, z, ybox, xbox):
        buf = _buffer((1, tile, tile) if not planar else (tile, tile), out_dtype)
        box = ((ybox, xbox) if planar else ((z, z + 1), ybox, xbox))
        src_box = tuple(ax.source_range(a, b, method) for ax, (a, b) in zip(level.axes, box))
        sub = src[tuple(slice(a - o, b - o) for (a, b), o in zip(src_box, origin))]
        low, high = sub.min(), sub.max()
        constant = low == high
        with stats_lock:
            stats["constant" if constant else "encoded"] += 1
        if constant:
            return encoder.constant(low, buf.shape)
        resample_block(src, origin, level.axes, box, method, out=buf)
        return encoder.encode(buf)

    def planes(pool):
        previous_key, previous_tiles = None, None
        for z in range(n_planes):
            if stop():
                raise Cancelled("cancelled by the user")
            key = plane_key(z)
            if key == previous_key and previous_tiles is not None:
                yield from previous_tiles
                tracker.advance(ny * nx, f"plane {z + 1}/{n_planes} (repeated)")
                continue
            box = ((0, ny), (0, nx)) if planar else ((z, z + 1), (0, ny), (0, nx))
            src_box = tuple(ax.source_range(a, b, method) for ax, (a, b) in zip(level.axes, box))
            src, origin = _read_mapped(job, src_box), tuple(a for a, _ in src_box)
            encoded, held = [], 0
            for i in range(0, len(tiles), 4 * workers):
                batch = [pool.submit(encode_tile, src, origin, z, yb, xb) for yb, xb in tiles[i : i + 4 * workers]]
                for future in batch:
                    data = future.result()
                    held += len(data)
                    if held <= cache_limit:
                        encoded.append(data)
                    yield data
            previous_key, previous_tiles = key, (encoded if held <= cache_limit else None)
            tracker.advance(ny * nx, f"plane {z + 1}/{n_planes}")

    compression = {"zstd": "zstd", "zlib": "zlib", "none": None}[job.compression]
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="soct-upscale-tiff") as pool:
        with tifffile.TiffWriter(path, bigtiff=True) as tw:
            tw.write(planes(pool), shape=shape, dtype=out_dtype, tile=(tile, tile), compression=compression,
                     photometric="minisblack", metadata={"axes": "YX" if planar else "ZYX",
                                                         "scale_mm": [float(s) for s in scale]})
    return stats


# ----------------------------------------------------------------------------------------------- the step


class _StopFlag:
    def __init__(self, cancel=None):
        self.event = threading.Event()
        self._cancel = cancel

    def is_set(self) -> bool:
        return self.event.is_set() or (self._cancel is not None and self._cancel.is_set())


def _as_image(labels) -> ImageData:
    if isinstance(labels, ImageData):
        return labels
    if isinstance(labels, str | Path):
        return open_image(labels)
    return ImageData(labels, (1.0,) * np.ndim(labels), "labels")


def _out_format(path: Path, fmt: str) -> str:
    if fmt != "auto":
        return fmt
    return "bigtiff" if path.suffix.lower() in _TIFF_SUFFIXES else "ome-zarr"


def _metrics_path(out: Path) -> Path:
    stem = out.name
    for suffix in (".ome.zarr", ".zarr", ".ome.tiff", ".ome.tif", ".tiff", ".tif", ".btf"):
        if stem.lower().endswith(suffix):
            stem = stem[: -len(suffix)]
            break
    return out.with_name(f"{stem}_upscale_metrics.json")


def _per_worker_bytes(levels, methods, src_itemsize: int, out_itemsize: int, mapped: bool, read_budget: int) -> int:
    """Upper bound of what one worker holds: a source box, a chunk, gather temporaries and mode batches."""
    need = 0
    for level, method in zip(levels, methods):
        chunk_bytes = math.prod(level.chunks) * out_itemsize
        # Smallest source box a task reads: one chunk's.
        src_chunk = math.prod(min(a.n_in, math.ceil(c * a.ratio) + 2) for a, c in zip(level.axes, level.chunks))
        read = _read_cost(src_chunk, src_itemsize, out_itemsize, mapped)
        mode = MODE_BATCH_ENTRIES * 96 if method == "mode" else 0
        need = max(need, read, 3 * chunk_bytes + mode)
    return need + read_budget


def upscale_labels(
    labels,
    out,
    params: UpscaleParams | None = None,
    *,
    progress: ProgressCallback | None = None,
    cancel=None,
    client=None,
    keep_labels=None,
    relabel: dict | None = None,
    **overrides,
) -> UpscaleResult:
    """Resample a label volume to a finer (or coarser) grid, block by block, keeping every label id exact.

    Parameters
    ----------
    labels : ImageData, path or array
        Integer label volume (2-D or 3-D): a napari layer's data, an ``ImageData`` from ``open_image``, a path
        (OME-Zarr, zarr, TIFF/BigTIFF, .npy) or an array (numpy, zarr, dask).
    out : path
        ``.ome.zarr`` folder (zarr v3, sharded, with a label pyramid) or ``.tif`` BigTIFF file.
    params : UpscaleParams, optional
        Step parameters; keyword ``overrides`` replace single fields.
    progress : callable, optional
        ``progress(done, total, message)`` in output voxels.
    cancel : threading.Event, optional
        Set it to stop; the partial output is removed and ``Cancelled`` is raised.
    client : distributed.Client, optional
        Run the OME-Zarr blocks on this dask cluster (workers must see the input file and the output folder);
        ``params.dask_scheduler`` (an address) does the same from the command line.
    keep_labels : iterable of int or str, optional
        Label ids to keep (overrides ``params.keep_labels``; a string is parsed like it); every other id becomes 0.
    relabel : dict or path, optional
        ``{old: new}`` or a CSV file of ``old,new`` rows (overrides ``params.relabel``).

    Returns
    -------
    UpscaleResult

    Notes
    -----
    Output voxel ``j`` of an axis takes the label of source voxel ``floor((j + 1/2) * n_in / n_out)`` (nearest;
    exact integer arithmetic, see :mod:`~napari_soct.processing.upscale.mapping`). Each task writes whole
    shards, streaming them chunk by chunk; a task holds one source box and one chunk, so peak memory is bounded
    by ``memory_budget_gb`` whatever the output size. Pyramid levels are resampled from the source directly
    (the input is read about 8/7 times, level 0 is never read back).
    """
    params = params or UpscaleParams()
    if overrides:
        params = replace(params, **overrides)
    validate_params(params)
    return_large_buffers_to_os()
    started = time.perf_counter()
    image = _as_image(labels)
    out = Path(out)
    if image.ndim not in (2, 3):
        raise ValueError(f"{image.name or 'labels'}: expected a 2-D or 3-D label volume, got shape {image.shape}")
    fmt = _out_format(out, params.format)
    if params.compression == "auto":
        params = replace(params, compression="blosc" if fmt == "ome-zarr" else "zstd")
    if fmt == "ome-zarr" and params.compression == "zlib":
        raise ValueError("compression 'zlib' is for BigTIFF; use blosc, blosc-lz4, zstd or none for OME-Zarr")
    if fmt == "bigtiff" and params.compression.startswith("blosc"):
        raise ValueError(f"compression '{params.compression}' is for OME-Zarr; use zstd, zlib or none for BigTIFF")
    if params.shard_size % params.chunk_size:
        raise ValueError(f"shard_size {params.shard_size} must be a multiple of chunk_size {params.chunk_size}")

    notes: list[str] = []
    like_shape = like_scale = None
    if params.like:
        like = open_image(params.like)
        like_shape, like_scale = like.shape, like.scale
    out_shape, ratios, scale = resolve_target(
        image.shape, tuple(image.scale), factors=params.factors, shape=params.shape, like_shape=like_shape,
        like_scale=like_scale, out_scale=params.out_scale, align=params.align,
    )
    if params.like and params.align == "extent" and any(s != 1.0 for s in image.scale):
        for axis, (n, s, o, t) in enumerate(zip(image.shape, image.scale, out_shape, scale)):
            if abs(n * s - o * t) > t:
                notes.append(f"axis {axis}: the labels cover {n * s:.4g} mm, the reference {o * t:.4g} mm; with "
                             "align='extent' the labels are stretched to the reference's field of view "
                             "(align='scale' keeps their voxel size)")
    source = open_source(image)
    keep_labels = params.keep_labels if keep_labels is None else keep_labels
    keep = parse_label_ids(keep_labels) if isinstance(keep_labels, str) else keep_labels
    keep = None if isinstance(keep_labels, str) and not keep_labels.strip() else keep
    relabel = params.relabel if relabel is None else relabel
    if isinstance(relabel, str | Path):
        table = read_relabel_csv(relabel) if str(relabel).strip() else None
    else:
        table = relabel
    out_dtype = source.dtype if params.dtype == "same" else np.dtype(params.dtype)
    label_map = LabelMap(source.dtype, out_dtype, keep=None if keep is None else np.asarray(keep, np.uint64),
                         relabel=table)
    result = UpscaleResult(path=out, format=fmt, shape=out_shape, dtype=str(out_dtype), scale_mm=scale,
                           level_shapes=[], metrics_path=_metrics_path(out), notes=notes)
    if not check_can_write(out, params.if_exists):
        result.skipped = True
        result.metrics_path = None
        return result

    if fmt == "ome-zarr":
        n_levels = 0 if params.pyramid == "none" else params.pyramid_levels
        levels = pyramid_geometry(image.shape, ratios, out_shape, levels=n_levels, chunk=params.chunk_size,
                                  shard=params.shard_size)
        methods = [params.method] + [params.pyramid if params.pyramid != "none" else "nearest"] * (len(levels) - 1)
    else:
        levels = pyramid_geometry(image.shape, ratios, out_shape, levels=0, chunk=params.chunk_size,
                                  shard=params.shard_size)
        methods = [params.method]
    result.level_shapes = [lv.shape for lv in levels]
    uncompressed = sum(lv.n_voxels for lv in levels) * out_dtype.itemsize
    free = disk_free_bytes(out)
    if params.compression == "none" and uncompressed > 0.9 * free:
        raise ValueError(f"{out}: the uncompressed output needs {uncompressed / 1e9:.1f} GB, the disk has "
                         f"{free / 1e9:.1f} GB free; use compression zstd")

    budget = int(params.memory_budget_gb * GIB)
    mapped = not label_map.identity
    # A task reads a row of chunks at once when that fits a quarter of its share, else one chunk at a time.
    workers_wanted = max(1, params.workers)
    read_budget = max(budget // (4 * workers_wanted), 1)
    per_worker = _per_worker_bytes(levels, methods, source.dtype.itemsize, out_dtype.itemsize, mapped, read_budget)
    if per_worker > budget:
        raise ValueError(
            f"memory_budget_gb={params.memory_budget_gb} is below the {per_worker / GIB:.3f} GiB one worker needs "
            f"(one chunk of {params.chunk_size} voxels per edge and its source box); raise memory_budget_gb or "
            "lower chunk_size"
        )
    n_workers = int(max(1, min(workers_wanted, budget // per_worker)))
    result.workers_used = n_workers
    result.peak_memory_estimate_bytes = n_workers * per_worker

    with contextlib.ExitStack() as stack:
        if client is None and params.dask_scheduler and fmt == "ome-zarr":
            from distributed import Client

            client = stack.enter_context(Client(params.dask_scheduler))
        if client is not None:
            result.workers_used = len(client.scheduler_info().get("workers", {})) or 1
        total = sum(lv.n_voxels for lv in levels)
        stop = _StopFlag(cancel)
        tracker = Progress(total, progress, stop)
        tracker.check()
        stats = {"constant": 0, "encoded": 0, "voxels": 0}
        name = out.name.split(".")[0]
        attributes = {"upscale": {"source": str(image.source) if image.source else image.name,
                                  "source_shape": list(image.shape), "source_scale_mm": list(map(float, image.scale)),
                                  "ratios": [str(r) for r in ratios], "method": params.method,
                                  "pyramid": params.pyramid}}
        with atomic_output(out, "overwrite" if params.if_exists == "overwrite" else "error") as tmp:
            tmp = Path(tmp)
            if fmt == "ome-zarr":
                dirs = create_label_pyramid(tmp, levels, scale, out_dtype, params.compression, name=name,
                                            attributes=attributes, axes=("z", "y", "x")[-image.ndim :])
                job = _Job(source, label_map, levels, methods, dirs, params.compression, read_budget)
                tasks = [(li, idx, box) for li, lv in enumerate(levels) for idx, box in lv.shard_boxes()]
                if client is not None:
                    _run_on_cluster(client, job, tasks, tracker, stop, stats)
                else:
                    _run_in_threads(job, tasks, n_workers, tracker, stop, stats)
            else:
                job = _Job(source, label_map, levels, methods, [], params.compression, read_budget)
                stats.update(_write_bigtiff(job, tmp, scale, n_workers, tracker, stop.is_set))
        result.seconds = time.perf_counter() - started
        result.voxels_written = total
        result.chunks_constant, result.chunks_encoded = stats["constant"], stats["encoded"]
        result.bytes_on_disk = (sum(p.stat().st_size for p in out.rglob("*") if p.is_file()) if out.is_dir()
                                else out.stat().st_size)
        metrics = {
            "step": "upscale-labels",
            "labels": str(image.source) if image.source else image.name,
            "out": str(out),
            "params": asdict(params),
            "keep_labels_count": None if keep is None else len(np.atleast_1d(keep)),
            "relabel_count": None if not table else len(table),
            **{k: v for k, v in asdict(result).items() if k not in ("path", "metrics_path")},
            "uncompressed_bytes": result.uncompressed_bytes,
            "output_voxels_per_s": total / result.seconds if result.seconds else None,
        }
        with atomic_output(result.metrics_path, "overwrite") as tmp:
            Path(tmp).write_text(json.dumps(metrics, indent=2, default=str))
        return result


def _run_in_threads(job: _Job, tasks, n_workers: int, tracker: Progress, stop: _StopFlag, stats: dict) -> None:
    # Tasks are submitted a few at a time so the queue holds no more than the workers need.
    with ThreadPoolExecutor(max_workers=n_workers, thread_name_prefix="soct-upscale") as pool:
        pending = set()
        queue = iter(tasks)
        failed = None
        while True:
            while len(pending) < 2 * n_workers and failed is None and not stop.is_set():
                item = next(queue, None)
                if item is None:
                    break
                li, idx, box = item
                pending.add(pool.submit(_shard_task, job, li, idx, box, stop.is_set))
            if not pending:
                break
            done, pending = wait(pending, return_when=FIRST_EXCEPTION)
            for future in done:
                err = future.exception()
                if err is not None:
                    if failed is None or (isinstance(failed, Cancelled) and not isinstance(err, Cancelled)):
                        failed = err
                    stop.event.set()
                    continue
                r = future.result()
                for k in ("constant", "encoded", "voxels"):
                    stats[k] += r[k]
                if failed is None:
                    try:
                        tracker.advance(r["voxels"], f"{stats['voxels'] / 1e9:.2f} G voxels written")
                    except Cancelled as err:
                        failed = err
                        stop.event.set()
        if failed is not None:
            raise failed
        tracker.check()


def _run_on_cluster(client, job: _Job, tasks, tracker: Progress, stop: _StopFlag, stats: dict) -> None:
    from distributed import as_completed

    if job.source.path is None:
        raise ValueError("a dask cluster needs labels read from a file (OME-Zarr, zarr, TIFF, .npy) that its "
                         "workers can open; in-memory labels run in threads (client=None)")
    futures = [client.submit(_shard_task, job, li, idx, box, pure=False) for li, idx, box in tasks]
    try:
        for future in as_completed(futures):
            r = future.result()
            for k in ("constant", "encoded", "voxels"):
                stats[k] += r[k]
            tracker.advance(r["voxels"], f"{stats['voxels'] / 1e9:.2f} G voxels written")
    except BaseException:
        client.cancel(futures)
        raise
