"""Galvo return band: find the fly-back A-lines in a raw tile and the roll that moves them to the end.

During the galvo fly-back the camera keeps recording ``n_extra`` A-lines per B-scan. They should be the last
A-lines of each B-scan but can sit at any circular offset; they show as a dark (sometimes bright) band of
exactly ``n_extra`` A-lines in the tile's average intensity projection. The band start is the position where
two strong steps of the A-line profile sit exactly ``n_extra`` apart; a confidence in [0, 1] says how clearly
the band differs from the tissue around it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from scipy.ndimage import median_filter

__all__ = ["GalvoDetection", "GalvoDecision", "detect_galvo_band", "decide_galvo_shift", "band_confidence"]

# Confidence = weighted sum of: mean relative contrast of the band against its neighbours, fraction of row
# groups where that contrast is significant, and depth of the significant contrast (saturating at 30 %).
CONTRAST_WEIGHT, SIGNIFICANT_WEIGHT, DEPTH_WEIGHT = 0.40, 0.35, 0.25
SIGNIFICANT_CONTRAST = 0.10
FULL_DEPTH_CONTRAST = 0.30
MAX_ROW_GROUPS = 20
MIN_INFORMATIVE_CONFIDENCE = 0.3


@dataclass(frozen=True)
class GalvoDetection:
    """Galvo band found in one tile.

    Attributes
    ----------
    band_start : int
        First A-line of the band in the raw B-scan (``0 <= band_start < nx + n_extra``).
    shift : int
        Circular roll of the A-line axis that moves the band to ``[nx, nx + n_extra)``.
    confidence : float
        In [0, 1]; how clearly the band differs from its surroundings.
    """

    band_start: int
    shift: int
    confidence: float


@dataclass(frozen=True)
class GalvoDecision:
    """Per-slice galvo decision, stamped into ``slice_config.csv``.

    Attributes
    ----------
    shift : int
        Roll applied to every tile of the slice (0 when not applied).
    band_start : int
        Detected band start of the best tile.
    confidence : float
        Best tile confidence times ``sqrt(n_consistent / n_sampled)``.
    applied : bool
        True when ``confidence >= threshold``.
    n_sampled, n_consistent : int
        Tiles examined, and confident tiles agreeing with the chosen band start.
    """

    shift: int
    band_start: int
    confidence: float
    applied: bool
    n_sampled: int
    n_consistent: int


def band_confidence(aip: np.ndarray, band_start: int, width: int) -> float:
    """Confidence that A-lines ``[band_start, band_start + width)`` (circular) form a galvo band.

    Parameters
    ----------
    aip : ndarray, shape (n_bscans, n_alines)
        Average intensity projection of a raw tile (before crop).
    band_start, width : int
        Candidate band.
    """
    n_rows, n_alines = aip.shape
    if width <= 0 or 3 * width > n_alines:
        return 0.0
    band = (band_start + np.arange(width)) % n_alines
    before = (band_start - width + np.arange(width)) % n_alines
    after = (band_start + width + np.arange(width)) % n_alines
    groups = np.array_split(np.arange(n_rows), min(MAX_ROW_GROUPS, n_rows))
    band_mean = np.array([aip[np.ix_(g, band)].mean() for g in groups])
    left = np.array([aip[np.ix_(g, before)].mean() for g in groups])
    right = np.array([aip[np.ix_(g, after)].mean() for g in groups])
    # Ignore row groups without signal around the band (empty agarose, outside the sample).
    around = np.minimum(left, right)
    keep = around > 0.05 * around.max() if around.max() > 0 else np.zeros_like(around, bool)
    if not keep.any():
        return 0.0
    # The band must differ from both neighbours in the same direction (darker or brighter than both):
    # a bright stretch beside a dark tissue boundary is not a band.
    drop_left = (left[keep] - band_mean[keep]) / left[keep]
    drop_right = (right[keep] - band_mean[keep]) / right[keep]
    same_side = np.sign(drop_left) == np.sign(drop_right)
    contrast = np.where(same_side, np.minimum(np.abs(drop_left), np.abs(drop_right)), 0.0)
    contrast = np.minimum(contrast, 1.0)
    significant = contrast > SIGNIFICANT_CONTRAST
    c_contrast = float(contrast.mean())
    c_significant = float(significant.mean())
    c_depth = float(min(1.0, contrast[significant].mean() / FULL_DEPTH_CONTRAST)) if significant.any() else 0.0
    confidence = CONTRAST_WEIGHT * c_contrast + SIGNIFICANT_WEIGHT * c_significant + DEPTH_WEIGHT * c_depth
    if c_significant < 0.5:
        # A band seen in only a few row groups is more likely tissue structure than the fly-back.
        confidence = min(confidence, 0.3 * c_significant)
    return float(np.clip(confidence, 0.0, 1.0))


def detect_galvo_band(aip: np.ndarray, nx: int, n_extra: int) -> GalvoDetection:
    """Find the galvo band in the average intensity projection of one raw tile.

    Parameters
    ----------
    aip : ndarray, shape (n_bscans, nx + n_extra)
        Mean over depth of the raw tile, all A-lines kept.
    nx, n_extra : int
        Kept and fly-back A-lines per B-scan.

    Returns
    -------
    GalvoDetection
    """
    n_alines = nx + n_extra
    if aip.ndim != 2 or aip.shape[1] != n_alines:
        raise ValueError(f"aip must have shape (n_bscans, {n_alines}), got {aip.shape}")
    if n_extra == 0:
        return GalvoDetection(band_start=nx, shift=0, confidence=0.0)
    profile = aip.mean(axis=0)
    if n_extra >= 5:
        profile = median_filter(profile, size=5, mode="wrap")
    step = np.abs(np.roll(profile, -1) - profile)  # step[i] = |p[i+1] - p[i]| (circular)
    score = step * np.roll(step, -n_extra)  # two steps exactly n_extra apart: entry and exit of the band
    band_start = (int(np.argmax(score)) + 1) % n_alines
    return GalvoDetection(
        band_start=band_start,
        shift=(nx - band_start) % n_alines,
        confidence=band_confidence(aip, band_start, n_extra),
    )


def decide_galvo_shift(
    detections: Sequence[GalvoDetection], threshold: float = 0.6
) -> GalvoDecision:
    """Combine the detections of a few tiles of one slice into one decision for the whole slice.

    Tiles vote for a band start with their confidence; the winning start's best confidence is penalised by
    ``sqrt(n_consistent / n_informative)``, where ``n_consistent`` counts the tiles that found it, and the fix
    is applied when the result reaches ``threshold``. Tiles whose own confidence is below
    ``MIN_INFORMATIVE_CONFIDENCE`` (a band lost against dark agarose at the sample edge) do not vote.
    """
    informative = [d for d in detections if d.confidence >= MIN_INFORMATIVE_CONFIDENCE]
    if not informative:
        return GalvoDecision(shift=0, band_start=-1, confidence=0.0, applied=False, n_sampled=len(detections),
                             n_consistent=0)
    votes: dict[int, float] = {}
    for d in informative:
        votes[d.band_start] = votes.get(d.band_start, 0.0) + d.confidence
    winner = max(votes, key=votes.get)
    agreeing = [d for d in informative if d.band_start == winner]
    best = max(agreeing, key=lambda d: d.confidence)
    n_consistent = len(agreeing)
    confidence = best.confidence * float(np.sqrt(n_consistent / len(informative)))
    applied = confidence >= threshold
    return GalvoDecision(
        shift=best.shift if applied else 0,
        band_start=best.band_start,
        confidence=confidence,
        applied=applied,
        n_sampled=len(detections),
        n_consistent=n_consistent,
    )
