"""Sample data: synthetic S-OCT acquisitions with ground truth (made once, then reused from the cache)."""

from __future__ import annotations

import os
from pathlib import Path

import dask.array as da

from ._layers import contrast_limits_of, raw_acquisition_layers


def _cache_dir() -> Path:
    root = os.environ.get("NAPARI_SOCT_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "napari-soct")
    return Path(root) / "samples"


def _sample(preset: str, seed: int = 0) -> list[tuple]:
    from .processing.synthetic import SyntheticAcquisition, make_acquisition

    out = _cache_dir() / f"{preset}-seed{seed}"
    done = out / ".complete"
    if done.exists():
        acq = SyntheticAcquisition.load(out)
    else:
        import shutil

        shutil.rmtree(out, ignore_errors=True)  # an interrupted earlier attempt
        acq = make_acquisition(out, preset=preset, seed=seed)
        done.touch()
    layers = raw_acquisition_layers(acq.raw_dir)
    truth = acq.true_volume
    vz, vy, vx = acq.voxel_size_um
    truth_scale = getattr(acq, "true_volume_voxel_size_um", None) or (vz, vy, vx)
    layers.append(
        (
            da.from_zarr(truth),
            {
                "name": f"{preset} ground truth volume",
                "scale": tuple(v * 1e-3 for v in truth_scale),
                "units": ("mm", "mm", "mm"),
                "contrast_limits": contrast_limits_of(truth[truth.shape[0] // 2]),
                "visible": False,
                "metadata": {"source": str(acq.truth_dir)},
            },
            "image",
        )
    )
    return layers


def sample_tiny():
    """The ``tiny`` synthetic acquisition (seconds to make)."""
    return _sample("tiny")


def sample_small():
    """The ``small`` synthetic acquisition (the demo's)."""
    return _sample("small")
