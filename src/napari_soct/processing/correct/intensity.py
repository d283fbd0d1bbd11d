"""Intensity corrections of stitched slices: beam profile (step 5) and per-slice normalisation (step 7)."""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from pathlib import Path

import numpy as np
from scipy.ndimage import gaussian_filter1d
from skimage.filters import threshold_otsu

from ..params import param
from ..slices import (SliceRunParams, SliceStepResult, find_slice_files, map_slices, run_slice_step,
                      write_in_parts)
from ._slice_io import block_size_for, create_slice_like, iter_blocks, open_slice, sample_pixels, write_blocks

__all__ = [
    "BeamProfileParams",
    "axial_profile",
    "correct_beam_profile",
    "NormalizeParams",
    "slice_reference_level",
    "normalize_slices",
]

GIB = 1024**3


def _tissue_alines(alines: np.ndarray) -> np.ndarray:
    """A-lines (columns of ``(z, n)``) whose mean is above Otsu's threshold of all A-line means."""
    means = alines.mean(axis=0)
    if means.size < 2 or np.ptp(means) == 0:
        return np.ones(means.size, bool)
    return means > threshold_otsu(means)


def axial_profile(alines: np.ndarray, smoothing_samples: float = 3.0) -> tuple[np.ndarray, np.ndarray]:
    """Tissue-averaged axial profile: the median over tissue A-lines per depth, and its smoothed envelope.

    Parameters
    ----------
    alines : ndarray (z, n)
        A sample of A-lines of a slice.
    """
    tissue = alines[:, _tissue_alines(alines)]
    profile = np.median(tissue, axis=1)
    envelope = gaussian_filter1d(profile, smoothing_samples, mode="nearest") if smoothing_samples > 0 else profile
    return profile.astype(np.float32), envelope.astype(np.float32)


# --------------------------------------------------------------------------------------- beam profile (step 5)
@dataclass
class BeamProfileParams(SliceRunParams):
    """Model-free beam profile (PSF and attenuation) correction from the tissue-averaged axial profile."""

    smoothing_samples: float = param(3.0, "Gaussian smoothing of the axial profile, samples", min=0.0)
    max_gain: float = param(10.0, "Largest multiplier applied at any depth", min=1.0)
    sample_alines: int = param(200_000, "A-lines sampled to estimate the profile", min=100, advanced=True)


def _beam_slice(params: BeamProfileParams):
    def process(in_path: Path, out_tmp: Path, tracker) -> dict:
        image = open_slice(in_path)
        data = image.levels[0]
        profile, envelope = axial_profile(sample_pixels(data, params.sample_alines), params.smoothing_samples)
        peak = int(np.argmax(envelope))
        reference = float(envelope[peak])
        # Above the profile's steepest rise lies the medium over the tissue: leave it, do not amplify it.
        surface = int(np.argmax(np.diff(envelope))) + 1 if envelope.size > 1 else 0
        gain = np.ones_like(envelope)
        below = np.arange(envelope.size) >= surface
        gain[below] = reference / np.maximum(envelope[below], reference / params.max_gain)
        gain = np.clip(gain, 1.0 / params.max_gain, params.max_gain).astype(np.float32)
        writer = create_slice_like(out_tmp, image, "beam", extra={"beam_gain": gain.tolist()})
        side = block_size_for(data.shape, int(params.memory_budget_gb * GIB / max(params.workers, 1)), copies=3)
        write_in_parts(partial(write_blocks, in_path, partial(_scaled_block, gain[:, None, None], 0.0), side),
                       out_tmp, writer, tracker, len(list(iter_blocks(data.shape, side))), "soct-beam-part")
        return {"peak_depth_samples": peak, "surface_depth_samples": surface, "max_gain_applied": float(gain.max()),
                "profile": profile.tolist()}

    return process


def _scaled_block(factor, floor: float, data, core) -> np.ndarray:
    """``data``'s block at ``core`` times ``factor`` (a number, or gains broadcast over the block); values
    below ``floor`` after scaling set to zero when ``floor`` > 0."""
    block = np.asarray(data[(slice(None), *core)], np.float32)
    block *= factor
    if floor > 0:
        block[block < floor] = 0
    return block


def _n_blocks(params):
    def units(path):
        shape = open_slice(path).levels[0].shape
        side = block_size_for(shape, int(params.memory_budget_gb * GIB / max(params.workers, 1)), copies=3)
        return len(list(iter_blocks(shape, side)))

    return units


def correct_beam_profile(source, out_dir, params: BeamProfileParams | None = None, *, progress=None,
                         cancel=None) -> SliceStepResult:
    """Step 5: divide out the depth envelope (focus and attenuation) estimated from each slice's tissue.

    Writes ``slice_z{NN}_beam.ome.zarr`` (multiscale) and ``beam_metrics.json`` (profile, peak depth).
    """
    params = params or BeamProfileParams()
    return run_slice_step("beam", source, out_dir, _beam_slice(params), params, progress=progress, cancel=cancel,
                          units_per_slice=_n_blocks(params))


# ------------------------------------------------------------------------------------ normalisation (step 7)
@dataclass
class NormalizeParams(SliceRunParams):
    """Per-slice intensity normalisation to a common tissue level."""

    percentile: float = param(99.0, "Tissue percentile that is matched across slices", min=50.0, max=100.0)
    smooth_sigma: float = param(1.0, "Gaussian smoothing of the per-slice levels across slices (slices)", min=0.0)
    min_scale: float = param(0.2, "Smallest multiplier", min=0.0)
    max_scale: float = param(5.0, "Largest multiplier", min=1.0)
    agarose_floor: float = param(
        0.0, "Values below this fraction of the matched level are set to zero after scaling (agarose floor)",
        min=0.0, max=1.0,
    )
    sample_alines: int = param(200_000, "A-lines sampled per slice for the statistics", min=100, advanced=True)


def slice_reference_level(alines: np.ndarray, percentile: float = 99.0) -> float:
    """Robust upper level of a slice: a percentile of the voxels above Otsu's threshold (tissue)."""
    values = alines[alines > 0]
    if values.size == 0:
        return 0.0
    tissue = values[values > threshold_otsu(values)] if np.ptp(values) > 0 else values
    return float(np.percentile(tissue, percentile))


def _level_of_slice(files: dict, params: NormalizeParams, sid: int) -> float:
    return slice_reference_level(sample_pixels(open_slice(files[sid]).levels[0], params.sample_alines),
                                 params.percentile)


def normalize_slices(source, out_dir, params: NormalizeParams | None = None, *, progress=None,
                     cancel=None) -> SliceStepResult:
    """Step 7: rescale every slice so its tissue percentile matches the median over slices.

    Two passes: the per-slice levels ``q_k`` are measured on sampled A-lines and smoothed across slices
    (``q~_k``); then slice ``k`` is multiplied by ``clip(median(q~) / q~_k, min_scale, max_scale)``.
    Writes ``slice_z{NN}_normalize.ome.zarr`` and ``normalize_metrics.json``.
    """
    params = params or NormalizeParams()
    files = find_slice_files(source)
    measured = map_slices(partial(_level_of_slice, files, params), files, params.workers, "soct-normalize-level",
                          cancel)
    levels = np.array([measured[sid] for sid in files])
    smoothed = gaussian_filter1d(levels, params.smooth_sigma, mode="nearest") if params.smooth_sigma > 0 and len(
        levels) > 1 else levels
    target = float(np.median(smoothed))
    scale = {sid: float(np.clip(target / s, params.min_scale, params.max_scale)) if s > 0 else 1.0
             for sid, s in zip(files, smoothed)}
    level_of = dict(zip(files, levels.tolist()))

    def process(in_path: Path, out_tmp: Path, tracker) -> dict:
        image = open_slice(in_path)
        data = image.levels[0]
        sid = next(s for s, p in files.items() if p == in_path)
        factor = scale[sid]
        floor = params.agarose_floor * target
        writer = create_slice_like(out_tmp, image, "normalize", extra={"normalize_scale": factor})
        side = block_size_for(data.shape, int(params.memory_budget_gb * GIB / max(params.workers, 1)), copies=3)
        write_in_parts(partial(write_blocks, in_path, partial(_scaled_block, np.float32(factor), floor), side),
                       out_tmp, writer, tracker, len(list(iter_blocks(data.shape, side))), "soct-normalize-part")
        return {"level": level_of[sid], "smoothed_level": float(smoothed[list(files).index(sid)]), "scale": factor,
                "target_level": target}

    return run_slice_step("normalize", source, out_dir, process, params, progress=progress, cancel=cancel,
                          units_per_slice=_n_blocks(params))
