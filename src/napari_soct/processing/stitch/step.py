"""The stitching step: mosaic grids -> stitched slices ``slice_z{NN}_stitch.ome.zarr`` (multiscale) + metrics.

Two passes:

1. **Registration** (``placement="image"``): every slice's tiles are read once and projected over depth;
   neighbouring tiles are registered (:mod:`.pairwise`). The stage affine is then fitted to the pairs of
   all slices together (``pool_slices``, one stage for the run) or of each slice, and each slice's tile
   positions follow from it with the clamped residual refinement (:mod:`.placement`). Pooling needs every
   slice's pairs before any slice is stitched, hence the separate pass; its cost is one extra read of the
   tiles (projections only are kept, one slice at a time).
2. **Stitching** (:func:`~napari_soct.processing.slices.run_slice_step`, slices in parallel under the
   memory budget): each slice's canvas is written block by block (:mod:`.blend`) into a multiscale
   OME-Zarr, all pyramid levels in the same pass.

``placement="motor"`` skips pass 1: tiles go to their stage positions.
"""

from __future__ import annotations

import math
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import numpy as np

from ..io.atomic import check_can_write
from ..io.mosaic import MosaicGrid, open_mosaic_grid
from ..io.omezarr import COMPRESSION_CHOICES, create_ome_zarr_pyramid, pyramid_level_count
from ..memory import return_large_buffers_to_os
from ..params import param, validate_params
from ..progress import Progress, ProgressCallback
from ..slices import (SliceRunParams, SliceStepResult, StopFlag, current_client, find_slice_files, map_on_client,
                      run_slice_step, slice_output_name, write_in_parts)
from .blend import BLENDING_CHOICES, TileCache, canvas_layout, diffusion_solve_bytes, stitch_blocks
from .pairwise import PairEstimate, _overlap_regions, register_grid, tile_projection, upsampled_phase_correlation
from .placement import (
    AffineFit,
    Placement,
    fit_stage_affine,
    motor_placement,
    nominal_positions,
    place_tiles,
)

__all__ = ["StitchParams", "SlicePlan", "plan_placements", "stitch_slices"]

GIB = 1024**3
STEP_NAME = "stitch"


@dataclass
class StitchParams(SliceRunParams):
    """Parameters of the stitching step (mosaic grids to stitched slices)."""

    placement: str = param(
        "image", "Tile positions: 'image' fits the stage affine to pairwise registrations, 'motor' uses the "
        "stage positions as they are", choices=("image", "motor"),
    )
    blending: str = param(
        "diffusion", "Overlap blending: 'diffusion' (Laplace weights), 'average' (linear ramps), 'none' "
        "(hard seams)", choices=BLENDING_CHOICES,
    )
    pool_slices: bool = param(True, "Fit one stage affine to all slices (same stage for the whole run)")
    max_residual_px: float = param(
        2.0, "Largest distance a tile may move from the affine model towards its pairwise registrations "
        "(0: the model alone)", min=0.0, unit="px",
    )
    n_peaks: int = param(5, "Phase-correlation peaks checked per tile pair", min=1, max=64, advanced=True)
    min_overlap_ncc: float = param(
        0.3, "Tile pairs whose overlaps correlate less give no constraint (empty or unreliable overlaps)",
        min=-1.0, max=1.0,
    )
    max_shift_px: float = param(
        10.0, "Registrations further than this from the stage prediction are rejected", min=0.0, unit="px",
        advanced=True,
    )
    subpixel: bool = param(True, "Sub-pixel registration and sub-pixel tile placement")
    max_blend_refinement_px: float = param(
        0.0, "Re-register each seam at its final position before blending and apply shifts up to this "
        "size (0: off; costs one more read of the tiles)", min=0.0, max=5.0, unit="px", advanced=True,
    )
    projection_z_start: int = param(0, "First depth sample of the projections used for registration",
                                    min=0, advanced=True)
    projection_z_stop: int = param(
        0, "Depth sample after the last one of the registration projections (0: to the bottom)", min=0,
        advanced=True,
    )
    compression: str = param("blosc-lz4", "Compression of the stitched slices", choices=COMPRESSION_CHOICES,
                             advanced=True)


@dataclass
class SlicePlan:
    """Placement of one slice, decided before stitching."""

    slice_id: int
    path: Path
    nominal: dict
    nominal_source: str
    pairs: list[PairEstimate]
    placement: Placement
    pixel_mm: tuple[float, float]


def _open_grid(path: Path) -> MosaicGrid:
    try:
        grid = open_mosaic_grid(path)
    except ValueError as err:
        raise ValueError(f"{path}: not a mosaic grid the stitching step can read ({err})") from None
    if not grid.tile_positions():
        raise ValueError(f"{path}: the mosaic grid has no present tile")
    return grid


def _z_range(grid: MosaicGrid, params: StitchParams) -> tuple[int, int] | None:
    nz = grid.tile_shape[0]
    start = params.projection_z_start
    stop = params.projection_z_stop or nz
    if start == 0 and stop >= nz:
        return None
    if not 0 <= start < min(stop, nz):
        raise ValueError(
            f"projection_z_start={start} / projection_z_stop={params.projection_z_stop}: no depth sample of "
            f"{grid.path.name}'s {nz} is selected"
        )
    return start, min(stop, nz)


def _register_slice(grid: MosaicGrid, params: StitchParams, nominal: dict, on_tile) -> list[PairEstimate]:
    z_range = _z_range(grid, params)

    def read_projection(ix, iy):
        return tile_projection(grid.read_tile(ix, iy), z_range)

    return register_grid(
        read_projection, grid.tile_positions(), nominal, on_tile=on_tile, n_peaks=params.n_peaks,
        max_shift_px=params.max_shift_px, min_ncc=params.min_overlap_ncc, subpixel=params.subpixel,
    )


def _register_slice_task(inputs: dict, params: StitchParams, nominal: dict, sid: int) -> list[PairEstimate]:
    """Pairwise registration of one slice as a dask task (progress is counted on the driver per slice)."""
    return _register_slice(_open_grid(inputs[sid]), params, nominal[sid], lambda ix, iy: None)


def plan_placements(
    source, params: StitchParams, *, slice_ids=None, progress: ProgressCallback | None = None, cancel=None,
) -> tuple[dict[int, SlicePlan], AffineFit | None]:
    """Pass 1: tile positions of every slice (registration, affine fit, refinement), without writing.

    Parameters
    ----------
    source : path
        Folder of mosaic grids (or one grid).
    params : StitchParams
    slice_ids : iterable of int, optional
        Slices to plan (default all). With ``pool_slices`` the affine is still fitted to every slice.

    Returns
    -------
    plans : dict
        ``{slice_id: SlicePlan}``.
    affine : AffineFit or None
        The pooled fit (None for motor placement or per-slice fits).
    """
    validate_params(params)
    inputs = find_slice_files(source)
    wanted = set(inputs) if slice_ids is None else set(slice_ids)
    grids = {sid: _open_grid(path) for sid, path in inputs.items()}
    register = set(inputs) if (params.pool_slices and params.placement == "image") else wanted
    nominal, sources = {}, {}
    for sid, grid in grids.items():
        nominal[sid], sources[sid] = nominal_positions(grid)
    pixel_mm = {sid: (g.voxel_size_um[1] * 1e-3, g.voxel_size_um[2] * 1e-3) for sid, g in grids.items()}
    pairs: dict[int, list[PairEstimate]] = {sid: [] for sid in grids}
    if params.placement == "image":
        total = sum(len(grids[s].tile_positions()) for s in register)
        stop = StopFlag(cancel)
        tracker = Progress(total, progress, stop)
        tracker.check()

        client = current_client()
        if client is not None:
            # Inside a run on a dask cluster: one registration task per slice, like the stitching after it.
            units = {sid: len(grids[sid].tile_positions()) for sid in register}
            task = partial(_register_slice_task, inputs, params, nominal)
            pairs.update(map_on_client(client, task, sorted(register), units, tracker, stop,
                                       "soct-stitch-register"))
        else:
            def one(sid):
                return sid, _register_slice(
                    grids[sid], params, nominal[sid], lambda ix, iy: tracker.advance(1, f"registration z{sid:02d}")
                )

            with ThreadPoolExecutor(max_workers=max(1, min(params.workers, len(register)))) as pool:
                for sid, result in pool.map(one, sorted(register)):
                    pairs[sid] = result
    plans: dict[int, SlicePlan] = {}
    pooled = None
    if params.placement == "image" and params.pool_slices:
        pooled = fit_stage_affine({s: pairs[s] for s in register}, {s: nominal[s] for s in register},
                                  {s: pixel_mm[s] for s in register})
    for sid in sorted(wanted):
        if params.placement == "motor":
            placement = motor_placement(nominal[sid])
        else:
            fit = pooled or fit_stage_affine({sid: pairs[sid]}, {sid: nominal[sid]}, {sid: pixel_mm[sid]})
            excluded = {(a, b) for s, a, b in fit.rejected if s == sid}
            placement = place_tiles(
                nominal[sid], pairs[sid], fit.matrix, pixel_mm[sid], max_residual_px=params.max_residual_px,
                tile_sigma_px=fit.tile_sigma_px, excluded=excluded,
            )
            placement.affine = fit
        plans[sid] = SlicePlan(sid, inputs[sid], nominal[sid], sources[sid], pairs[sid], placement, pixel_mm[sid])
    return plans, pooled


def _refine_at_blending(grid: MosaicGrid, plan: SlicePlan, max_px: float, z_range) -> tuple[dict, dict]:
    """Re-measure each used seam at the final positions (phase correlation of the depth projections) and
    move tiles by at most ``max_px`` towards agreement; seams measured further off are ignored."""
    positions = {t: np.asarray(p, dtype=float) for t, p in plan.placement.positions.items()}
    tiles = sorted(positions, key=lambda t: (t[1], t[0]))
    projections = {t: tile_projection(grid.read_tile(*t), z_range) for t in tiles}
    constraints = []
    for p in plan.pairs:
        if p.shift is None or p.a not in positions or p.b not in positions:
            continue
        rel = positions[p.b] - positions[p.a]
        d_int = (int(round(rel[0])), int(round(rel[1])))
        regions = _overlap_regions(projections[p.a].shape, projections[p.b].shape, d_int)
        if regions is None:
            continue
        ra, rb = regions
        strip_a, strip_b = projections[p.a][ra], projections[p.b][rb]
        if min(strip_a.shape) < 4:
            continue
        s = upsampled_phase_correlation(strip_a, strip_b, around=tuple(rel - d_int))
        e = np.asarray(d_int, dtype=float) + np.asarray(s) - rel
        if np.hypot(*e) <= max_px:
            constraints.append((p.a, p.b, e))
    corrections = {t: np.zeros(2) for t in tiles}
    if constraints:
        index = {t: i for i, t in enumerate(tiles)}
        n = len(tiles)
        normal = np.eye(n)  # unit pull of every tile to its current position
        rhs = np.zeros((n, 2))
        for a, b, e in constraints:
            ia, ib = index[a], index[b]
            normal[ia, ia] += 1
            normal[ib, ib] += 1
            normal[ia, ib] -= 1
            normal[ib, ia] -= 1
            rhs[ib] += e
            rhs[ia] -= e
        sol = np.linalg.solve(normal, rhs)
        for t in tiles:
            v = sol[index[t]]
            norm = float(np.hypot(*v))
            corrections[t] = v if norm <= max_px else v * (max_px / norm)
    return {t: positions[t] + corrections[t] for t in tiles}, corrections


def _chunk_and_block(n_z: int, canvas_hw: tuple[int, int], budget: int) -> tuple[int, tuple[int, int]]:
    """Chunk edge (y, x) and block shape so that a block's working set takes at most 30 % of ``budget``.

    A block holds the float32 sum, the weight sum, the halved copies for the pyramid and zarr's encoding
    buffers: about :data:`_BLOCK_FACTOR` times its size.
    """
    height, width = canvas_hw
    share = 0.3 * budget
    unit = n_z * 4 * _BLOCK_FACTOR
    chunk = 256
    while chunk > 32 and unit * chunk * chunk > share:
        chunk //= 2
    if unit * chunk * chunk > share:
        return chunk, (chunk, chunk)
    cols = max(1, min(math.ceil(width / chunk), int(share // (unit * chunk * chunk))))
    rows = max(1, min(math.ceil(height / chunk), int(share // (unit * chunk * cols * chunk))))
    return chunk, (rows * chunk, cols * chunk)


# A block: the float32 sum, the weight sum, zarr's encoding buffers for each level, the halved copies.
_BLOCK_FACTOR = 4
# A tile being read: zarr's compressed and decoded chunk, the float32 array, the sub-pixel shifted copy.
_TILE_TRANSIENT = 4


def _tile_bytes(grid: MosaicGrid) -> int:
    nz, ty, tx = grid.tile_shape
    return 4 * nz * ty * tx


def _fixed_bytes(grid: MosaicGrid, blending: str) -> int:
    """Memory a slice worker needs besides its block and its cache: a tile being read, a weight solve."""
    solve = diffusion_solve_bytes(grid.tile_shape[1:]) if blending == "diffusion" else 0
    return _TILE_TRANSIENT * _tile_bytes(grid) + solve


def _slice_need_bytes(grid: MosaicGrid, blending: str) -> int:
    """Smallest budget one slice worker can stitch with: two tiles cached, one being read, a 32 px block."""
    nz = grid.tile_shape[0]
    return 2 * _tile_bytes(grid) * 9 // 8 + _fixed_bytes(grid, blending) + int(nz * 32 * 32 * 4 * _BLOCK_FACTOR / 0.3)


def _cache_bytes(grid: MosaicGrid, budget: int, block_hw: tuple[int, int], blending: str) -> int:
    """What is left of a worker's budget for cached tiles (and their weights) once a block, a tile being
    read and a weight solve are accounted for."""
    nz = grid.tile_shape[0]
    block = nz * block_hw[0] * block_hw[1] * 4 * _BLOCK_FACTOR
    return max(budget - block - _fixed_bytes(grid, blending), 2 * _tile_bytes(grid))


def _clean(value):
    """JSON-safe: NaN/inf -> None, numpy scalars -> float."""
    if isinstance(value, float | np.floating):
        return None if not np.isfinite(value) else float(value)
    if isinstance(value, dict):
        return {str(k): _clean(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_clean(v) for v in value]
    if isinstance(value, np.ndarray):
        return _clean(value.tolist())
    return value


def _tile_qc(plan: SlicePlan, layout, positions: dict) -> list[dict]:
    """Per-tile QC rows for the napari widget: rectangle in the stitched slice and overlap metrics."""
    ncc: dict = {t: [] for t in positions}
    for p in plan.pairs:
        if p.shift is not None:
            ncc[p.a].append(p.ncc)
            ncc[p.b].append(p.ncc)
    rows = []
    for (ix, iy), pos in sorted(positions.items(), key=lambda kv: (kv[0][1], kv[0][0])):
        rel = np.asarray(pos) - layout.origin
        residual = plan.placement.residuals.get((ix, iy), np.zeros(2))
        rows.append({
            "x": ix, "y": iy, "y0_px": float(rel[0]), "x0_px": float(rel[1]),
            "height_px": int(layout.tile_hw[0]), "width_px": int(layout.tile_hw[1]),
            "overlap_ncc": float(np.mean(ncc[(ix, iy)])) if ncc[(ix, iy)] else float("nan"),
            "residual_px": float(np.hypot(*residual)),
            "pairs_used": len(ncc[(ix, iy)]),
        })
    return rows


def _stitch_region(in_path: Path, layout, params: StitchParams, cache_bytes: int, block_hw, writer, region,
                   on_block) -> dict:
    """Blend the tiles of ``in_path`` into ``region`` of ``writer``, block by block (``write_in_parts``'s
    ``write_region``); returns the blocks' statistics and the tile cache's."""
    grid = _open_grid(in_path)
    cache = TileCache(grid.read_tile, layout, params.blending, cache_bytes, subpixel=params.subpixel)
    stats = stitch_blocks(layout, cache, grid.tile_shape[0], block_hw, writer.write,
                          on_block=lambda _rect: on_block(), region=region)
    return {**stats, "tile_reads": cache.reads, "bytes_read": cache.bytes_read,
            "weight_solves": cache.weights.solves, "cache_peak_bytes": cache.peak_bytes}


def stitch_slices(
    source, out_dir, params: StitchParams | None = None, *, progress: ProgressCallback | None = None, cancel=None,
) -> SliceStepResult:
    """Stitch every mosaic grid of ``source`` into ``out_dir/slice_z{NN}_stitch.ome.zarr``.

    Parameters
    ----------
    source : path
        Folder of mosaic grids (``mosaic_grid_3d_z{NN}.ome.zarr``, or outputs of earlier in-slice steps), or
        one grid.
    out_dir : path
        Output folder; ``stitch_metrics.json`` is written there too.
    params : StitchParams
    progress : callable, optional
        ``progress(done, total, message)``; registration and stitching are counted together.
    cancel : optional
        Anything with ``is_set()``; a cancelled run leaves no partial output.

    Returns
    -------
    SliceStepResult
        Per-slice metrics: placement (``method``, ``affine`` with rotation/shear/scales, RMS residuals),
        ``pairs`` (per pair: shift, NCC, standard error, why skipped), ``tiles`` (per-tile QC: rectangle in
        the output, ``overlap_ncc``, ``residual_px``), canvas origin and stitching statistics.

    Raises
    ------
    ValueError
        Bad parameters or inputs (naming the file / parameter), or a memory budget too small for a slice.
    OutputExistsError
        An output exists and ``if_exists == "error"``.
    """
    params = params or StitchParams()
    validate_params(params)
    return_large_buffers_to_os()
    inputs = find_slice_files(source)
    out_dir = Path(out_dir)
    to_run = [sid for sid in inputs if check_can_write(out_dir / slice_output_name(sid, STEP_NAME), params.if_exists)]
    grids = {sid: _open_grid(inputs[sid]) for sid in inputs}
    budget = int(params.memory_budget_gb * GIB)
    n_workers = max(1, min(params.workers, len(to_run) or 1))
    need = max((_slice_need_bytes(grids[s], params.blending) for s in to_run), default=0)
    n_workers = max(1, min(n_workers, budget // max(need, 1)))
    worker_budget = budget // n_workers
    if to_run and need > worker_budget:
        raise ValueError(
            f"memory_budget_gb={params.memory_budget_gb} is below the {need / GIB:.3f} GiB one slice needs to be "
            f"stitched (tiles of {max(_tile_bytes(grids[s]) for s in to_run) / 2**20:.1f} MiB); raise memory_budget_gb"
        )

    # Progress over both passes: registration tiles first, then stitching blocks (estimated until known).
    n_register = 0
    if params.placement == "image" and to_run:
        n_register = sum(len(g.tile_positions()) for s, g in grids.items() if params.pool_slices or s in to_run)
    blocks_estimate = sum(1 + (g.grid_shape[0] * g.tile_shape[1] * g.grid_shape[1] * g.tile_shape[2]) // 256**2
                          for s, g in grids.items() if s in to_run)

    def pass1_progress(done, total, message):
        if progress is not None:
            progress(done, total + blocks_estimate, message)

    plans, pooled = ({}, None)
    if to_run:
        plans, pooled = plan_placements(source, params, slice_ids=to_run, progress=pass1_progress, cancel=cancel)

    layouts = {}
    chunking = {}
    for sid in to_run:
        grid = grids[sid]
        layout = canvas_layout(plans[sid].placement.positions, grid.tile_shape[1:], params.subpixel)
        layouts[sid] = layout
        chunking[sid] = _chunk_and_block(grid.tile_shape[0], layout.shape,
                                         worker_budget - _fixed_bytes(grid, params.blending))

    def units(path: Path) -> int:
        sid = next(s for s, p in inputs.items() if p == path)
        chunk, (bh, bw) = chunking[sid]
        h, w = layouts[sid].shape
        return math.ceil(h / bh) * math.ceil(w / bw)

    def pass2_progress(done, total, message):
        if progress is not None:
            progress(n_register + done, n_register + total, message)

    def process_slice(in_path: Path, out_tmp: Path, tracker: Progress) -> dict:
        started = time.perf_counter()
        sid = next(s for s, p in inputs.items() if p == in_path)
        grid = _open_grid(in_path)
        plan = plans[sid]
        layout = layouts[sid]
        corrections = None
        if params.max_blend_refinement_px > 0 and params.placement == "image":
            positions, corrections = _refine_at_blending(grid, plan, params.max_blend_refinement_px,
                                                         _z_range(grid, params))
            layout = canvas_layout(positions, grid.tile_shape[1:], params.subpixel)
        else:
            positions = plan.placement.positions
        nz = grid.tile_shape[0]
        chunk, block_hw = _chunk_and_block(nz, layout.shape, worker_budget - _fixed_bytes(grid, params.blending))
        cache_bytes = _cache_bytes(grid, worker_budget, block_hw, params.blending)
        vz, vy, vx = grid.voxel_size_um
        origin_mm = (float(layout.origin[0] * plan.pixel_mm[0]), float(layout.origin[1] * plan.pixel_mm[1]))
        attributes = {"soct": {
            "slice_id": sid, "step": STEP_NAME, "source": str(in_path), "voxel_size_um": [vz, vy, vx],
            "origin_px": [float(v) for v in layout.origin], "origin_mm": list(origin_mm),
            "stage_z_mm": grid.attributes.get("stage_z_mm"),
            "placement": params.placement, "blending": params.blending,
            "tile_positions_px": [{"x": t[0], "y": t[1], "y_px": float(p[0] - layout.origin[0]),
                                   "x_px": float(p[1] - layout.origin[1])}
                                  for t, p in sorted(positions.items(), key=lambda kv: (kv[0][1], kv[0][0]))],
        }}
        writer = create_ome_zarr_pyramid(
            out_tmp, (nz, *layout.shape), (vz * 1e-3, vy * 1e-3, vx * 1e-3),
            # thin in depth: faster to write, and napari reads one plane at a time
            chunks=(min(nz, 16), chunk, chunk),
            n_levels=min(pyramid_level_count(layout.shape), int(math.log2(chunk)) + 1),
            compression=params.compression, name=slice_output_name(sid, STEP_NAME).removesuffix(".ome.zarr"),
            attributes=attributes,
        )
        parts = write_in_parts(partial(_stitch_region, in_path, layout, params, cache_bytes, block_hw), out_tmp,
                               writer, tracker, units(in_path), "soct-stitch-part")
        stats = {key: sum(p[key] for p in parts) for key in parts[0]}
        stats["cache_peak_bytes"] = max(p["cache_peak_bytes"] for p in parts)
        placement = plan.placement
        fit = placement.affine
        metrics = {
            "slice_id": sid,
            "method": placement.method,
            "nominal_positions": plan.nominal_source,
            "canvas_shape": [nz, *layout.shape],
            "origin_px": [float(v) for v in layout.origin],
            "origin_mm": list(origin_mm),
            "pyramid_levels": writer.n_levels,
            "rms_residual_model_px": placement.rms_model_px,
            "rms_residual_px": placement.rms_final_px,
            "n_clamped": placement.n_clamped,
            "affine": None if fit is None else fit.to_dict(),
            "affine_pooled": bool(pooled is not None and fit is pooled),
            "pairs_total": len(plan.pairs),
            "pairs_used": sum(p.used for p in plan.pairs),
            "pairs": [p.to_dict() for p in plan.pairs],
            "blend_refinement_px": None if corrections is None else
            {f"x{t[0]}_y{t[1]}": [float(v) for v in c] for t, c in corrections.items()},
            "tiles": _tile_qc(plan, layout, positions),
            "blocks": stats["blocks"],
            "uncovered_pixels": stats["empty_pixels"],
            "tile_reads": stats["tile_reads"],
            "bytes_read": stats["bytes_read"],
            "weight_solves": stats["weight_solves"],
            "cache_peak_bytes": stats["cache_peak_bytes"],
            "memory_budget_bytes_per_slice": worker_budget,
            "seconds": time.perf_counter() - started,
        }
        return _clean(metrics)

    return run_slice_step(
        STEP_NAME, source, out_dir, process_slice, params, progress=pass2_progress, cancel=cancel,
        units_per_slice=units if to_run else None,
        memory_per_slice_bytes=(lambda path: worker_budget) if to_run else None,
    )
