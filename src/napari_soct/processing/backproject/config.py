"""The ``<name>-configuration.json`` of a straightened volume, in the layout Ouroboros uses.

Keys read and written (Ouroboros's names):

* ``slice_rects``: ``(n, 4, 3)`` slice corners ``[x, y, z]`` in source voxels (top-left, top-right,
  bottom-right, bottom-left; see :mod:`.geometry`);
* ``volume_cache``: ``{"bounding_boxes": [{"x_min", "x_max", "y_min", "y_max", "z_min", "z_max"}, ...],
  "link_rects": [box index per slice], "cv": {"source_url"}, "mip", "flush_cache"}``;
* ``slice_options``: ``slice_width``, ``slice_height``, ``dist_between_slices``, ``output_file_folder``,
  ``output_file_name``, ``output_mip_level``, ``make_single_file``, ... ;
* ``backproject_options``: the options of the last backprojection (``None`` until then);
* ``backprojection_offset``: ``"x_min,y_min,z_min"`` of the minimum bounding box of the last backprojection;
* ``sample_points``, ``source_url``, ``output_file_path``, ``config_file_path``, ``json_path``,
  ``backprojected_folder_path``.

``link_rects`` is also accepted at the top level. Our own additions live under ``"napari_soct"`` (source
shape, voxel size and origin, pyramid levels, value mode); files without it (written by Ouroboros) are read
with voxel units and an unknown source extent.

An image (or napari layer) knows its configuration through its metadata (:func:`configuration_from_metadata`):
``metadata["soct_configuration"]`` (a path; set by the widgets), or the ``soct_straighten`` attributes of a
straightened OME-Zarr (the configuration's file name, next to ``metadata["source"]``).
:func:`save_straightened` writes a straightened volume (or a segmentation of it) as TIFF with a copy of its
configuration that names the new files.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..io.atomic import atomic_output

__all__ = ["StraightenConfiguration", "read_configuration", "write_configuration", "bounding_boxes_for",
           "CONFIG_SUFFIX", "CONFIG_METADATA_KEY", "configuration_from_metadata", "check_configuration_shape",
           "save_straightened"]

CONFIG_SUFFIX = "-configuration.json"
CONFIG_METADATA_KEY = "soct_configuration"


@dataclass
class StraightenConfiguration:
    """A straightened volume's slicing record.

    Attributes
    ----------
    slice_rects : ndarray (n, 4, 3)
        Corners ``[x, y, z]`` in source voxels at the sliced level.
    width, height : int
        Slice size in pixels.
    bounding_boxes : list of dict
        Ouroboros bounding boxes (``x_min`` ... ``z_max``, voxels).
    link_rects : list of int
        Bounding box of each slice.
    slice_mip_level : int
        Pyramid level of the source that was sliced.
    source_url : str
    source_shape : tuple of int, optional
        Source ``(z, y, x)`` shape at level 0 (None when unknown).
    source_scale, source_translate : tuple of float
        Voxel size and origin of level 0, physical ``(z, y, x)`` (1 and 0 when unknown).
    level_factors : list of tuple
        Per pyramid level, its voxel size over level 0's, ``(z, y, x)``; empty when unknown.
    raw : dict
        The whole file (kept so that unknown keys survive a rewrite).
    path : Path, optional
    """

    slice_rects: np.ndarray
    width: int
    height: int
    bounding_boxes: list = field(default_factory=list)
    link_rects: list = field(default_factory=list)
    slice_mip_level: int = 0
    source_url: str = ""
    source_shape: tuple | None = None
    source_scale: tuple = (1.0, 1.0, 1.0)
    source_translate: tuple = (0.0, 0.0, 0.0)
    level_factors: list = field(default_factory=list)
    raw: dict = field(default_factory=dict)
    path: Path | None = None

    @property
    def n_slices(self) -> int:
        return len(self.slice_rects)

    def mip_factors(self, from_level: int, to_level: int) -> tuple[float, float, float]:
        """How many voxels of level ``to_level`` one voxel of ``from_level`` spans, per axis ``(z, y, x)``.

        From the recorded pyramid when known, else 2 per level along every axis.
        """
        levels = self.level_factors
        if levels and max(from_level, to_level) < len(levels):
            f, t = np.asarray(levels[from_level], float), np.asarray(levels[to_level], float)
            return tuple(float(x) for x in f / t)
        return (2.0 ** (from_level - to_level),) * 3


def bounding_boxes_for(slice_rects: np.ndarray, slices_per_box: int = 128) -> tuple[list[dict], list[int]]:
    """Bounding boxes of consecutive groups of slices (Ouroboros layout) and each slice's box index."""
    boxes, links = [], []
    for index, start in enumerate(range(0, len(slice_rects), slices_per_box)):
        group = slice_rects[start : start + slices_per_box]
        lo, hi = group.reshape(-1, 3).min(axis=0), group.reshape(-1, 3).max(axis=0)
        boxes.append({f"{axis}_{end}": float(value) for end, values in (("min", lo), ("max", hi))
                      for axis, value in zip("xyz", values)})
        links.extend([index] * len(group))
    # Keep Ouroboros's key order (x_min, x_max, y_min, ...).
    boxes = [{k: b[k] for k in ("x_min", "x_max", "y_min", "y_max", "z_min", "z_max")} for b in boxes]
    return boxes, links


def _require(mapping: dict, key: str, where: str):
    if not isinstance(mapping, dict) or key not in mapping or mapping[key] is None:
        raise ValueError(f"{where}: missing '{key}'")
    return mapping[key]


def read_configuration(path: str | os.PathLike) -> StraightenConfiguration:
    """Read a configuration file (ours or Ouroboros's).

    Raises
    ------
    FileNotFoundError
    ValueError
        If it is not JSON or lacks ``slice_rects`` / slice size, naming the file and the key.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such configuration file")
    try:
        raw = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{path}: not a JSON configuration file ({err})") from None
    if not isinstance(raw, dict):
        raise ValueError(f"{path}: a configuration file holds a JSON object")
    rects = np.asarray(_require(raw, "slice_rects", str(path)), dtype=np.float64)
    # Keep the per-slice lists as arrays (a few bytes per number instead of a Python float each).
    raw["slice_rects"] = rects
    if raw.get("sample_points") is not None:
        try:
            raw["sample_points"] = np.asarray(raw["sample_points"], dtype=np.float64)
        except (TypeError, ValueError):
            pass
    if rects.ndim != 3 or rects.shape[1:] != (4, 3):
        raise ValueError(f"{path}: 'slice_rects' must be (n, 4, 3) corners [x, y, z], got shape {rects.shape}")
    options = raw.get("slice_options") or {}
    ours = raw.get("napari_soct") or {}
    width = int(_require(options, "slice_width", f"{path}: slice_options"))
    height = int(_require(options, "slice_height", f"{path}: slice_options"))
    cache = raw.get("volume_cache") or {}
    boxes = list(cache.get("bounding_boxes") or [])
    links = list(cache.get("link_rects") or raw.get("link_rects") or [])
    if links and len(links) != len(rects):
        raise ValueError(f"{path}: 'link_rects' has {len(links)} entries for {len(rects)} slices")
    for i, box in enumerate(boxes):
        missing = [k for k in ("x_min", "x_max", "y_min", "y_max", "z_min", "z_max") if k not in box]
        if missing:
            raise ValueError(f"{path}: volume_cache.bounding_boxes[{i}] lacks {', '.join(missing)}")
    source_url = raw.get("source_url") or (cache.get("cv") or {}).get("source_url") or ""
    shape = ours.get("source_shape_zyx")
    return StraightenConfiguration(
        slice_rects=rects,
        width=width,
        height=height,
        bounding_boxes=boxes,
        link_rects=[int(x) for x in links],
        slice_mip_level=int(options.get("output_mip_level", cache.get("mip") or 0) or 0),
        source_url=str(source_url),
        source_shape=tuple(int(s) for s in shape) if shape else None,
        source_scale=tuple(float(s) for s in ours.get("source_scale_zyx", (1.0, 1.0, 1.0))),
        source_translate=tuple(float(s) for s in ours.get("source_translate_zyx", (0.0, 0.0, 0.0))),
        level_factors=[tuple(float(x) for x in f) for f in ours.get("level_factors_zyx", [])],
        raw=raw,
        path=path,
    )


def write_configuration(path: str | os.PathLike, data: dict, if_exists: str = "error") -> Path:
    """Write a configuration dictionary atomically as JSON."""
    path = Path(path)
    with atomic_output(path, if_exists) as tmp:
        Path(tmp).write_text(json.dumps(data, indent=1, default=_json_default))
    return path


def _json_default(value):
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


def configuration_from_metadata(metadata: dict | None) -> Path | None:
    """The configuration file that an image's (or napari layer's) metadata names, or None.

    ``metadata["soct_configuration"]`` (a path) comes first; else the ``soct_straighten`` attributes of a
    straightened OME-Zarr (``{"configuration": "<name>-configuration.json"}``, written next to it) resolved
    against ``metadata["source"]``. The file is not checked to exist.
    """
    metadata = metadata or {}
    explicit = metadata.get(CONFIG_METADATA_KEY)
    if explicit:
        return Path(explicit)
    straightened = metadata.get("soct_straighten") or {}
    source = metadata.get("source")
    if isinstance(straightened, dict) and straightened.get("configuration") and source:
        return Path(source).parent / str(straightened["configuration"])
    return None


def check_configuration_shape(config: StraightenConfiguration, shape, what: str) -> None:
    """Raise ValueError, naming ``what`` and the file, unless ``shape`` is the ``(slices, height, width)`` that
    ``config`` describes."""
    expected = (config.n_slices, config.height, config.width)
    if tuple(int(s) for s in shape) != expected:
        raise ValueError(f"{what} is {tuple(shape)}, but {config.path} describes {expected} (slices, height, "
                         "width)")


def save_straightened(
    tiff_path: str | os.PathLike,
    data,
    configuration: str | os.PathLike,
    *,
    name: str | None = None,
    value_mode: str | None = None,
    compression: str = "zstd",
    if_exists: str = "error",
    memory_budget_gb: float = 1.0,
    tiff_options: dict | None = None,
    source_name: str = "",
) -> tuple[Path, Path]:
    """Write a straightened volume (or a segmentation of it) as a TIFF stack plus ``<name>-configuration.json``.

    The configuration is a copy of ``configuration`` whose output fields name the new files
    (``output_file_path``, ``config_file_path``, ``slice_options.output_file_folder`` and
    ``output_file_name``, ``json_path``; the previous backprojection's fields are cleared), so that
    ``napari-soct backproject <tiff> <configuration>`` works on the pair.

    Parameters
    ----------
    tiff_path : path
        The TIFF to write; the configuration goes next to it.
    data : array-like
        ``(slices, height, width)``, as ``configuration`` describes (read block by block).
    configuration : path
        The straightening's configuration (ours or Ouroboros's).
    name : str, optional
        Base name of the pair (``<name>-configuration.json``); default: the TIFF's name without extension.
    value_mode : {"intensity", "labels"}, optional
        Recorded in the configuration (a segmentation painted on an intensity volume is ``"labels"``).
    compression, if_exists, memory_budget_gb
        As for :func:`napari_soct.processing.io.writers.save_tiff`.
    tiff_options : dict, optional
        More :func:`~napari_soct.processing.io.writers.save_tiff` keywords (``scale``, ``translate``,
        ``units``, ``axes``, ``name``: the physical metadata of the TIFF).
    source_name : str
        What the data are (a layer name), for error messages.

    Returns
    -------
    (Path, Path)
        The TIFF and the configuration written.

    Raises
    ------
    ValueError
        If the data do not have the shape the configuration describes.
    OutputExistsError
        If either output exists and ``if_exists`` is ``"error"``; nothing is written then.
    """
    from ..io.atomic import check_can_write
    from ..io.writers import save_tiff

    tiff_path = Path(tiff_path)
    config = read_configuration(configuration)
    check_configuration_shape(config, np.shape(data), f"'{source_name or tiff_path.name}'")
    name = name or re.sub(r"\.tiff?$", "", tiff_path.name, flags=re.IGNORECASE)
    config_path = tiff_path.parent / f"{name}{CONFIG_SUFFIX}"
    if config_path.resolve() == config.path.resolve():
        raise ValueError(f"{config_path}: is the configuration being copied; save the volume under another name "
                         "or in another folder")
    # Both checked before anything is written: an existing output of the pair stops the whole save.
    writes = [check_can_write(p, if_exists) for p in (tiff_path, config_path)]
    if not all(writes):
        return tiff_path, config_path
    updated = dict(config.raw)
    options = dict(updated.get("slice_options") or {})
    options.update(output_file_folder=str(tiff_path.parent.resolve()), output_file_name=name, make_single_file=True)
    updated.update(slice_options=options, output_file_path=tiff_path.name, config_file_path=str(config_path.resolve()),
                   json_path=None, backproject_options=None, backprojected_folder_path=None,
                   backprojection_offset=None)
    ours = dict(updated.get("napari_soct") or {})
    if ours or value_mode:
        ours.pop("backprojection", None)
        ours.update(straightened_zarr=None, dtype=str(np.dtype(data.dtype)), saved_from=str(config.path),
                    **({"value_mode": value_mode} if value_mode else {}))
        updated["napari_soct"] = ours
    mode = "overwrite" if if_exists != "error" else "error"
    # The configuration is renamed into place only after the TIFF is complete: never one without the other.
    with atomic_output(config_path, mode) as tmp:
        Path(tmp).write_text(json.dumps(updated, indent=1, default=_json_default))
        save_tiff(tiff_path, data, **{"name": name, **(tiff_options or {})}, compression=compression,
                  if_exists=mode, memory_budget_gb=memory_budget_gb)
    return tiff_path, config_path
