"""Step 13: auto-exclusion of slices inside clusters of consecutive poor pairwise registrations.

A pair of consecutive slices (a row of ``pairwise_registration.csv``, step 12) is *poor* when it is not
``verified`` by hand and

- its status is ``error``, or
- its ``z_match_ncc`` is below ``min_z_corr`` or its ``ncc_after`` below ``min_ncc`` (absolute floors), or
- DBSCAN puts it outside the main cluster of registrations and it is worse than that cluster on at least one
  metric (lower ``ncc_after``, larger translation, lower ``z_match_ncc``).

DBSCAN (``eps``, ``min_samples``; written here with numpy) runs on the per-pair metrics ``ncc_after``,
translation magnitude ``hypot(tx_px, ty_px)`` and ``z_match_ncc``, each centred on its median and divided by
``max(1.4826 * MAD, floor)`` (floors 0.05 NCC, 1 px, 0.05 NCC: a stack of near-identical good pairs does not
turn small differences into outliers). The main cluster is the largest one (ties: the better median
``ncc_after``); with no cluster (fewer pairs than ``min_samples``, or all scattered) only the first two rules
apply.

Run-length rule: ``min_consecutive`` or more poor pairs in a row (each pair's moving slice is the next pair's
fixed slice) form a cluster; the slices inside it (those whose pairs on both sides are poor: the moving
slices of all but its last pair) are marked ``auto_excluded`` with a reason such as
``"registration cluster 3-4 (pairs 2->3 .. 4->5): ncc_after 0.04, z_match_ncc 0.02"``. A single poor pair
excludes nothing: which of its two slices is bad cannot be told (for the same reason the first and last slice
of the stack, which have one pair each, are never excluded here). Manual ``use=false`` is never changed, and
an earlier ``auto_excluded`` (step 8) is kept, the reasons joined.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from ..io.atomic import IF_EXISTS_CHOICES, atomic_output, check_can_write
from ..io.tables import SliceConfigRow, read_slice_config, write_slice_config
from ..params import param, validate_params
from ..progress import Cancelled
from .transforms import PairTransform, read_pairwise_registration

__all__ = ["ExclusionParams", "ExclusionResult", "auto_exclude_slices", "dbscan", "poor_pairs"]

FEATURES = ("ncc_after", "translation_px", "z_match_ncc")
FEATURE_FLOORS = (0.05, 1.0, 0.05)


@dataclass
class ExclusionParams:
    """Auto-exclusion of clusters of consecutive poor registrations."""

    min_consecutive: int = param(2, "Poor pairs in a row that make a cluster (its inner slices are excluded)", min=2)
    min_z_corr: float = param(0.05, "A pair whose z-match NCC is below this is poor (noise level; related slices "
                              "reach 0.15-0.7 depending on contrast)", min=-1.0, max=1.0)
    min_ncc: float = param(0.2, "A pair whose NCC after registration is below this is poor", min=-1.0, max=1.0)
    eps: float = param(3.0, "DBSCAN neighbourhood radius, in robust standard deviations of the metrics", min=1e-6,
                       advanced=True)
    min_samples: int = param(3, "DBSCAN: pairs within eps (itself included) that make a core pair", min=1,
                             advanced=True)
    if_exists: str = param("error", "Existing outputs: 'error' refuses, 'skip' keeps them, 'overwrite' replaces "
                           "them", choices=IF_EXISTS_CHOICES, advanced=True)


@dataclass
class ExclusionResult:
    """Outputs of :func:`auto_exclude_slices`.

    Attributes
    ----------
    clusters : list of dict
        Per cluster: ``pairs`` ``[[fixed, moving], ...]``, ``excluded`` slice ids, ``reason``.
    poor : dict
        ``{(fixed_id, moving_id): why}`` for every poor pair.
    """

    slice_config_path: Path
    report_path: Path
    excluded: list[int] = field(default_factory=list)
    clusters: list[dict] = field(default_factory=list)
    poor: dict = field(default_factory=dict)
    skipped: bool = False


def dbscan(points: np.ndarray, eps: float, min_samples: int) -> np.ndarray:
    """Density-based clustering (DBSCAN, Ester et al. 1996) of ``points`` ``(n, d)``.

    A point with at least ``min_samples`` points (itself included) within Euclidean distance ``eps`` is a core
    point; clusters are the core points connected through such neighbourhoods plus the non-core points within
    ``eps`` of one of them (given to the first cluster that reaches them).

    Returns
    -------
    labels : ndarray of int
        Cluster index per point (0, 1, ... in order of discovery), -1 for noise.
    """
    points = np.asarray(points, dtype=float)
    n = len(points)
    labels = np.full(n, -1, dtype=int)
    if n == 0:
        return labels
    distances = np.sqrt(((points[:, None, :] - points[None, :, :]) ** 2).sum(axis=-1))
    neighbours = [np.flatnonzero(row <= eps) for row in distances]
    core = np.array([len(nb) >= min_samples for nb in neighbours])
    cluster = 0
    for start in range(n):
        if labels[start] != -1 or not core[start]:
            continue
        labels[start] = cluster
        frontier = [start]
        while frontier:
            point = frontier.pop()
            for other in neighbours[point]:
                if labels[other] == -1:
                    labels[other] = cluster
                    if core[other]:
                        frontier.append(other)
        cluster += 1
    return labels


def _features(pairs: list[PairTransform]) -> np.ndarray:
    return np.array([[p.ncc_after, math.hypot(p.tx_px, p.ty_px), p.z_match_ncc] for p in pairs], dtype=float)


def poor_pairs(pairs: list[PairTransform], params: ExclusionParams) -> tuple[dict[int, str], dict]:
    """Which pairs (by row index) are poor, and why; plus the clustering details for the report."""
    params = params or ExclusionParams()
    values = _features(pairs)
    finite = np.isfinite(values).all(axis=1) & np.array([p.status != "error" for p in pairs], bool)
    why: dict[int, str] = {}
    for i, p in enumerate(pairs):
        reasons = []
        if p.status == "error":
            reasons.append("registration error")
        elif not finite[i]:
            reasons.append("metrics missing")
        else:
            if p.z_match_ncc < params.min_z_corr:
                reasons.append(f"z_match_ncc {p.z_match_ncc:.2f} < {params.min_z_corr}")
            if p.ncc_after < params.min_ncc:
                reasons.append(f"ncc_after {p.ncc_after:.2f} < {params.min_ncc}")
        if reasons:
            why[i] = "; ".join(reasons)
    details: dict = {"labels": [None] * len(pairs), "main_cluster": None, "scale": None, "centre": None}
    index = np.flatnonzero(finite)
    if index.size:
        x = values[index]
        centre = np.median(x, axis=0)
        scale = np.maximum(1.4826 * np.median(np.abs(x - centre), axis=0), FEATURE_FLOORS)
        labels = dbscan((x - centre) / scale, params.eps, params.min_samples)
        details.update(centre=centre.tolist(), scale=scale.tolist())
        for i, label in zip(index, labels):
            details["labels"][int(i)] = int(label)
        clusters = [c for c in set(labels.tolist()) if c >= 0]
        if clusters:
            def rank(c):
                members = x[labels == c]
                return (len(members), float(np.median(members[:, 0])))

            main = max(clusters, key=rank)
            details["main_cluster"] = int(main)
            members = x[labels == main]
            worst_ncc, largest_shift, worst_z = members[:, 0].min(), members[:, 1].max(), members[:, 2].min()
            for i, label, (ncc, shift, z_ncc) in zip(index, labels, x):
                if label == main:
                    continue
                worse = []
                if ncc < worst_ncc:
                    worse.append(f"ncc_after {ncc:.2f}")
                if shift > largest_shift:
                    worse.append(f"translation {shift:.1f} px")
                if z_ncc < worst_z:
                    worse.append(f"z_match_ncc {z_ncc:.2f}")
                if worse:
                    text = "outlier (DBSCAN): " + ", ".join(worse)
                    why[int(i)] = f"{why[int(i)]}; {text}" if int(i) in why else text
    for i, p in enumerate(pairs):
        if (p.verified or p.manual) and i in why:  # a pair checked or set by hand is trusted
            del why[i]
    return why, details


def _runs(pairs: list[PairTransform], poor: set[int]) -> list[list[int]]:
    """Runs of consecutive poor rows (a row continues the previous one when its fixed slice is the previous
    row's moving slice)."""
    runs, current = [], []
    for i, p in enumerate(pairs):
        chained = current and pairs[current[-1]].moving_id == p.fixed_id and current[-1] == i - 1
        if i in poor and (chained or not current):
            current.append(i)
        elif i in poor:
            runs.append(current)
            current = [i]
        else:
            if current:
                runs.append(current)
            current = []
    if current:
        runs.append(current)
    return runs


def auto_exclude_slices(registration_csv, slice_config, out_dir, params: ExclusionParams | None = None, *,
                        progress=None, cancel=None) -> ExclusionResult:
    """Step 13: mark the slices inside clusters of consecutive poor registrations ``auto_excluded``.

    Parameters
    ----------
    registration_csv : path
        ``pairwise_registration.csv`` (step 12).
    slice_config : path or ""
        ``slice_config.csv`` to stamp (manual ``use=false`` and earlier exclusions kept); slices it does not list
        are added (empty: a new configuration of the registered slices).
    out_dir : path
        Receives ``slice_config.csv`` and ``auto_exclude_report.json``.
    """
    params = params or ExclusionParams()
    validate_params(params)
    started = time.perf_counter()
    out_dir = Path(out_dir)
    config_out, report_path = out_dir / "slice_config.csv", out_dir / "auto_exclude_report.json"
    result = ExclusionResult(config_out, report_path)
    if not check_can_write(config_out, params.if_exists):
        result.skipped = True
        result.excluded = sorted(r.slice_id for r in read_slice_config(config_out) if r.auto_excluded)
        return result
    registration_csv = Path(registration_csv)
    if not registration_csv.is_file():
        raise FileNotFoundError(f"{registration_csv}: no such file (pairwise_registration.csv from step 12)")
    if slice_config and not Path(slice_config).is_file():
        raise FileNotFoundError(f"{slice_config}: no such file (slice_config.csv to stamp)")
    pairs = read_pairwise_registration(registration_csv)
    rows = {r.slice_id: r for r in read_slice_config(slice_config)} if slice_config else {}
    if cancel is not None and cancel.is_set():
        raise Cancelled("cancelled by the user")

    why, details = poor_pairs(pairs, params)
    excluded: dict[int, str] = {}
    for run in _runs(pairs, set(why)):
        if len(run) < params.min_consecutive:
            continue
        first, last = pairs[run[0]], pairs[run[-1]]
        inside = [pairs[i].moving_id for i in run[:-1]]
        if not inside:
            continue
        worst = min((pairs[i] for i in run), key=lambda p: (p.ncc_after if np.isfinite(p.ncc_after) else -2.0))
        metric = (f"ncc_after {worst.ncc_after:.2f}, z_match_ncc {worst.z_match_ncc:.2f}"
                  if worst.status != "error" else "registration error")
        span = f"{inside[0]}-{inside[-1]}" if len(inside) > 1 else f"{inside[0]}"
        reason = (f"registration cluster {span} (pairs {first.fixed_id}->{first.moving_id} .. "
                  f"{last.fixed_id}->{last.moving_id}): {metric}")
        result.clusters.append({"pairs": [[pairs[i].fixed_id, pairs[i].moving_id] for i in run],
                                "excluded": inside, "reason": reason,
                                "why": {f"{pairs[i].fixed_id}->{pairs[i].moving_id}": why[i] for i in run}})
        for sid in inside:
            excluded[sid] = reason

    for sid in sorted({p.fixed_id for p in pairs} | {p.moving_id for p in pairs}):
        rows.setdefault(sid, SliceConfigRow(slice_id=sid))
    for sid, reason in excluded.items():
        row = rows[sid]
        if not row.use:
            continue  # a manual exclusion stays as the user wrote it
        if row.auto_excluded and row.auto_exclude_reason and reason not in row.auto_exclude_reason:
            row.auto_exclude_reason = f"{row.auto_exclude_reason}; {reason}"
        else:
            row.auto_exclude_reason = reason
        row.auto_excluded = True
        result.excluded.append(sid)
    result.excluded.sort()
    result.poor = {(pairs[i].fixed_id, pairs[i].moving_id): text for i, text in sorted(why.items())}
    if progress is not None:
        progress(1, 1, f"{len(result.excluded)} slice(s) auto-excluded")

    out_dir.mkdir(parents=True, exist_ok=True)
    n_poor = len(why)
    report = {
        "params": asdict(params),
        "registration_csv": str(registration_csv),
        "slice_config": str(slice_config),
        "features": list(FEATURES),
        "feature_centre": details["centre"],
        "feature_scale": details["scale"],
        "main_cluster": details["main_cluster"],
        "pairs": [{"fixed_id": p.fixed_id, "moving_id": p.moving_id, "status": p.status,
                   **{k: _finite(v) for k, v in zip(FEATURES, _features([p])[0].tolist())},
                   "dbscan_label": details["labels"][i], "poor": i in why, "why": why.get(i, "")}
                  for i, p in enumerate(pairs)],
        "clusters": result.clusters,
        "excluded": result.excluded,
        "seconds": round(time.perf_counter() - started, 3),
        "warnings": ([f"{n_poor} of {len(pairs)} pairs are poor: check min_z_corr / min_ncc against this data"]
                     if pairs and n_poor > len(pairs) / 2 else []),
    }
    write_slice_config(config_out, [rows[s] for s in sorted(rows)], if_exists="overwrite")
    with atomic_output(report_path, "overwrite") as tmp:
        Path(tmp).write_text(json.dumps(report, indent=2))
    return result


def _finite(value: float):
    return value if math.isfinite(value) else None
