"""Step 8: slice quality assessment, stamped into ``slice_config.csv``.

Each slice gets three measurements on its average intensity projection (AIP) over a centre ROI: tissue
coverage (fraction above Otsu's threshold), contrast (spread of tissue intensities relative to their level)
and sharpness (mean gradient magnitude relative to the tissue level). A slice's score is its weakest
measurement relative to the median slice (capped at 1): a typical slice scores about 1, and a slice that is
empty, washed out or blurred scores low even when its other measurements look normal. Slices below ``min_quality`` are marked
``auto_excluded``; a manual ``use=false`` is never changed.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
from scipy.ndimage import sobel
from skimage.filters import threshold_otsu

from ..io.atomic import IF_EXISTS_CHOICES, atomic_output, check_can_write
from ..io.omezarr import open_ome_zarr
from ..io.tables import SliceConfigRow, read_slice_config, write_slice_config
from ..params import param, validate_params
from ..slices import find_slice_files

__all__ = ["QualityParams", "QualityResult", "slice_measurements", "assess_quality"]

MEASUREMENTS = ("coverage", "contrast", "sharpness")


@dataclass
class QualityParams:
    """Slice quality scoring and automatic exclusion."""

    min_quality: float = param(0.5, "Slices scoring below this are marked auto_excluded", min=0.0, max=1.0)
    roi_fraction: float = param(0.8, "Side of the centre ROI scored, as a fraction of the slice", min=0.1, max=1.0)
    level: int = param(1, "Pyramid level read (coarser is faster)", min=0, advanced=True)
    if_exists: str = param("error", "Existing outputs: 'error' refuses, 'skip' keeps them, 'overwrite' replaces "
                           "them", choices=IF_EXISTS_CHOICES, advanced=True)


@dataclass
class QualityResult:
    """Scores per slice and the stamped configuration."""

    slice_config_path: Path
    report_path: Path
    scores: dict[int, float] = field(default_factory=dict)
    measurements: dict[int, dict] = field(default_factory=dict)

    @property
    def excluded(self) -> list[int]:
        return sorted(sid for sid, m in self.measurements.items() if m.get("auto_excluded"))


def slice_measurements(aip: np.ndarray) -> dict[str, float]:
    """Coverage, contrast and sharpness of one slice's AIP (see the module docstring)."""
    values = aip[np.isfinite(aip)]
    if values.size == 0 or np.ptp(values) == 0:
        return dict.fromkeys(MEASUREMENTS, 0.0)
    tissue = aip > threshold_otsu(values)
    level = float(np.median(aip[tissue])) if tissue.any() else 0.0
    if level <= 0:
        return dict.fromkeys(MEASUREMENTS, 0.0)
    p10, p90 = np.percentile(aip[tissue], [10, 90])
    gradient = np.hypot(sobel(aip, axis=0), sobel(aip, axis=1))
    return {
        "coverage": float(tissue.mean()),
        "contrast": float((p90 - p10) / level),
        "sharpness": float(gradient[tissue].mean() / level),
    }


def _centre_aip(path: Path, params: QualityParams) -> np.ndarray:
    image = open_ome_zarr(path)
    level = image.levels[min(params.level, len(image.levels) - 1)]
    _, ny, nx = level.shape
    hy, hx = int(ny * params.roi_fraction) // 2, int(nx * params.roi_fraction) // 2
    roi = level[:, ny // 2 - hy : ny // 2 + hy or None, nx // 2 - hx : nx // 2 + hx or None]
    return np.asarray(roi, np.float32).mean(axis=0)


def assess_quality(source, slice_config, out_dir, params: QualityParams | None = None, *, progress=None,
                   cancel=None) -> QualityResult:
    """Step 8: score every slice of ``source`` and write ``out_dir/slice_config.csv`` with ``quality_score``,
    ``auto_excluded`` and ``auto_exclude_reason`` stamped, plus ``quality_report.json``.

    ``slice_config`` is the configuration to start from (manual ``use=false`` kept); slices it does not list
    are added.
    """
    params = params or QualityParams()
    validate_params(params)
    files = find_slice_files(source)
    out_dir = Path(out_dir)
    config_out, report = out_dir / "slice_config.csv", out_dir / "quality_report.json"
    result = QualityResult(config_out, report)
    if not check_can_write(config_out, params.if_exists):
        return result
    measured = {}
    for i, (sid, path) in enumerate(files.items()):
        measured[sid] = slice_measurements(_centre_aip(path, params))
        if progress is not None:
            progress(i + 1, len(files), f"slice {sid}")
        if cancel is not None and cancel.is_set():
            from ..progress import Cancelled

            raise Cancelled("cancelled by the user")
    medians = {m: float(np.median([v[m] for v in measured.values()])) for m in MEASUREMENTS}
    rows = {r.slice_id: r for r in read_slice_config(slice_config)} if slice_config else {}
    for sid, values in measured.items():
        relative = {m: min(1.0, values[m] / medians[m]) if medians[m] > 0 else 0.0 for m in MEASUREMENTS}
        worst = min(relative, key=relative.get)
        score = float(relative[worst])
        row = rows.setdefault(sid, SliceConfigRow(slice_id=sid))
        row.quality_score = round(score, 4)
        row.auto_excluded = score < params.min_quality
        row.auto_exclude_reason = f"quality {score:.2f} < {params.min_quality} (low {worst})" if row.auto_excluded else ""
        result.scores[sid] = score
        result.measurements[sid] = {**values, "relative": relative, "score": score, "auto_excluded": row.auto_excluded}
    out_dir.mkdir(parents=True, exist_ok=True)
    write_slice_config(config_out, [rows[s] for s in sorted(rows)], if_exists="overwrite")
    with atomic_output(report, "overwrite") as tmp:
        Path(tmp).write_text(json.dumps({"params": asdict(params), "medians": medians,
                                         "slices": {str(k): v for k, v in result.measurements.items()}}, indent=2))
    return result
