"""The backproject step: a straightened volume (e.g. its segmentation) back into the source's voxel space.

The output is computed in z slabs whose size follows ``memory_budget_gb``; each slab pulls its voxels from the
slices whose slabs intersect it (:mod:`.pull`), so peak memory does not depend on the output size. When the
output level is finer than the sliced level, a first pass writes the sliced-level result to a temporary
OME-Zarr and a second pass upsamples it slab by slab.
"""

from __future__ import annotations

import json
import shutil
import time
import uuid
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np

from ..io.atomic import IF_EXISTS_CHOICES, atomic_output, check_can_write
from ..io.images import ImageData, open_image
from ..io.omezarr import create_ome_zarr_image
from ..memory import return_large_buffers_to_os
from ..params import param, validate_params
from ..progress import Progress, ProgressCallback
from .config import CONFIG_SUFFIX, StraightenConfiguration, read_configuration, write_configuration
from .arrays import direct_array
from .geometry import SliceGeometry
from .pull import plan_slabs, pull_block, pull_memory_per_cell
from .straighten import TIFF_COMPRESSIONS

__all__ = ["BackprojectParams", "BackprojectResult", "backproject_volume", "BACKPROJECT_MODES"]

GIB = 1024**3
BACKPROJECT_MODES = ("auto", "intensity", "labels")


@dataclass
class BackprojectParams:
    """Parameters of the backproject step."""

    value_mode: str = param(
        "auto", "'labels': each voxel takes the label with the largest trilinear weight (ids never averaged); "
        "'intensity': trilinear-weighted average; 'auto': labels for integer data, intensity for floats",
        choices=BACKPROJECT_MODES,
    )
    name: str = param("", "Base name of the outputs (<name>-backprojected.tif, ...); empty = the name in the "
                      "configuration")
    output_mip_level: int = param(
        0, "Pyramid level of the output; finer than the sliced level means upsampling", min=0
    )
    upsample_order: int = param(
        1, "Interpolation order of the upsampling to a finer level (labels and binary outputs use 0)", min=0,
        max=5,
    )
    min_bounding_box: bool = param(
        True, "Output only the box around the slices (its offset goes to the TIFF description and to "
        "backprojection_offset in the configuration); off: the whole source extent",
    )
    binary: bool = param(False, "Output 0/1 (uint8): 1 where the backprojected value is non-zero")
    make_single_file: bool = param(True, "One TIFF stack; off: a folder of one TIFF per z plane")
    compression: str = param("zstd", "TIFF compression", choices=TIFF_COMPRESSIONS)
    write_ome_zarr: bool = param(True, "Also write <name>-backprojected.ome.zarr, placed at the offset")
    memory_budget_gb: float = param(2.0, "Peak memory the step may use, in GiB", min=1e-4, unit="GiB")
    workers: int = param(1, "Threads backprojecting in parallel (where slices do not fold over)", min=1,
                         max=256, advanced=True)
    if_exists: str = param(
        "error", "Existing outputs: 'error' refuses, 'skip' keeps them, 'overwrite' replaces them",
        choices=IF_EXISTS_CHOICES,
    )


@dataclass
class BackprojectResult:
    """Products of :func:`backproject_volume`.

    Attributes
    ----------
    offset_zyx : tuple of int
        Output voxel ``(0, 0, 0)`` as a voxel of the source at the output level.
    scale, translate : tuple of float
        Output voxel size and the physical position of voxel ``(0, 0, 0)``, ``(z, y, x)``.
    """

    out_dir: Path
    tiff_path: Path
    zarr_path: Path | None
    config_path: Path
    metrics_path: Path
    shape: tuple[int, int, int]
    offset_zyx: tuple[int, int, int]
    scale: tuple[float, float, float]
    translate: tuple[float, float, float]
    value_mode: str
    binary: bool
    skipped: bool = False
    seconds: float = 0.0
    voxels_swept: int = 0
    notes: list[str] = field(default_factory=list)

    @property
    def kind(self) -> str:
        """``"labels"`` or ``"image"``: how to show the output."""
        return "labels" if self.value_mode == "labels" or self.binary else "image"


def _as_image(straightened) -> ImageData:
    if isinstance(straightened, ImageData):
        return straightened
    if isinstance(straightened, (str, Path)):
        return open_image(straightened)  # files, OME-Zarr, or a folder of per-slice TIFFs
    return ImageData(straightened, (1.0,) * np.ndim(straightened))


class _SliceReader:
    """Reads straightened slices lazily and keeps the last range (consecutive batches share slices);
    thread-safe."""

    def __init__(self, data, dtype):
        import threading

        self.data, self.dtype = data, dtype
        self.cached = (None, None, None)
        self.lock = threading.Lock()

    def __call__(self, start: int, stop: int) -> np.ndarray:
        with self.lock:
            c0, c1, block = self.cached
            if c0 is not None and c0 <= start and stop <= c1:
                return block[start - c0 : stop - c0]
            part = self.data[start:stop]
            part = np.asarray(part.compute() if hasattr(part, "compute") else part).astype(self.dtype, copy=False)
            self.cached = (start, stop, part)
            return part


def _output_box(geometry: SliceGeometry, config: StraightenConfiguration, min_box: bool, notes: list):
    """Output box ``[lo, hi)`` at the sliced level, ``(z, y, x)``."""
    swept_lo, swept_hi = geometry.swept_bounds()
    extent = None
    ours = config.raw.get("napari_soct") or {}
    if ours.get("sliced_shape_zyx"):
        extent = np.asarray(ours["sliced_shape_zyx"], np.int64)
    elif config.source_shape is not None:
        extent = np.asarray(config.source_shape, np.int64)
    if min_box:
        lo = np.maximum(swept_lo, 0)
        hi = swept_hi if extent is None else np.minimum(swept_hi, extent)
    else:
        lo = np.zeros(3, np.int64)
        if extent is None:
            hi = np.maximum(swept_hi, 1)
            notes.append("the source extent is not in the configuration: the full-extent output spans the "
                         "origin to the far corner of the slices")
        else:
            hi = extent
    if (hi <= lo).any():
        raise ValueError(f"{config.path}: the slices lie outside the source volume (box {lo.tolist()} - "
                         f"{hi.tolist()})")
    return lo, hi


def _upsample(block: np.ndarray, factors, order: int, z_keep: slice) -> np.ndarray:
    """Upsample a block by ``factors`` (pixel centres aligned) and keep the fine z planes ``z_keep``."""
    if order == 0:
        # Nearest coarse voxel of each fine voxel centre: exact for any dtype (label ids are never converted).
        out = block
        for axis, f in enumerate(factors):
            n_fine = int(round(block.shape[axis] * f))
            index = np.minimum(((np.arange(n_fine) + 0.5) / f).astype(np.intp), block.shape[axis] - 1)
            if axis == 0:
                index = index[z_keep]
            out = np.take(out, index, axis=axis)
        return out
    from scipy.ndimage import zoom

    fine = zoom(block.astype(np.float32, copy=False), factors, order=order, mode="nearest", grid_mode=True,
                prefilter=order > 1, output=np.float32)
    return fine[z_keep]


def backproject_volume(
    straightened,
    configuration,
    out_dir,
    params: BackprojectParams | None = None,
    *,
    progress: ProgressCallback | None = None,
    cancel=None,
    **overrides,
) -> BackprojectResult:
    """Backproject a straightened volume into the source's voxel space.

    Parameters
    ----------
    straightened : ImageData, array or path
        Slices ``(n, height, width)`` as in the configuration: a layer's data, a TIFF stack, a folder of
        per-slice TIFFs, an OME-Zarr or ``.npy``.
    configuration : path
        ``<name>-configuration.json`` of the straightening (ours or Ouroboros's).
    out_dir : path
        Output folder.
    params : BackprojectParams, optional
        Keyword ``overrides`` replace single fields.

    Returns
    -------
    BackprojectResult
        ``<name>-backprojected.tif`` (or the folder ``<name>-backprojected/`` of per-plane TIFFs named by
        their z index), ``<name>-backprojected.ome.zarr``, the configuration with ``backproject_options`` and
        ``backprojection_offset`` (``"x_min,y_min,z_min"``) and ``<name>-backproject_metrics.json``.
    """
    params = params or BackprojectParams()
    if overrides:
        params = replace(params, **overrides)
    validate_params(params)
    return_large_buffers_to_os()
    started = time.perf_counter()
    config = read_configuration(configuration)
    image = _as_image(straightened)
    where = str(config.path)
    geometry = SliceGeometry.from_rects(config.slice_rects, config.height, config.width,
                                        where=f"{where}: slice_rects")
    expected = (geometry.n_slices, geometry.height, geometry.width)
    if tuple(image.shape) != expected:
        raise ValueError(f"straightened volume '{image.name}' is {tuple(image.shape)}, but {where} describes "
                         f"{expected} (slices, height, width)")
    mode = params.value_mode
    integer = np.issubdtype(image.dtype, np.integer) or image.dtype == bool
    if mode == "auto":
        mode = "labels" if integer else "intensity"
    if mode == "labels" and not integer:
        raise ValueError(f"value_mode='labels' needs integer label data; '{image.name}' is {image.dtype}")
    if params.output_mip_level > config.slice_mip_level:
        raise ValueError(f"output_mip_level={params.output_mip_level} is coarser than the sliced level "
                         f"{config.slice_mip_level}; only upsampling is supported")
    name = params.name.strip() or str((config.raw.get("slice_options") or {}).get("output_file_name") or
                                      config.path.name.removesuffix(CONFIG_SUFFIX).removesuffix(".json"))
    if not name or any(c in name for c in "/\\"):
        raise ValueError(f"parameter 'name': {name!r} is not a valid file name")
    out_dir = Path(out_dir)
    base = f"{name}-backprojected"
    tiff_path = out_dir / (f"{base}.tif" if params.make_single_file else base)
    zarr_path = out_dir / f"{base}.ome.zarr" if params.write_ome_zarr else None
    config_out = out_dir / f"{name}{CONFIG_SUFFIX}"
    updates_input_config = config_out.resolve() == config.path.resolve()
    metrics_path = out_dir / f"{base}_metrics.json"
    notes: list[str] = []

    factors = np.asarray(config.mip_factors(config.slice_mip_level, params.output_mip_level), float)
    coarse_lo, coarse_hi = _output_box(geometry, config, params.min_bounding_box, notes)
    lo = np.round(coarse_lo * factors).astype(np.int64)
    hi = np.round(coarse_hi * factors).astype(np.int64)
    shape = tuple(int(x) for x in hi - lo)
    level_factor = (np.asarray(config.level_factors[params.output_mip_level], float)
                    if params.output_mip_level < len(config.level_factors) else 2.0 ** params.output_mip_level)
    scale = tuple(float(s) for s in np.asarray(config.source_scale) * level_factor)
    translate = tuple(float(t) for t in np.asarray(config.source_translate) + lo * np.asarray(scale))
    offset_xyz = f"{int(lo[2])},{int(lo[1])},{int(lo[0])}"
    binary = params.binary
    out_dtype = np.dtype(np.uint8) if binary else (image.dtype if mode == "labels" else np.dtype(np.float32))
    outputs = [p for p in (tiff_path, zarr_path) if p is not None]
    writes = [check_can_write(p, params.if_exists) for p in outputs]
    if not updates_input_config:
        writes.append(check_can_write(config_out, params.if_exists))
    result = BackprojectResult(out_dir, tiff_path, zarr_path, config_out if not updates_input_config else
                               config.path, metrics_path, shape, tuple(int(x) for x in lo), scale, translate, mode,
                               binary, notes=notes)
    if not any(writes):
        result.skipped = True
        return result

    upsampling = not np.allclose(factors, 1.0)
    order = 0 if (mode == "labels" or binary) else params.upsample_order
    # The configuration, geometry and slab plan stay in memory: under 1 KiB per slice.
    # 20 % is kept for what the model below does not count (library temporaries, zarr's codec pipeline).
    budget = int(0.80 * params.memory_budget_gb * GIB) - 768 * geometry.n_slices
    work_dtype = image.dtype if mode == "labels" else np.dtype(np.float32)
    plan = plan_slabs(geometry)
    h, w = geometry.height, geometry.width

    # Memory: the pull's working set, the slices it reads, and the z slab being built (value + scratch).
    # Each worker holds one batch: its cells and the slices it reads.
    workers = params.workers
    max_cells = int(np.clip(budget // 8 // workers // pull_memory_per_cell, 1024, 1 << 15))
    slice_bytes = h * w * (2 * work_dtype.itemsize + 8)
    max_slices = int(max(3, (budget // 16 // workers) // slice_bytes))
    if slice_bytes * 3 > budget // 3:
        raise ValueError(f"memory_budget_gb={params.memory_budget_gb} is too small for slices of {h} x {w} "
                         f"{work_dtype} pixels ({3 * slice_bytes / GIB:.3g} GiB for three)")
    fixed = workers * (max_cells * pull_memory_per_cell + max_slices * slice_bytes)
    coarse_shape = tuple(int(x) for x in coarse_hi - coarse_lo)
    # Per plane of a slab: its values, the scratch buffer, the output copy and zarr's encoding buffers
    # (about three times a chunk); upsampling also holds the fine planes and a float32 copy.
    plane_bytes = coarse_shape[1] * coarse_shape[2] * (work_dtype.itemsize + 4 + 3 * out_dtype.itemsize)
    if upsampling:
        fine_per_coarse = shape[1] * shape[2] * factors[0]
        plane_bytes = max(plane_bytes, int(fine_per_coarse * (3 * out_dtype.itemsize + 8)
                                           + coarse_shape[1] * coarse_shape[2] * 8))
    tiff_bytes = 2 * shape[1] * shape[2] * out_dtype.itemsize
    room = budget - fixed - tiff_bytes
    if room < plane_bytes:
        raise ValueError(f"memory_budget_gb={params.memory_budget_gb} is too small: one output plane of "
                         f"{shape[1]} x {shape[2]} voxels needs {(fixed + tiff_bytes + plane_bytes) / GIB:.3g} GiB "
                         "with the working buffers; raise memory_budget_gb or use the minimum bounding box")
    slab_planes = int(max(1, min(coarse_shape[0], room // plane_bytes)))
    n_slabs = -(-coarse_shape[0] // slab_planes)
    tracker = Progress(n_slabs * (2 if upsampling else 1), progress, cancel)
    tracker.check()
    reader = _SliceReader(direct_array(image), work_dtype)
    swept = [0]

    def coarse_slabs():
        """The sliced-level output, slab by slab: ``(z0, block)`` in output-box coordinates."""
        scratch = np.empty((slab_planes, coarse_shape[1], coarse_shape[2]), np.int32)
        for z0 in range(0, coarse_shape[0], slab_planes):
            bz = min(slab_planes, coarse_shape[0] - z0)
            # A new block per slab: the writers may still hold the previous one's planes.
            view, scratch_view = np.zeros((bz, coarse_shape[1], coarse_shape[2]), work_dtype), scratch[:bz]
            swept[0] += pull_block(plan, view, coarse_lo + np.array([z0, 0, 0]), reader, mode=mode,
                                   max_cells=max_cells, max_slices=max_slices, scratch=scratch_view,
                                   workers=workers)
            # Count before yielding: the writer stops pulling after the last plane.
            tracker.advance(1, f"planes {z0 + 1}-{z0 + bz} of {coarse_shape[0]}")
            yield z0, ((view != 0).astype(np.uint8) if binary else view)

    out_dir.mkdir(parents=True, exist_ok=True)
    temp_dir = out_dir / f".{base}.coarse-{uuid.uuid4().hex[:8]}.ome.zarr" if upsampling else None
    try:
        if upsampling:
            coarse = create_ome_zarr_image(temp_dir, coarse_shape, (1.0, 1.0, 1.0), chunks=(
                slab_planes, min(coarse_shape[1], 512), min(coarse_shape[2], 512)), dtype=out_dtype,
                compression="zstd")
            for z0, block in coarse_slabs():
                coarse[z0 : z0 + len(block)] = block.astype(out_dtype, copy=False)
            fine_slabs = _fine_slabs(coarse, factors, order, shape, out_dtype, slab_planes, tracker)
        else:
            fine_slabs = ((z0, block.astype(out_dtype, copy=False)) for z0, block in coarse_slabs())
        fine_planes = max(1, int(slab_planes * factors[0])) if upsampling else slab_planes
        _write_outputs(fine_slabs, tiff_path, zarr_path, shape, out_dtype, lo, scale, translate, offset_xyz,
                       params, name, fine_planes)
    finally:
        if temp_dir is not None:
            shutil.rmtree(temp_dir, ignore_errors=True)

    result.seconds = time.perf_counter() - started
    result.voxels_swept = int(swept[0])
    updated = dict(config.raw)
    updated["backproject_options"] = {
        "output_file_folder": str(out_dir),
        "output_file_name": name,
        "flush_cache": False,
        "make_single_file": params.make_single_file,
        "max_ram_gb": params.memory_budget_gb,
        "output_mip_level": params.output_mip_level,
        "straightened_volume_path": str(image.source or image.name),
        "config_path": str(config.path),
        "backproject_min_bounding_box": params.min_bounding_box,
        "make_backprojection_binary": binary,
        "backprojection_compression": params.compression,
        "upsample_order": params.upsample_order,
        "offset_in_name": False,
    }
    updated["backprojection_offset"] = offset_xyz if params.min_bounding_box else None
    updated["backprojected_folder_path"] = str(tiff_path)
    ours = dict(updated.get("napari_soct") or {})
    ours["backprojection"] = {"value_mode": mode, "offset_zyx": [int(x) for x in lo], "shape_zyx": list(shape),
                              "output_mip_level": params.output_mip_level, "scale_zyx": list(scale),
                              "translate_zyx": list(translate), "output": tiff_path.name}
    updated["napari_soct"] = ours
    write_configuration(result.config_path, updated,
                        "overwrite" if updates_input_config or params.if_exists != "error" else "error")
    metrics = {"step": "backproject", "straightened": str(image.source or image.name),
               "configuration": str(config.path), "params": asdict(params), "value_mode": mode,
               "shape_zyx": list(shape), "offset_zyx": [int(x) for x in lo], "voxels": int(np.prod(shape)),
               "voxels_swept": result.voxels_swept, "slab_planes": slab_planes, "seconds": result.seconds,
               "notes": notes}
    with atomic_output(metrics_path, "overwrite") as tmp:
        Path(tmp).write_text(json.dumps(metrics, indent=2, default=str))
    return result


def _fine_slabs(coarse, factors, order: int, shape, out_dtype, slab_planes: int, tracker: Progress):
    """Upsample the coarse result slab by slab, reading each slab's coarse planes plus a margin."""
    fz = factors[0]
    halo = 1 if order <= 1 else 8
    fine_planes = max(1, int(slab_planes * fz))
    for z0 in range(0, shape[0], fine_planes):
        z1 = min(shape[0], z0 + fine_planes)
        c0 = max(0, int(np.floor((z0 + 0.5) / fz - 0.5)) - halo)
        c1 = min(coarse.shape[0], int(np.ceil((z1 - 0.5) / fz - 0.5)) + 1 + halo)
        block = np.asarray(coarse[c0:c1])
        # Fine planes of the upsampled block start at c0 * fz.
        start = int(round(c0 * fz))
        fine = _upsample(block, factors, order, slice(z0 - start, z1 - start))
        if fine.shape[1:] != tuple(shape[1:]):
            fine = fine[:, : shape[1], : shape[2]]
        if order > 0 and np.issubdtype(out_dtype, np.integer):
            info = np.iinfo(out_dtype)
            fine = np.clip(np.rint(fine), info.min, info.max)
        tracker.advance(1, f"upsampled planes {z0 + 1}-{z1} of {shape[0]}")
        yield z0, fine.astype(out_dtype, copy=False)


def _write_outputs(slabs, tiff_path: Path, zarr_path: Path | None, shape, dtype, lo, scale, translate,
                   offset_xyz: str, params: BackprojectParams, name: str, chunk_planes: int) -> None:
    """Stream slabs into the TIFF (single file or per-plane folder) and the OME-Zarr, atomically."""
    import contextlib

    import tifffile
    import zarr

    mode = "overwrite" if params.if_exists != "error" else "error"
    compression = None if params.compression == "none" else params.compression
    description = {"axes": "ZYX", "backprojection_offset_min_xyz": offset_xyz,
                   "offset_zyx": [int(x) for x in lo], "voxel_size_zyx": list(scale),
                   "origin_zyx": list(translate), "name": name}
    with contextlib.ExitStack() as stack:
        tiff_tmp = stack.enter_context(atomic_output(tiff_path, mode))
        array = None
        if zarr_path is not None:
            zarr_tmp = stack.enter_context(atomic_output(zarr_path, mode))
            array = create_ome_zarr_image(
                zarr_tmp, shape, scale, chunks=(min(shape[0], chunk_planes), min(shape[1], 256),
                                                min(shape[2], 256)),
                dtype=dtype, compression="zstd", name=f"{name}-backprojected",
                attributes={"soct_backprojection": description},
            )
            # Place the image in the source's physical space (NGFF: scale, then translation).
            group = zarr.open_group(str(zarr_tmp), mode="r+")
            ome = group.attrs["ome"]
            ome["multiscales"][0]["datasets"][0]["coordinateTransformations"].append(
                {"type": "translation", "translation": [float(t) for t in translate]})
            group.attrs["ome"] = ome
        def planes():
            # Slabs are whole zarr chunks along z (the chunk depth is the slab depth): no partial chunk writes.
            for z0, block in slabs:
                if array is not None and block.any():
                    array[z0 : z0 + len(block)] = block
                yield from block

        if params.make_single_file:
            tifffile.imwrite(tiff_tmp, planes(), shape=shape, dtype=dtype, photometric="minisblack",
                             compression=compression, metadata=description, software="napari-soct", maxworkers=1,
                             bigtiff=int(np.prod(shape)) * np.dtype(dtype).itemsize > 2**31)
        else:
            Path(tiff_tmp).mkdir(parents=True)
            digits = len(str(int(lo[0]) + shape[0] - 1))
            for z, plane in enumerate(planes()):
                tifffile.imwrite(Path(tiff_tmp) / f"{str(int(lo[0]) + z).zfill(digits)}.tif", plane,
                                 photometric="minisblack", compression=compression,
                                 metadata={**description, "z": int(lo[0]) + z}, software="napari-soct")
