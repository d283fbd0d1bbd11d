"""Tomography on stacks: images -> sinograms (``radon``) and sinograms -> images (``fbp``, ``sart``), slice by
slice in parallel threads under a memory budget, into OME-Zarr. These are the steps of the command line and
of the napari widgets.

A 2-D input is one slice. A 3-D input is ``(slice, y, x)`` for ``radon`` and ``(slice, detector, angle)`` for
reconstruction (TIFF, zarr, OME-Zarr or ``.npy``, read one slice at a time). Sinograms are written with axes
``(detector, angle)`` (plus ``z`` first for stacks), the angle axis in degrees, and the angles themselves in
the ``tomography`` attributes, so a reconstruction finds them without being told.
"""

from __future__ import annotations

import json
import math
import os
import re
import threading
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import zarr

from ..io.atomic import IF_EXISTS_CHOICES, atomic_output, check_can_write
from ..io.images import ImageData, open_image
from ..io.omezarr import COMPRESSION_CHOICES, create_ome_zarr_image
from ..memory import return_large_buffers_to_os
from ..params import param, validate_params
from ..progress import Cancelled, Progress, ProgressCallback
from ..slices import StopFlag, map_in_threads
from ._backend import BACKEND_CHOICES, array_module, default_threads, to_numpy
from .angles import default_angles, parse_angles, uniform_step
from .filters import FILTER_CHOICES, filter_length
from .projectors import BACKPROJECT_STEPS, FORWARD_STEPS
from .sart import SartGeometry, iradon_sart
from .transforms import circle_sinogram_length, fbp_output_size, iradon, radon

__all__ = [
    "RadonParams",
    "FbpParams",
    "ReconstructParams",
    "TomographyResult",
    "radon_stack",
    "fbp_stack",
    "reconstruct_stack",
    "memory_per_slice",
    "METHOD_CHOICES",
]

GIB = 1024**3
METHOD_CHOICES = ("fbp", "sart")
_ANGLES_HELP = (
    "Projection angles in degrees: 'start:stop:count' (stop excluded, e.g. '0:180:180') or a list "
    "'0,1.5,3,...'"
)


@dataclass
class _RunParams:
    """How a tomography step runs (not what it computes)."""

    backend: str = param("auto", "Where to compute: 'auto' uses a CUDA GPU through CuPy when there is one, "
                         "'cpu' never does", choices=BACKEND_CHOICES, advanced=True)
    workers: int = param(2, "Slices processed in parallel (at most; the memory budget may allow fewer)",
                         min=1, max=256, advanced=True)
    memory_budget_gb: float = param(4.0, "Peak memory the step may use, in GiB", min=1e-6, unit="GiB",
                                    advanced=True)
    compression: str = param("blosc-lz4", "Compression of the output", choices=COMPRESSION_CHOICES, advanced=True)
    if_exists: str = param(
        "error", "Existing output: 'error' refuses, 'skip' keeps it (resume), 'overwrite' replaces it",
        choices=IF_EXISTS_CHOICES, advanced=True,
    )


@dataclass
class RadonParams(_RunParams):
    """Parameters of the forward projection (image -> sinogram)."""

    angles: str = param("0:180:180", _ANGLES_HELP, unit="deg")
    circle: bool = param(True, "The image is zero outside its inscribed circle: the sinogram is as wide as the "
                         "image (otherwise the image is padded to its diagonal)")


@dataclass
class FbpParams(_RunParams):
    """Parameters of filtered back projection (sinogram -> image)."""

    angles: str = param("auto", _ANGLES_HELP + "; 'auto': the angles stored with the sinogram, or evenly "
                        "spaced over [0, 180)", unit="deg")
    filter: str = param("ramp", "Filter of the back projection ('none': unfiltered)", choices=FILTER_CHOICES)
    circle: bool = param(True, "Reconstruct the inscribed circle only (as for a sinogram made with circle=True)")
    output_size: int = param(0, "Side of the reconstruction in pixels; 0: the detector count (circle) or "
                             "detectors / sqrt(2)", min=0, max=1 << 16, advanced=True)


@dataclass
class ReconstructParams(FbpParams):
    """Parameters of a reconstruction by filtered back projection or SART."""

    method: str = param("fbp", "'fbp': filtered back projection (fast, one pass); 'sart': algebraic "
                        "reconstruction (iterations, relaxation)", choices=METHOD_CHOICES)
    iterations: int = param(1, "SART: passes over all projections", min=1, max=1000)
    relaxation: float = param(0.15, "SART: update step (values near 1 are unstable)", min=1e-6, max=2.0)


@dataclass
class TomographyResult:
    """What a tomography step wrote.

    Attributes
    ----------
    step : str
    path : Path
        The OME-Zarr image written (or kept, ``skipped``).
    shape : tuple of int
    angles : list of float
        Projection angles in degrees.
    """

    step: str
    path: Path
    metrics_path: Path
    shape: tuple[int, ...]
    angles: list[float] = field(repr=False)
    n_slices: int
    seconds: float = 0.0
    workers_used: int = 1
    threads_per_worker: int = 1
    backend: str = "cpu"
    peak_memory_estimate_bytes: int = 0
    skipped: bool = False
    notes: list[str] = field(default_factory=list)


# --- inputs and outputs ---------------------------------------------------------------------------------

def _as_image(data, default_name: str) -> ImageData:
    if isinstance(data, ImageData):
        return data
    if isinstance(data, str | os.PathLike):
        return open_image(data)
    array = data
    return ImageData(array, (1.0,) * array.ndim, default_name)


def _safe_name(name: str, default: str) -> str:
    cleaned = re.sub(r"[^A-Za-z0-9_.-]+", "_", name or "").strip("._")
    return cleaned or default


def _read_slice(data, index: int | None) -> np.ndarray:
    block = data if index is None else data[index]
    if hasattr(block, "compute"):  # dask: compute this slice here, not in dask's own thread pool
        block = block.compute(scheduler="synchronous")
    return np.asarray(to_numpy(block))


def _stored_angles(image: ImageData) -> list | None:
    meta = (image.metadata or {}).get("tomography")
    if isinstance(meta, dict) and meta.get("angles_deg") is not None:
        return list(meta["angles_deg"])
    return None


def _angles_for(spec: str, n_angles: int, image: ImageData | None = None) -> np.ndarray:
    if spec.strip().lower() in ("", "auto"):
        stored = _stored_angles(image) if image is not None else None
        if stored is not None and len(stored) == n_angles:
            return np.asarray(stored, dtype=np.float64)
        return default_angles(n_angles)
    return parse_angles(spec, n_angles)


def _write_axes(path: Path, axes: list[dict], translation: list[float] | None) -> None:
    """Replace the NGFF axes (types and units: the angle axis is in degrees) and add a translation."""
    group = zarr.open_group(str(path), mode="r+")
    ome = dict(group.attrs["ome"])
    ms = dict(ome["multiscales"][0])
    ms["axes"] = axes
    if translation is not None and any(translation):
        ds = dict(ms["datasets"][0])
        ds["coordinateTransformations"] = [*ds["coordinateTransformations"],
                                           {"type": "translation", "translation": translation}]
        ms["datasets"] = [ds, *ms["datasets"][1:]]
    ome["multiscales"] = [ms, *ome["multiscales"][1:]]
    group.attrs["ome"] = ome


# --- memory -----------------------------------------------------------------------------------------------

def memory_per_slice(step: str, slice_shape: tuple[int, int], n_angles: int, *, output_size: int | None = None,
                     circle: bool = True, threads: int = 1) -> int:
    """Upper bound of the bytes one slice worker holds (measured with tracemalloc in the tests).

    Parameters
    ----------
    step : {"radon", "fbp", "sart"}
    slice_shape : (int, int)
        Image ``(y, x)`` for radon, sinogram ``(detectors, angles)`` otherwise.
    n_angles : int
    output_size : int, optional
        Reconstruction side (FBP).
    circle : bool
    threads : int
        Threads inside the worker (each back projection thread has its own accumulator).

    Notes
    -----
    The slice as read (float64 at most) plus the largest phase: for FBP the filtering (the FFT of every
    projection) or the back projection (four accumulator channels per thread, the lookup tables of one
    angle, the vectorised blocks, the final symmetric grid and its crop); for radon the symmetric grid, one
    strip of lookup tables for four symmetries and the rays; for SART the geometry, the padded estimate and
    the vectorised blocks.
    """
    block = 1 << 15
    slice_in = 8 * slice_shape[0] * slice_shape[1]
    if step == "radon":
        side = min(slice_shape) if circle else math.ceil(math.sqrt(2.0) * max(slice_shape))
        work = math.ceil(math.sqrt(2.0) * side) if circle else side  # content outside the circle: padded
        grid = 2 * (work // 2) + 1
        rows = max(1, min(grid, 32, block // work))
        wide = grid + 2 * (rows + 3)
        images = 4 * grid * grid  # the symmetric grid (the symmetries are views of it)
        table = rows * wide * FORWARD_STEPS * 4 * 4
        sino = 4 * work * n_angles * 3  # rays of every angle, the sinogram and its transpose
        working = threads * block * (8 + 16 + 16)
        need = slice_in + images + table + sino + working
    elif step == "fbp":
        n_det = slice_shape[0]
        length = circle_sinogram_length(n_det) if circle else n_det
        fft = filter_length(length)
        size = output_size or fbp_output_size(n_det, circle)
        grid = 2 * (size // 2) + 1
        filtering = 4 * n_det * n_angles + n_angles * ((fft // 2 + 1) * 8 + fft * 4 + 2 * length * 4)
        per_table = (min(length, grid + 1) + 4) * BACKPROJECT_STEPS
        per_chunk = max(1, min(n_angles, 4 * block // (per_table * 4)))  # angles whose tables are held at once
        elements = min(block, per_chunk * grid * grid)  # one vectorised block
        per_thread = 4 * 4 * grid * grid + per_chunk * per_table * 4 * 4 + elements * (8 + 16 + 16)
        backprojection = 4 * n_angles * length + threads * per_thread + 2 * 4 * grid * grid
        need = slice_in + max(filtering, backprojection)
    elif step == "sart":
        n, n_det = slice_shape[0], slice_shape[0]
        geometry = 4 * n_angles * n_det + 4 * n * n + 2 * 8 * n * n  # norms, radii, the grids they come from
        working = 4 * (n + 8) ** 2 + 2 * 8 * n * n + 16 * 8 * max(block, 8 * n)
        need = slice_in + 4 * n_det * n_angles + geometry + working
    else:
        raise ValueError(f"unknown step {step!r}")
    return int(1.25 * need) + (256 << 10)


def _plan_workers(params, n_slices: int, need) -> tuple[int, int, int]:
    """(workers, threads per worker, bytes per worker) within the memory budget."""
    budget = int(params.memory_budget_gb * GIB)
    cores = default_threads()
    for workers in range(max(1, min(params.workers, n_slices)), 0, -1):
        threads = max(1, cores // workers)
        per = need(threads)
        if workers * per <= budget:
            return workers, threads, per
    per = need(1)
    if per <= budget:
        return 1, 1, per
    raise ValueError(
        f"memory_budget_gb={params.memory_budget_gb} is below the {per / GIB:.3f} GiB one slice needs; "
        "raise memory_budget_gb"
    )


# --- the runner -------------------------------------------------------------------------------------------

def _run(step: str, source: ImageData, out_path: Path, params, *, out_slice_shape, n_slices: int,
         compute, need, scale_out, axes_out, attributes: dict, progress, cancel, angles) -> TomographyResult:
    started = time.perf_counter()
    metrics_path = out_path.with_name(out_path.name.removesuffix(".ome.zarr") + "_metrics.json")
    stacked = source.ndim == 3
    out_shape = ((n_slices,) if stacked else ()) + tuple(out_slice_shape)
    if not check_can_write(out_path, params.if_exists):
        return TomographyResult(step, out_path, metrics_path, out_shape, [float(a) for a in angles], n_slices,
                                skipped=True, notes=["output kept (if_exists='skip')"])
    xp = array_module(params.backend)
    gpu = xp is not np
    if gpu:
        workers, threads, per = 1, 1, need(1)
    else:
        workers, threads, per = _plan_workers(params, n_slices, need)
    return_large_buffers_to_os()
    stop = StopFlag(cancel)
    tracker = Progress(n_slices, progress, stop)
    tracker.check()
    chunk_yx = tuple(min(s, 2048) for s in out_slice_shape)
    chunks = ((1,) if stacked else ()) + chunk_yx
    out_path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_output(out_path, "overwrite" if params.if_exists == "overwrite" else "error") as tmp:
        array = create_ome_zarr_image(
            tmp, out_shape, tuple(s for s, _ in scale_out), chunks=chunks, compression=params.compression,
            name=out_path.name.removesuffix(".ome.zarr"), attributes=attributes, axes=tuple(a["name"] for a in axes_out),
        )
        _write_axes(tmp, axes_out, [t for _, t in scale_out])
        indices = list(range(n_slices)) if stacked else [None]

        def one(index):
            if stop.is_set():
                raise Cancelled("cancelled by the user")
            data = _read_slice(source.data, index)
            result = compute(data, xp, threads, stop)
            if index is None:
                array[...] = to_numpy(result)
            else:
                array[index] = to_numpy(result)
            tracker.advance(1, f"{step}: slice {index if index is not None else 0} done")

        map_in_threads(one, indices, workers, stop, f"soct-{step}")
    seconds = time.perf_counter() - started
    result = TomographyResult(
        step=step, path=out_path, metrics_path=metrics_path, shape=out_shape, angles=[float(a) for a in angles],
        n_slices=n_slices, seconds=seconds, workers_used=workers, threads_per_worker=threads,
        backend="cuda" if gpu else "cpu", peak_memory_estimate_bytes=workers * per,
    )
    record = {
        "step": step,
        "source": str(source.source) if source.source else source.name,
        "input_shape": list(source.shape),
        "output": str(out_path),
        "params": asdict(params),
        **{k: v for k, v in asdict(result).items() if k not in ("path", "metrics_path", "step")},
    }
    with atomic_output(metrics_path, "overwrite") as tmp:
        Path(tmp).write_text(json.dumps(record, indent=2, default=str))
    return result


def _check_ndim(image: ImageData, what: str) -> None:
    if image.ndim not in (2, 3):
        raise ValueError(f"{image.name or what}: need a 2-D {what} or a 3-D stack of them, got shape {image.shape}")


def radon_stack(image, out_dir, params: RadonParams | None = None, *, progress: ProgressCallback | None = None,
                cancel=None, **overrides) -> TomographyResult:
    """Sinograms of an image or of every slice of a ``(slice, y, x)`` stack, into ``<name>_sinogram.ome.zarr``.

    Parameters
    ----------
    image : ImageData, path or array
    out_dir : path
    params : RadonParams, optional
        Keyword ``overrides`` replace single fields.
    progress, cancel
        ``progress(done, total, message)``; ``cancel.is_set()`` stops between slices (no partial output).

    Returns
    -------
    TomographyResult
    """
    params = replace(params or RadonParams(), **overrides)
    validate_params(params)
    image = _as_image(image, "image")
    _check_ndim(image, "image")
    angles = parse_angles(params.angles)
    ny, nx = image.shape[-2:]
    if min(ny, nx) < 2:
        raise ValueError(f"{image.name or 'image'}: slices of {ny} x {nx} pixels are too small")
    n_det = min(ny, nx) if params.circle else math.ceil(math.sqrt(2.0) * max(ny, nx))
    n_slices = image.shape[0] if image.ndim == 3 else 1
    pixel = float(image.scale[-1]) if image.scale else 1.0
    step_deg = uniform_step(angles)
    axes = [{"name": "detector", "type": "space", "unit": "millimeter"},
            {"name": "angle", "type": "angle", "unit": "degree"}]
    scale = [(pixel, 0.0), (step_deg or 1.0, float(angles[0]) if step_deg else 0.0)]
    if image.ndim == 3:
        axes = [{"name": "z", "type": "space", "unit": "millimeter"}, *axes]
        scale = [(float(image.scale[0]), 0.0), *scale]
    attributes = {"tomography": {"kind": "sinogram", "angles_deg": [float(a) for a in angles],
                                 "circle": params.circle, "source": image.name,
                                 "source_shape_yx": [int(ny), int(nx)], "pixel_size_mm": pixel}}
    name = _safe_name(image.name, "image")

    def compute(data, xp, threads, stop):
        return radon(xp.asarray(data), angles, params.circle, preserve_range=True, threads=threads)

    def need(threads):
        return memory_per_slice("radon", (ny, nx), len(angles), circle=params.circle, threads=threads)

    return _run("radon", image, Path(out_dir) / f"{name}_sinogram.ome.zarr", params,
                out_slice_shape=(n_det, len(angles)), n_slices=n_slices, compute=compute, need=need,
                scale_out=scale, axes_out=axes, attributes=attributes, progress=progress, cancel=cancel,
                angles=angles)


def reconstruct_stack(sinograms, out_dir, params: ReconstructParams | None = None, *,
                      progress: ProgressCallback | None = None, cancel=None, **overrides) -> TomographyResult:
    """Reconstruct a sinogram ``(detector, angle)`` or a stack ``(slice, detector, angle)`` by filtered back
    projection or SART, into ``<name>_<method>.ome.zarr`` (axes ``y, x``, or ``z, y, x``).

    Parameters
    ----------
    sinograms : ImageData, path or array
    out_dir : path
    params : ReconstructParams, optional
        Keyword ``overrides`` replace single fields.
    progress, cancel
        ``progress(done, total, message)``; ``cancel.is_set()`` stops between slices and SART iterations.

    Returns
    -------
    TomographyResult
    """
    params = replace(params or ReconstructParams(), **overrides)
    validate_params(params)
    image = _as_image(sinograms, "sinogram")
    _check_ndim(image, "sinogram")
    n_det, n_angles = image.shape[-2:]
    if n_det < 2 or n_angles < 1:
        raise ValueError(f"{image.name or 'sinogram'}: {n_det} detectors x {n_angles} angles is too small")
    angles = _angles_for(params.angles, n_angles, image)
    method = params.method
    if method == "fbp":
        size = params.output_size or fbp_output_size(n_det, params.circle)
        out_shape = (size, size)
    else:
        size = n_det
        crop = fbp_output_size(n_det, False) if not params.circle else n_det
        out_shape = (crop, crop)
    n_slices = image.shape[0] if image.ndim == 3 else 1
    pixel = float(image.scale[-2]) if len(image.scale) >= 2 else 1.0
    axes = [{"name": "y", "type": "space", "unit": "millimeter"}, {"name": "x", "type": "space", "unit": "millimeter"}]
    scale = [(pixel, 0.0), (pixel, 0.0)]
    if image.ndim == 3:
        axes = [{"name": "z", "type": "space", "unit": "millimeter"}, *axes]
        scale = [(float(image.scale[0]), 0.0), *scale]
    settings = {"method": method, "angles_deg": [float(a) for a in angles], "circle": params.circle,
                "source": image.name}
    if method == "fbp":
        settings.update(filter=params.filter, output_size=size)
    else:
        settings.update(iterations=params.iterations, relaxation=params.relaxation)
    name = _safe_name(image.name, "sinogram").removesuffix("_sinogram")
    geometry_cache: dict = {}
    geometry_lock = threading.Lock()

    def sart_geometry(xp):
        with geometry_lock:  # one geometry for every slice
            if xp not in geometry_cache:
                geometry_cache[xp] = SartGeometry(n_det, angles, None, xp)
            return geometry_cache[xp]

    def compute(data, xp, threads, stop):
        sino = xp.asarray(data, dtype=xp.float32)
        if method == "fbp":
            return iradon(sino, angles, size, params.filter, circle=params.circle, threads=threads)
        geometry = sart_geometry(xp)
        estimate = None
        for _ in range(params.iterations):
            if stop.is_set():
                raise Cancelled("cancelled by the user")
            estimate = iradon_sart(sino, angles, estimate, relaxation=params.relaxation, dtype=np.float32,
                                   geometry=geometry, threads=threads)
        if out_shape[0] != n_det:  # circle=False: the image of the padded square's centre
            start = n_det // 2 - out_shape[0] // 2
            estimate = estimate[start : start + out_shape[0], start : start + out_shape[0]]
        return estimate

    def need(threads):
        return memory_per_slice(method, (n_det, n_angles), n_angles, output_size=size, circle=params.circle,
                                threads=threads)

    return _run(method, image, Path(out_dir) / f"{name}_{method}.ome.zarr", params,
                out_slice_shape=out_shape, n_slices=n_slices, compute=compute,
                need=need, scale_out=scale, axes_out=axes,
                attributes={"tomography": {"kind": "reconstruction", **settings}},
                progress=progress, cancel=cancel, angles=angles)


def fbp_stack(sinograms, out_dir, params: FbpParams | None = None, *, progress: ProgressCallback | None = None,
              cancel=None, **overrides) -> TomographyResult:
    """Filtered back projection of a sinogram or a stack of them (see :func:`reconstruct_stack`)."""
    params = replace(params or FbpParams(), **overrides)
    validate_params(params)
    full = ReconstructParams(**asdict(params), method="fbp")
    return reconstruct_stack(sinograms, out_dir, full, progress=progress, cancel=cancel)
