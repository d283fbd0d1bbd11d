"""Benchmark: the per-pixel tissue surface of the interface crop on the bench slices, plain against robust fit.

The crop (step 6) runs on beam-corrected slices, where the depth gain makes deep structures bright; in A-lines
whose surface is faint (agarose) the steepest rise can then be a deep structure. For every slice of a folder of
beam outputs (``bench_reconstruct.py`` leaves them in ``<data>/bench-chain/beam``) this reports, over the
slice's tissue pixels, the spread of the per-pixel crop start and the A-lines started more than 10 samples
below the fitted surface, with the plain least-squares surface fit and with the robust one (the default), and
the time of each fit.

Usage::

    python benchmarks/bench_interface.py --data bench_data
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
from scipy.ndimage import median_filter

from napari_soct.processing.correct.interface import (
    InterfaceCropParams,
    _tissue_weight,
    detect_interface,
    fit_quadratic_surface,
    surface_outliers,
)
from napari_soct.processing.io.omezarr import open_ome_zarr


def crop_starts(depth, tissue, dz_um: float, params: InterfaceCropParams, robust: bool):
    """The per-pixel crop start as the step computes it, with the robust fit or the plain one (``robust``
    False: the former rule, fitted surface only where no surface is visible)."""
    fitted, _ = fit_quadratic_surface(depth, tissue.astype(np.float32), min_outlier_samples=3.0 if robust else None)
    if robust:
        outlier = surface_outliers(depth, fitted, tissue, params.max_surface_step_um / dz_um)
        surface = median_filter(np.where(tissue & ~outlier, depth, fitted), size=params.surface_smoothing_px,
                                mode="nearest")
    else:
        surface = np.where(tissue, median_filter(depth, size=params.surface_smoothing_px, mode="nearest"), fitted)
    return np.floor(surface), fitted


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", default="bench_data")
    parser.add_argument("--beam-dir", default=None, help="folder of slice_z*_beam.ome.zarr (default: "
                        "<data>/bench-chain/beam)")
    args = parser.parse_args()
    beam_dir = Path(args.beam_dir or Path(args.data) / "bench-chain" / "beam")
    params = InterfaceCropParams()
    print("| slice | fit | fit s | crop start spread over tissue (samples) | start 0.1 / 50 / 99.9 % | A-lines > 10 "
          "samples below the fit | fitted surface range |")
    print("|---|---|---|---|---|---|---|")
    for path in sorted(beam_dir.glob("slice_z*_beam.ome.zarr")):
        image = open_ome_zarr(path)
        dz_um = image.scales_mm[0][0] * 1e3
        depth, strength = detect_interface(np.asarray(image.levels[0][...], np.float32), params.sigma_xy,
                                           params.sigma_z)
        tissue = _tissue_weight(strength) > 0
        for robust in (False, True):
            start = time.perf_counter()
            starts, fitted = crop_starts(depth, tissue, dz_um, params, robust)
            seconds = time.perf_counter() - start
            pct = " / ".join(f"{v:.0f}" for v in np.percentile(starts[tissue], [0.1, 50, 99.9]))
            deep = int((starts > fitted + 10)[tissue].sum())
            print(f"| {path.name.split('_')[1]} | {'robust' if robust else 'plain'} | {seconds:.2f} | "
                  f"{np.ptp(starts[tissue]):.0f} | {pct} | {deep} | {np.ptp(fitted):.1f} |")


if __name__ == "__main__":
    main()
