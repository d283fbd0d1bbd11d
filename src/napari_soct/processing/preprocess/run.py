"""The preprocessing step: raw tiles -> mosaic grids, ``shifts_xy.csv``, ``slice_config.csv`` and QC previews."""

from __future__ import annotations

import json
import time
import warnings
from functools import partial
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import zarr

from ..io.atomic import atomic_output, check_can_write
from ..io.omezarr import COMPRESSION_CHOICES, create_ome_zarr_image
from ..io.rawtiles import BadTileWarning, RawAcquisition, RawFormatError, open_raw_acquisition
from ..io.tables import SliceConfigRow, write_shifts_xy, write_slice_config
from ..memory import return_large_buffers_to_os
from ..params import param, validate_params
from ..progress import Progress, ProgressCallback
from ..slices import SliceRunParams, StopFlag, current_client, map_in_threads, map_on_client
from .galvo import GalvoDecision
from .mosaic import SliceGeometry, galvo_decision_for_slice, mosaic_grid_name, read_corrected_tile, slice_geometry
from .previews import save_previews
from .shifts import shifts_from_stage_positions

__all__ = ["PreprocessParams", "SliceResult", "PreprocessResult", "preprocess_acquisition"]

GIB = 1024**3


@dataclass
class PreprocessParams(SliceRunParams):
    """Parameters of the preprocessing step (raw tiles to mosaic grids)."""

    axial_resolution_um: float = param(
        0.0, "Axial sample spacing in micrometres; 0 reads it from info.txt", min=0.0, unit="um"
    )
    resolution_um: float = param(
        -1.0, "Resample mosaic grids to this isotropic voxel size in micrometres; -1 keeps the native size",
        min=-1.0, unit="um",
    )
    fix_galvo_shift: bool = param(True, "Detect the galvo return band per slice and roll it out of the tiles")
    galvo_confidence_threshold: float = param(
        0.6, "Minimum detection confidence to apply the galvo fix", min=0.0, max=1.0
    )
    camera_shift: bool = param(False, "Correct the camera shift of old data (over-exposed first A-line)",
                               advanced=True)
    legacy_orientation: bool = param(False, "Swap and reverse the lateral axes (legacy systems)", advanced=True)
    sharding_factor: int = param(
        4, "Tiles per zarr shard along y and x (0 = no sharding)", min=0, max=64, advanced=True
    )
    compression: str = param("blosc-lz4", "Compression of the mosaic grids", choices=COMPRESSION_CHOICES,
                             advanced=True)
    overlap_fraction: float = param(
        0.2, "Tile overlap recorded when the stage positions cannot tell it", min=0.0, max=0.9, advanced=True
    )
    exclude_first_slices: int = param(
        1, "Leading slices marked use=false in slice_config.csv (calibration slices)", min=0
    )
    generate_slice_config: bool = param(True, "Write slice_config.csv")
    generate_previews: bool = param(True, "Write AIP and orthogonal-view PNG previews per slice")
    on_bad_tile: str = param(
        "warn", "A broken tile: 'warn' treats it as missing and notes it, 'error' stops",
        choices=("warn", "error"),
    )


@dataclass
class SliceResult:
    """What preprocessing did with one slice."""

    slice_id: int
    path: str
    skipped: bool
    grid_shape: tuple[int, int]
    tile_shape: tuple[int, int, int]
    voxel_size_um: tuple[float, float, float]
    n_tiles: int
    missing_tiles: list[tuple[int, int]]
    bad_tiles: dict[str, str]
    galvo: dict | None
    seconds: float = 0.0
    bytes_read: int = 0


@dataclass
class PreprocessResult:
    """Products of :func:`preprocess_acquisition`."""

    out_dir: Path
    slices: list[SliceResult]
    shifts_path: Path
    slice_config_path: Path | None
    metrics_path: Path
    seconds: float = 0.0
    workers_used: int = 1
    peak_memory_estimate_bytes: int = 0
    notes: list[str] = field(default_factory=list)

    @property
    def mosaic_paths(self) -> list[Path]:
        return [Path(s.path) for s in self.slices]


def _estimate_slice_memory(acq: RawAcquisition, geometry: SliceGeometry, shard_tiles: tuple[int, int]) -> int:
    """Upper bound of the bytes one slice worker holds at once (measured in docs/benchmarks.md).

    A raw tile as read, the corrected tile and its resampled copy; the block of tiles written as one shard
    and about three times its size while zarr encodes it (bytes, compressed chunks, the assembled shard);
    the slice-sized average projection and sections.
    """
    raw = acq.tile_info.expected_bytes
    tile = 4 * int(np.prod(acq.tile_info.shape))
    out_tile = 4 * int(np.prod(geometry.tile_shape))
    block = out_tile * shard_tiles[0] * shard_tiles[1]
    tz, ty, tx = geometry.tile_shape
    n_y, n_x = geometry.grid_shape
    projections = 4 * (n_y * ty * n_x * tx + tz * (n_y * ty + n_x * tx))
    return raw + tile + out_tile + 4 * block + projections


def _shard_tiles(geometry: SliceGeometry, factor: int) -> tuple[int, int]:
    if factor <= 1:
        return (1, 1)
    return (min(factor, geometry.grid_shape[0]), min(factor, geometry.grid_shape[1]))


def _median_stage_z(acq: RawAcquisition, slice_id: int) -> float | None:
    values = [t.info.stage_z_mm for t in acq.tiles.get(slice_id, {}).values()]
    return float(np.median(values)) if values else None


def _write_slice(
    acq: RawAcquisition,
    slice_id: int,
    out_path: Path,
    params: PreprocessParams,
    progress: Progress,
    previews_dir: Path | None,
) -> SliceResult:
    start = time.perf_counter()
    geometry = slice_geometry(acq, slice_id, params.resolution_um, params.legacy_orientation)
    decision: GalvoDecision | None = None
    if params.fix_galvo_shift:
        decision = galvo_decision_for_slice(acq, slice_id, params.galvo_confidence_threshold)
    shift = decision.shift if decision else 0
    ny, nx = geometry.grid_shape
    tz, ty, tx = geometry.tile_shape
    shard_y, shard_x = _shard_tiles(geometry, params.sharding_factor)
    bad = {f"x{x:02d}_y{y:02d}": msg for (x, y), msg in acq.bad_tiles.get(slice_id, {}).items()}
    missing = [(x, y) for y in range(ny) for x in range(nx) if acq.tile(slice_id, x, y) is None]
    aip = np.zeros((ny * ty, nx * tx), np.float32)
    mid_y, mid_x = (ny * ty) // 2, (nx * tx) // 2
    section_xz = np.zeros((tz, nx * tx), np.float32)
    section_yz = np.zeros((tz, ny * ty), np.float32)
    bytes_read = n_written = 0
    with atomic_output(out_path, "overwrite" if params.if_exists == "overwrite" else "error") as tmp:
        array = create_ome_zarr_image(
            tmp,
            geometry.shape,
            tuple(v * 1e-3 for v in geometry.voxel_size_um),
            chunks=geometry.tile_shape,
            shards=(tz, shard_y * ty, shard_x * tx) if (shard_y, shard_x) != (1, 1) else None,
            compression=params.compression,
            name=out_path.name.removesuffix(".ome.zarr"),
        )
        # Whole shards per write: partial writes into a shard would rewrite it once per tile.
        for by in range(0, ny, shard_y):
            for bx in range(0, nx, shard_x):
                rows, cols = range(by, min(by + shard_y, ny)), range(bx, min(bx + shard_x, nx))
                block = np.zeros((tz, len(rows) * ty, len(cols) * tx), np.float32)
                any_tile = False
                for y in rows:
                    for x in cols:
                        tile = acq.tile(slice_id, x, y)
                        if tile is None:
                            continue
                        try:
                            data = read_corrected_tile(
                                tile, geometry, shift, camera_shift=params.camera_shift,
                                legacy_orientation=params.legacy_orientation,
                            )
                        except RawFormatError as err:
                            if params.on_bad_tile == "error":
                                raise
                            warnings.warn(f"{err}; the tile is treated as missing", BadTileWarning, stacklevel=2)
                            bad[f"x{x:02d}_y{y:02d}"] = str(err)
                            missing.append((x, y))
                            progress.advance(1, f"slice {slice_id}: tile x{x} y{y} broken")
                            continue
                        bytes_read += tile.info.expected_bytes
                        n_written += 1
                        any_tile = True
                        block[:, (y - by) * ty : (y - by + 1) * ty, (x - bx) * tx : (x - bx + 1) * tx] = data
                        aip[y * ty : (y + 1) * ty, x * tx : (x + 1) * tx] = data.mean(axis=0)
                        if y == mid_y // ty:
                            section_xz[:, x * tx : (x + 1) * tx] = data[:, mid_y % ty, :]
                        if x == mid_x // tx:
                            section_yz[:, y * ty : (y + 1) * ty] = data[:, :, mid_x % tx]
                        progress.advance(1, f"slice {slice_id}: tile x{x} y{y}")
                if any_tile:
                    array[:, by * ty : by * ty + block.shape[1], bx * tx : bx * tx + block.shape[2]] = block
        zarr.open_group(str(tmp), mode="r+").attrs["soct"] = {
            "slice_id": slice_id,
            "tile_shape": list(geometry.tile_shape),
            "grid_shape": list(geometry.grid_shape),
            "overlap_fraction": geometry.overlap_fraction(params.overlap_fraction),
            "voxel_size_um": list(geometry.voxel_size_um),
            "native_voxel_size_um": list(geometry.native_voxel_size_um),
            "stage_positions_mm": [
                {"x": x, "y": y, "stage_x_mm": p[0], "stage_y_mm": p[1]}
                for (x, y), p in sorted(geometry.stage_positions_mm.items(), key=lambda kv: (kv[0][1], kv[0][0]))
            ],
            # Stage z of the slice (median over tiles): consecutive slices' difference is the cut thickness.
            "stage_z_mm": _median_stage_z(acq, slice_id),
            "missing_tiles": [list(m) for m in sorted(missing)],
            "bad_tiles": bad,
            "galvo": asdict(decision) if decision else None,
            "source": str(acq.root),
        }
    if previews_dir is not None:
        save_previews(previews_dir, slice_id, aip, section_xz, section_yz, geometry.voxel_size_um)
    return SliceResult(
        slice_id=slice_id,
        path=str(out_path),
        skipped=False,
        grid_shape=geometry.grid_shape,
        tile_shape=geometry.tile_shape,
        voxel_size_um=geometry.voxel_size_um,
        n_tiles=n_written,
        missing_tiles=sorted(missing),
        bad_tiles=bad,
        galvo=asdict(decision) if decision else None,
        seconds=time.perf_counter() - start,
        bytes_read=bytes_read,
    )


def _slice_config_rows(acq: RawAcquisition, results: list[SliceResult], params: PreprocessParams):
    by_id = {r.slice_id: r for r in results}
    all_ids = sorted(set(acq.tiles) | set(acq.bad_tiles))
    rows = []
    for index, sid in enumerate(all_ids):
        row = SliceConfigRow(slice_id=sid)
        if index < params.exclude_first_slices:
            row.use = False
            row.add_note("calibration_slice")
        result = by_id.get(sid)
        if result is None:
            row.use = False
            row.add_note("no_usable_tile")
            rows.append(row)
            continue
        if result.galvo is not None:
            row.galvo_confidence = round(result.galvo["confidence"], 4)
            row.galvo_fix = bool(result.galvo["applied"])
        for name in sorted(result.bad_tiles):
            row.add_note(f"bad_tile_{name}")
        rows.append(row)
    return rows


def _write_slice_task(acq, targets, params, previews_dir, units, sid: int) -> SliceResult:
    """One slice on a dask worker (progress is counted on the driver as slices finish)."""
    return _write_slice(acq, sid, targets[sid], params, Progress(units[sid]), previews_dir)


def preprocess_acquisition(
    raw_dir,
    out_dir,
    params: PreprocessParams | None = None,
    *,
    progress: ProgressCallback | None = None,
    cancel=None,
    **overrides,
) -> PreprocessResult:
    """Turn a raw S-OCT acquisition into mosaic grids, ``shifts_xy.csv``, ``slice_config.csv`` and previews.

    Parameters
    ----------
    raw_dir : path
        Raw acquisition (flat or grouped layout).
    out_dir : path
        Output folder (created).
    params : PreprocessParams, optional
        Step parameters; keyword ``overrides`` replace single fields.
    progress : callable, optional
        ``progress(done, total, message)``, called from worker threads after each tile.
    cancel : threading.Event, optional
        Set it to stop; partial outputs are removed and :class:`~napari_soct.processing.progress.Cancelled`
        is raised.

    Returns
    -------
    PreprocessResult

    Notes
    -----
    Slices are written in parallel by at most ``workers`` threads, fewer when ``memory_budget_gb`` does not
    hold that many slice workers (one raw tile and one zarr shard each); memory does not grow with the
    number of tiles or slices.
    """
    params = params or PreprocessParams()
    if overrides:
        params = replace(params, **overrides)
    validate_params(params)
    return_large_buffers_to_os()
    started = time.perf_counter()
    out_dir = Path(out_dir)
    acq = open_raw_acquisition(
        raw_dir,
        axial_resolution_um=params.axial_resolution_um or None,
        on_bad_tile=params.on_bad_tile,
    )
    ids = acq.slice_ids
    targets = {sid: out_dir / mosaic_grid_name(sid) for sid in ids}
    shifts_path = out_dir / "shifts_xy.csv"
    config_path = out_dir / "slice_config.csv"
    # Fail before any work when an output exists and the user did not say what to do with it.
    to_write = [sid for sid in ids if check_can_write(targets[sid], params.if_exists)]
    write_tables = [p for p in (shifts_path, config_path) if check_can_write(p, params.if_exists)]

    geometry = slice_geometry(acq, ids[0], params.resolution_um, params.legacy_orientation)
    per_slice = _estimate_slice_memory(acq, geometry, _shard_tiles(geometry, params.sharding_factor))
    budget = int(params.memory_budget_gb * GIB)
    if per_slice > budget:
        raise ValueError(
            f"memory_budget_gb={params.memory_budget_gb} is below the {per_slice / GIB:.2f} GiB one slice worker "
            f"needs (one raw tile of {acq.tile_info.expected_bytes / GIB:.2f} GiB and a shard of "
            f"{params.sharding_factor}x{params.sharding_factor} tiles); raise memory_budget_gb or lower "
            "sharding_factor"
        )
    n_workers = max(1, min(params.workers, len(to_write) or 1, budget // per_slice))

    out_dir.mkdir(parents=True, exist_ok=True)
    previews_dir = out_dir / "previews" if params.generate_previews else None
    total = sum(len(acq.tiles[sid]) for sid in to_write)
    # Stop the other workers as soon as one fails or the user cancels.
    stop = StopFlag(cancel)
    tracker = Progress(total, progress, stop)
    tracker.check()
    results: dict[int, SliceResult] = {}
    client = current_client()
    if client is not None and to_write:
        # Inside a run on a dask cluster: one task per slice, like every per-slice step.
        units = {sid: len(acq.tiles[sid]) for sid in to_write}
        task = partial(_write_slice_task, acq, targets, params, previews_dir, units)
        results.update(map_on_client(client, task, to_write, units, tracker, stop, "soct-preprocess"))
        n_workers = len(client.scheduler_info().get("workers", {})) or n_workers
    else:
        results.update(map_in_threads(
            lambda sid: _write_slice(acq, sid, targets[sid], params, tracker, previews_dir), to_write, n_workers,
            stop, "soct-preprocess"))
    for sid in ids:
        if sid not in results:
            geometry_s = slice_geometry(acq, sid, params.resolution_um, params.legacy_orientation)
            results[sid] = SliceResult(
                slice_id=sid, path=str(targets[sid]), skipped=True, grid_shape=geometry_s.grid_shape,
                tile_shape=geometry_s.tile_shape, voxel_size_um=geometry_s.voxel_size_um,
                n_tiles=len(acq.tiles[sid]), missing_tiles=[], bad_tiles={}, galvo=None,
            )
    ordered = [results[sid] for sid in ids]
    if shifts_path in write_tables:
        write_shifts_xy(shifts_path, shifts_from_stage_positions(acq), if_exists="overwrite")
    if params.generate_slice_config and config_path in write_tables:
        write_slice_config(config_path, _slice_config_rows(acq, ordered, params), if_exists="overwrite")
    result = PreprocessResult(
        out_dir=out_dir,
        slices=ordered,
        shifts_path=shifts_path,
        slice_config_path=config_path if params.generate_slice_config else None,
        metrics_path=out_dir / "preprocess_metrics.json",
        seconds=time.perf_counter() - started,
        workers_used=n_workers,
        peak_memory_estimate_bytes=n_workers * per_slice,
    )
    metrics = {
        "step": "preprocess",
        "raw_dir": str(Path(raw_dir).resolve()),
        "params": asdict(params),
        "seconds": result.seconds,
        "workers_used": n_workers,
        "peak_memory_estimate_bytes": result.peak_memory_estimate_bytes,
        "raw_bytes": acq.nbytes_raw(),
        "slices": [asdict(s) for s in ordered],
    }
    with atomic_output(result.metrics_path, "overwrite") as tmp:
        Path(tmp).write_text(json.dumps(metrics, indent=2, default=str))
    return result
