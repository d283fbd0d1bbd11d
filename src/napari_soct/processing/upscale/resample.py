"""Label resampling of in-memory blocks: nearest-neighbour gather, area mode, and restrict/relabel tables.

Labels never pass through floating point: the gather copies values, the mode compares and counts them.
"""

from __future__ import annotations

import csv
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .mapping import AxisMap

__all__ = ["LabelMap", "gather_nearest", "weighted_mode", "resample_block", "resample_labels", "read_relabel_csv",
           "parse_label_ids", "LABEL_DTYPES"]

LABEL_DTYPES = ("uint8", "uint16", "uint32", "uint64", "int8", "int16", "int32", "int64")
# Entries (output voxels x candidate source voxels) the mode handles at once: bounds its temporaries (under
# 96 bytes per entry: gathered values, their sort order, sorted copies, weights, cumulative sums).
MODE_BATCH_ENTRIES = 1 << 20


def gather_nearest(src: np.ndarray, index: list[np.ndarray], out: np.ndarray | None = None) -> np.ndarray:
    """``src[ix0][:, ix1][:, :, ix2]`` with 1-D index arrays, in the cheapest order.

    Shrinking axes go first (smaller intermediates), then growing ones from the last axis to the first: the
    gathers along the last axis copy single values and run on the smallest array, the one along the first axis
    copies whole contiguous planes into the output.
    """
    shrink = [a for a in range(src.ndim) if len(index[a]) <= src.shape[a]]
    grow = sorted((a for a in range(src.ndim) if a not in shrink), reverse=True)
    order = shrink + grow
    result = src
    for n, axis in enumerate(order):
        last = n == len(order) - 1
        if len(index[axis]) == result.shape[axis] and np.array_equal(index[axis], np.arange(result.shape[axis])):
            if last and out is not None:
                np.copyto(out, result)
                return out
            continue
        result = np.take(result, index[axis], axis=axis, out=out if last else None, mode="clip")
    if out is not None and result is not out:
        np.copyto(out, result)
        return out
    return np.ascontiguousarray(result)


def weighted_mode(values: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """Per row, the value with the largest summed weight; ties go to the smallest value.

    Parameters
    ----------
    values : ndarray, shape (n, m)
    weights : ndarray of int64, shape (n, m)
    """
    order = np.argsort(values, axis=1, kind="stable")
    v = np.take_along_axis(values, order, axis=1)
    w = np.take_along_axis(weights, order, axis=1)
    n, m = v.shape
    cum = np.cumsum(w, axis=1)
    ends = np.ones((n, m), bool)
    ends[:, :-1] = v[:, 1:] != v[:, :-1]
    starts = np.zeros((n, m), bool)
    starts[:, 0] = True
    starts[:, 1:] = ends[:, :-1]
    first = np.maximum.accumulate(np.where(starts, np.arange(m), 0), axis=1)
    before = np.where(first > 0, np.take_along_axis(cum, np.maximum(first - 1, 0), axis=1), 0)
    score = np.where(ends, cum - before, -1)
    best = np.argmax(score, axis=1)  # first maximum: the smallest value among ties (rows are sorted)
    return v[np.arange(n), best]


def _mode_block(src: np.ndarray, cands: list[tuple[np.ndarray, np.ndarray]], out: np.ndarray) -> np.ndarray:
    """Area mode of ``src`` over per-axis candidate lists (indices relative to ``src``) into ``out``."""
    ndim = src.ndim
    sizes = [c[0].shape[0] for c in cands]
    ms = [c[0].shape[1] for c in cands]
    m = int(np.prod(ms))
    per_row = int(np.prod(sizes[1:])) * m
    step = max(1, MODE_BATCH_ENTRIES // max(per_row, 1))
    for z0 in range(0, sizes[0], step):
        z1 = min(z0 + step, sizes[0])
        idx = [cands[0][0][z0:z1]] + [c[0] for c in cands[1:]]
        v = src
        for axis in range(ndim - 1, -1, -1):
            v = np.take(v, idx[axis].ravel(), axis=axis, mode="clip")
        # (n0*m0, n1*m1, ...) -> (n0, n1, ..., m0, m1, ...) -> (rows, m)
        shape = []
        for a in range(ndim):
            shape += [idx[a].shape[0], ms[a]]
        v = v.reshape(shape).transpose([2 * a for a in range(ndim)] + [2 * a + 1 for a in range(ndim)])
        v = v.reshape(-1, m)
        result = v[:, 0].copy()
        mixed = np.flatnonzero((v != v[:, :1]).any(axis=1))
        if mixed.size:
            coords = np.unravel_index(mixed, [idx[a].shape[0] for a in range(ndim)])
            w = np.ones((mixed.size,) + (1,) * ndim, np.int64)
            for a in range(ndim):
                wa = (cands[a][1][z0:z1] if a == 0 else cands[a][1])[coords[a]]
                w = w * wa.reshape((mixed.size,) + tuple(ms[a] if b == a else 1 for b in range(ndim)))
            result[mixed] = weighted_mode(v[mixed], w.reshape(mixed.size, m))
        out[z0:z1] = result.reshape((z1 - z0,) + tuple(sizes[1:]))
    return out


def resample_block(
    src: np.ndarray,
    src_origin: tuple[int, ...],
    axes: tuple[AxisMap, ...],
    box: tuple[tuple[int, int], ...],
    method: str = "nearest",
    out: np.ndarray | None = None,
) -> np.ndarray:
    """Resample the output box ``[(start, stop), ...]`` from a source block starting at ``src_origin``.

    ``src`` must contain every source voxel the box reads (:meth:`AxisMap.source_range`). ``out`` (optional)
    receives the result and may be larger than the box (edge chunks): the box fills its leading corner and the
    rest repeats the last row of each axis.
    """
    shape = tuple(b - a for a, b in box) if out is None else out.shape
    if out is None:
        out = np.empty(shape, src.dtype)
    if method == "nearest":
        index = []
        for axis, (a, b), o, n in zip(axes, box, src_origin, shape):
            idx = axis.nearest(a, b) - o
            if n > b - a:  # pad past the array edge with the last index
                idx = np.concatenate([idx, np.full(n - (b - a), idx[-1], idx.dtype)])
            index.append(idx)
        return gather_nearest(src, index, out)
    cands = []
    for axis, (a, b), o, n in zip(axes, box, src_origin, shape):
        idx, w = axis.covering(a, b)
        idx = idx - o
        if n > b - a:
            idx = np.concatenate([idx, np.repeat(idx[-1:], n - (b - a), axis=0)])
            w = np.concatenate([w, np.repeat(w[-1:], n - (b - a), axis=0)])
        cands.append((idx, w))
    return _mode_block(src, cands, out)


def resample_labels(labels, out_shape: tuple[int, ...], method: str = "nearest", ratios=None) -> np.ndarray:
    """Resample a whole in-memory label array to ``out_shape`` (``ratios`` default ``n_in / n_out``).

    The reference implementation for small arrays; :func:`~napari_soct.processing.upscale.upscale_labels` does
    the same block by block for volumes of any size.
    """
    from fractions import Fraction

    labels = np.asarray(labels)
    if ratios is None:
        ratios = [Fraction(n, o) for n, o in zip(labels.shape, out_shape)]
    axes = tuple(AxisMap(n, o, r) for n, o, r in zip(labels.shape, out_shape, ratios))
    return resample_block(labels, (0,) * labels.ndim, axes, tuple((0, o) for o in out_shape), method)


def parse_label_ids(text: str) -> np.ndarray:
    """Label ids from ``"1,5,7"`` or a file (one id per line, or the first CSV column; a header is skipped)."""
    text = str(text).strip()
    if not text:
        return np.array([], np.uint64)
    path = Path(text)
    if os.sep in text or path.suffix.lower() in (".csv", ".txt", ".tsv") or path.is_file():
        if not path.is_file():
            raise FileNotFoundError(f"keep_labels: {path}: no such file")
        rows = [r for r in csv.reader(path.read_text().splitlines(), delimiter="\t" if path.suffix == ".tsv" else ",")
                if r and r[0].strip()]
        values = []
        for n, r in enumerate(rows):
            try:
                values.append(int(r[0].strip()))
            except ValueError:
                if n == 0:  # header
                    continue
                raise ValueError(f"keep_labels: {path} line {n + 1}: {r[0]!r} is not an integer label id") from None
        return np.unique(np.array(values, dtype=object).astype(np.uint64)) if values else np.array([], np.uint64)
    try:
        values = [int(v) for v in text.replace(" ", ",").split(",") if v]
    except ValueError:
        raise ValueError(f"keep_labels: {text!r} is neither a comma-separated list of label ids nor a file") from None
    if any(v < 0 for v in values):
        raise ValueError(f"keep_labels: label ids must be >= 0, got {text!r}")
    return np.unique(np.array(values, dtype=np.uint64))


def read_relabel_csv(path) -> dict[int, int]:
    """Relabel table from a CSV file with two integer columns ``old,new`` (a header line is allowed)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"relabel: {path}: no such file")
    table = {}
    for n, row in enumerate(csv.reader(path.read_text().splitlines())):
        if not row or not "".join(row).strip() or row[0].lstrip().startswith("#"):
            continue
        if len(row) < 2:
            raise ValueError(f"relabel: {path} line {n + 1}: expected 'old,new', got {','.join(row)!r}")
        try:
            old, new = int(row[0].strip()), int(row[1].strip())
        except ValueError:
            if n == 0:
                continue  # header
            raise ValueError(f"relabel: {path} line {n + 1}: {','.join(row)!r} are not integer label ids") from None
        if old in table and table[old] != new:
            raise ValueError(f"relabel: {path} line {n + 1}: label {old} is mapped twice")
        table[old] = new
    return table


@dataclass
class LabelMap:
    """Restrict to a subset of label ids and/or relabel, then cast to the output dtype; applied per block.

    Attributes
    ----------
    keep : ndarray of uint64, optional
        Sorted source ids to keep; every other id becomes 0. Applied before ``relabel``.
    relabel : dict, optional
        ``{old: new}``; ids not in the table keep their value.
    dtype : numpy dtype
        Output dtype; a value that does not fit raises ValueError.
    """

    src_dtype: np.dtype
    dtype: np.dtype
    keep: np.ndarray | None = None
    relabel: dict | None = None

    def __post_init__(self):
        self.src_dtype, self.dtype = np.dtype(self.src_dtype), np.dtype(self.dtype)
        for d, what in ((self.src_dtype, "labels"), (self.dtype, "output dtype")):
            if d.kind not in "ui":
                raise ValueError(f"{what} must be an integer type (labels are never floats), got {d}")
        self._keys = self._values = None
        if self.relabel:
            keys = sorted(self.relabel)
            info = np.iinfo(self.dtype)
            bad = [v for v in self.relabel.values() if not info.min <= v <= info.max]
            if bad:
                raise ValueError(f"relabel: new id {bad[0]} does not fit the output dtype {self.dtype}; "
                                 "choose a wider dtype")
            src_info = np.iinfo(self.src_dtype)
            keys = [k for k in keys if src_info.min <= k <= src_info.max]  # ids the labels cannot hold
            self._keys = np.array(keys, dtype=self.src_dtype)
            self._values = np.array([self.relabel[k] for k in keys], dtype=self.dtype)
        if self.keep is not None:
            info = np.iinfo(self.src_dtype)
            keep = np.asarray(self.keep, dtype=np.uint64)
            keep = keep[keep <= np.uint64(info.max)] if info.max < 2**64 - 1 else keep
            self._keep = np.unique(keep).astype(self.src_dtype)

    @property
    def identity(self) -> bool:
        return self.keep is None and not self.relabel and self.dtype == self.src_dtype

    def __call__(self, block: np.ndarray) -> np.ndarray:
        if self.identity:
            return block
        if self.keep is None and not self.relabel:
            return self._cast(block)
        # The source block is small (the output is an upscaled copy): map its distinct ids only.
        ids, inverse = np.unique(block, return_inverse=True)
        kept = np.ones(len(ids), bool) if self.keep is None else np.isin(ids, self._keep, assume_unique=True)
        hit = np.zeros(len(ids), bool)
        pos = None
        if self._keys is not None and len(self._keys):
            pos = np.minimum(np.searchsorted(self._keys, ids), len(self._keys) - 1)
            hit = (self._keys[pos] == ids) & kept
        plain = kept & ~hit
        new = np.zeros(len(ids), self.dtype)
        new[plain] = self._cast(ids[plain])
        if pos is not None:
            new[hit] = self._values[pos[hit]]
        return new[inverse.reshape(block.shape)]

    def _cast(self, values: np.ndarray) -> np.ndarray:
        if values.dtype == self.dtype:
            return values
        info = np.iinfo(self.dtype)
        if values.size:
            lo, hi = values.min(), values.max()
            if int(lo) < info.min or int(hi) > info.max:
                bad = int(hi) if int(hi) > info.max else int(lo)
                raise ValueError(f"label {bad} does not fit the output dtype {self.dtype}; choose a wider dtype")
        return values.astype(self.dtype)
