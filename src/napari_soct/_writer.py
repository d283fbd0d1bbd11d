"""napari writers (npe2): image and labels layers as OME-Zarr (NGFF 0.5) or TIFF, plus a folder of OME-Zarrs.

``File > Save Selected Layer(s)...`` or ``viewer.layers.save("brain.ome.zarr", plugin="napari-soct")`` end up
here; the array writing itself is :mod:`napari_soct.processing.io.writers` (block by block, so dask/zarr
layers larger than memory are fine; multiscale layers write their own levels, single-level ones get a pyramid
in OME-Zarr).

npe2 writers receive no options, so the choices are made this way:

- **Compression from the file name**: a recognised word just before the extension picks it, e.g.
  ``brain.zstd.ome.zarr``, ``brain.none.ome.zarr``, ``labels.zstd.tif``, ``labels.zlib.tif``,
  ``scan.none.tif`` (``raw`` and ``uncompressed`` also mean none, ``lz4`` means blosc-lz4). The word stays in
  the file name. OME-Zarr: blosc-lz4, zstd, none; TIFF: zlib, zstd, none.
- **Module-level defaults** otherwise, in :data:`settings` (change them from the napari console:
  ``import napari_soct._writer as w; w.settings.tiff_compression = "zstd"``).
- Scripts wanting every option call :func:`napari_soct.save_ome_zarr` / :func:`napari_soct.save_tiff`.

Existing outputs: napari's save dialog asks before replacing a *file*, but npe2 does not tell a writer whether
the user confirmed, ``viewer.layers.save`` from a script asks nothing, and an OME-Zarr is a folder the dialog
may not even offer to replace. So these writers **refuse an existing path** (``OutputExistsError``, naming
the path and what to do) unless ``settings.if_exists`` is set to ``"overwrite"``; a replaced output is only
swapped in once the new one is complete (atomic rename).

Layer rotation, shear and affine are not saved (OME-Zarr 0.5 and TIFF carry scale and translation only); a
warning says so when they are not the identity.

**Straightened volume + Ouroboros configuration (TIFF)** (:func:`write_straightened_image_tiff`,
:func:`write_straightened_labels_tiff`): the layer as a TIFF stack and ``<name>-configuration.json`` beside
it (a copy of the straightening's configuration naming the new files), ready for ``napari-soct backproject
<name>.tif <name>-configuration.json OUT``. The configuration is the one the layer's metadata names (see
:func:`napari_soct.processing.backproject.config.configuration_from_metadata`): layers added by the
Straighten widget and straightened OME-Zarrs or per-slice TIFF folders opened with this plugin's reader know
theirs; for any other layer (e.g. a Labels layer painted on the straightened volume), choose the layer and the
configuration in the Backproject widget and press "attach configuration to layer" (running a backprojection
attaches it too). A layer without one is refused with an error saying so; nothing is written.
"""

from __future__ import annotations

import json
import re
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .processing.io.atomic import OutputExistsError, atomic_output
from .processing.io.writers import OME_ZARR_COMPRESSIONS, TIFF_COMPRESSIONS, save_ome_zarr, save_tiff

__all__ = [
    "LayerWriteError",
    "WriterSettings",
    "settings",
    "compression_from_filename",
    "write_image_ome_zarr",
    "write_labels_ome_zarr",
    "write_image_tiff",
    "write_labels_tiff",
    "write_layers_ome_zarr_folder",
    "write_straightened_image_tiff",
    "write_straightened_labels_tiff",
]

OME_ZARR_EXTENSIONS = (".ome.zarr", ".zarr")
TIFF_EXTENSIONS = (".tif", ".tiff")
_COMPRESSION_WORDS = {"raw": "none", "uncompressed": "none", "lz4": "blosc-lz4", "blosc": "blosc-lz4",
                      "deflate": "zlib"}


@dataclass
class WriterSettings:
    """Defaults of the napari writers (npe2 passes them no options).

    Attributes
    ----------
    ome_zarr_compression : str
        OME-Zarr compression when the file name names none: "blosc-lz4", "zstd" or "none".
    tiff_compression : str
        TIFF compression when the file name names none: "zlib", "zstd" or "none".
    memory_budget_gb : float
        Peak memory for the blocks being written, in GiB.
    if_exists : str
        "error" (default) refuses an existing output; "overwrite" replaces it once the new one is written.
    """

    ome_zarr_compression: str = "blosc-lz4"
    tiff_compression: str = "zlib"
    memory_budget_gb: float = 1.0
    if_exists: str = "error"


settings = WriterSettings()


def compression_from_filename(path: str, extensions: tuple[str, ...], choices: tuple[str, ...],
                              default: str) -> str:
    """The compression named just before the extension (``x.zstd.tif`` -> ``"zstd"``), else ``default``.

    Parameters
    ----------
    path : str
        File name or path.
    extensions : tuple of str
        Extensions of the format, longest first (``(".ome.zarr", ".zarr")``).
    choices : tuple of str
        Compressions the format supports.
    default : str
        Returned when the name carries no recognised compression word.
    """
    name = Path(path).name
    for ext in extensions:
        if name.lower().endswith(ext):
            name = name[: -len(ext)]
            break
    if "." not in name:
        return default
    word = name.rsplit(".", 1)[1].lower()
    word = _COMPRESSION_WORDS.get(word, word)
    return word if word in choices else default


def _with_extension(path: str, extensions: tuple[str, ...]) -> Path:
    """``path`` as given when it ends with one of ``extensions``, else with the first appended (napari's save
    dialog passes the typed name as is when a writer was picked in its file-type list)."""
    if any(str(path).lower().endswith(ext) for ext in extensions):
        return Path(path)
    return Path(f"{path}{extensions[0]}")


def _is_identity(value, ndim: int, kind: str) -> bool:
    if value is None:
        return True
    arr = np.asarray(value, dtype=float)
    if kind == "affine":
        return arr.shape == (ndim + 1, ndim + 1) and np.allclose(arr, np.eye(ndim + 1))
    if kind == "rotate":
        return np.allclose(arr, np.eye(arr.shape[0])) if arr.ndim == 2 else np.allclose(arr, 0)
    return np.allclose(arr, 0)  # shear


def _layer_options(meta: dict, kind: str) -> dict:
    """save_ome_zarr/save_tiff keyword arguments from a napari layer's metadata dict."""
    name = str(meta.get("name") or kind)
    scale = meta.get("scale")
    ndim = len(scale) if scale is not None else 0
    ignored = [k for k in ("rotate", "shear", "affine") if not _is_identity(meta.get(k), ndim, k)]
    if ignored:
        warnings.warn(f"layer {name!r}: {', '.join(ignored)} not saved (OME-Zarr 0.5 and TIFF keep only scale and "
                      "translation)", UserWarning, stacklevel=3)
    units = meta.get("units")
    return {
        "scale": None if scale is None else [float(s) for s in scale],
        "translate": None if meta.get("translate") is None else [float(t) for t in meta["translate"]],
        "axes": None if meta.get("axis_labels") is None else [str(a) for a in meta["axis_labels"]],
        "units": None if units is None else [str(u) for u in units],
        "rgb": bool(meta.get("rgb", False)) if kind == "image" else False,
        "name": name,
    }


def _soct_attributes(meta: dict) -> dict:
    """The layer's ``soct`` metadata (as our reader puts it), kept in the OME-Zarr when JSON-serialisable."""
    soct = (meta.get("metadata") or {}).get("soct")
    if soct is None:
        return {}
    try:
        return {"soct": json.loads(json.dumps(soct))}
    except (TypeError, ValueError):
        return {}


def _levels(data, meta: dict):
    return list(data) if meta.get("multiscale") else data


class LayerWriteError(RuntimeError):
    """A layer cannot be written in the chosen format (raised instead of ValueError, which napari's writer
    lookup would swallow and report as "not a valid writer")."""


def _refuse_message(path: Path) -> OutputExistsError:
    return OutputExistsError(
        f"{path}: already exists; napari-soct does not replace saved images. Choose another name or delete it "
        "first (or set napari_soct._writer.settings.if_exists = 'overwrite'; scripts: "
        "napari_soct.save_ome_zarr/save_tiff(..., if_exists='overwrite'))"
    )


def _write_ome_zarr(path: str, data, meta: dict, kind: str) -> list[str]:
    target = _with_extension(path, OME_ZARR_EXTENSIONS)
    compression = compression_from_filename(str(target), OME_ZARR_EXTENSIONS, OME_ZARR_COMPRESSIONS,
                                            settings.ome_zarr_compression)
    options = _layer_options(meta, kind)
    try:
        save_ome_zarr(target, _levels(data, meta), kind=kind, compression=compression,
                      attributes=_soct_attributes(meta), if_exists=_if_exists(),
                      memory_budget_gb=settings.memory_budget_gb, **options)
    except OutputExistsError:
        raise _refuse_message(target) from None
    except ValueError as err:
        raise LayerWriteError(f"cannot save layer {options['name']!r} to {target}: {err}") from err
    return [str(target)]


def _write_tiff(path: str, data, meta: dict, kind: str) -> list[str]:
    target = _with_extension(path, TIFF_EXTENSIONS)
    compression = compression_from_filename(str(target), TIFF_EXTENSIONS, TIFF_COMPRESSIONS,
                                            settings.tiff_compression)
    options = _layer_options(meta, kind)
    try:
        save_tiff(target, _levels(data, meta), compression=compression, if_exists=_if_exists(),
                  memory_budget_gb=settings.memory_budget_gb, **options)
    except OutputExistsError:
        raise _refuse_message(target) from None
    except ValueError as err:
        raise LayerWriteError(f"cannot save layer {options['name']!r} to {target}: {err}") from err
    return [str(target)]


def _if_exists() -> str:
    if settings.if_exists not in ("error", "overwrite"):
        raise ValueError(f"napari_soct._writer.settings.if_exists must be 'error' or 'overwrite', "
                         f"got {settings.if_exists!r}")
    return settings.if_exists


def write_image_ome_zarr(path: str, data, meta: dict) -> list[str]:
    """npe2 writer: one image layer as an OME-Zarr (NGFF 0.5) multiscale image.

    Parameters
    ----------
    path : str
        Target (``*.ome.zarr`` or ``*.zarr``; appended when missing). A compression word before the
        extension (``x.zstd.ome.zarr``) picks the compression, else ``settings.ome_zarr_compression``.
    data : array-like or list of array-like
        The layer data (levels when the layer is multiscale).
    meta : dict
        The layer's attributes (``scale``, ``translate``, ``units``, ``axis_labels``, ``name``, ``rgb``...).

    Returns
    -------
    list of str
        The written folder.
    """
    return _write_ome_zarr(path, data, meta, "image")


def write_labels_ome_zarr(path: str, data, meta: dict) -> list[str]:
    """npe2 writer: one labels layer as an OME-Zarr; ids kept exactly, pyramid by subsampling (see
    :func:`write_image_ome_zarr` for the arguments)."""
    return _write_ome_zarr(path, data, meta, "labels")


def write_image_tiff(path: str, data, meta: dict) -> list[str]:
    """npe2 writer: one image layer as a tiled (Big)TIFF with OME metadata where possible.

    A compression word before the extension (``x.zstd.tif``) picks the compression, else
    ``settings.tiff_compression``. Arguments as for :func:`write_image_ome_zarr`.
    """
    return _write_tiff(path, data, meta, "image")


def write_labels_tiff(path: str, data, meta: dict) -> list[str]:
    """npe2 writer: one labels layer as a tiled (Big)TIFF, dtype kept (see :func:`write_image_tiff`)."""
    return _write_tiff(path, data, meta, "labels")


def _safe_name(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("._") or "layer"


def write_layers_ome_zarr_folder(path: str, layer_data: list[tuple]) -> list[str]:
    """npe2 writer: several image/labels layers into a new folder, one ``<layer name>.ome.zarr`` each.

    The folder is written under a temporary name and renamed when every layer is saved, so a failure leaves
    nothing; an existing folder is refused like a single output.

    Parameters
    ----------
    path : str
        The folder to create.
    layer_data : list of (data, meta, layer_type)
        napari's full layer data tuples.

    Returns
    -------
    list of str
        The OME-Zarr folders written, one per layer.
    """
    folder = Path(path)
    names, used = [], set()
    for _data, meta, _kind in layer_data:
        base = _safe_name(str(meta.get("name") or "layer"))
        name, i = base, 1
        while name.lower() in used:
            i += 1
            name = f"{base}_{i}"
        used.add(name.lower())
        names.append(f"{name}.ome.zarr")
    try:
        with atomic_output(folder, _if_exists()) as tmp:
            tmp.mkdir()
            for (data, meta, kind), name in zip(layer_data, names):
                options = _layer_options(meta, kind)
                save_ome_zarr(tmp / name, _levels(data, meta), kind="labels" if kind == "labels" else "image",
                              compression=settings.ome_zarr_compression, attributes=_soct_attributes(meta),
                              memory_budget_gb=settings.memory_budget_gb, **options)
    except OutputExistsError:
        raise _refuse_message(folder) from None
    except ValueError as err:
        raise LayerWriteError(f"cannot save the layers to {folder}: {err}") from err
    return [str(folder / name) for name in names]


# --- straightened volume + its Ouroboros configuration (issue 6) ---------------------------------------------------
def _base_name(target: Path) -> str:
    """File name without the TIFF extension and the compression word (``vessel.zstd.tif`` -> ``vessel``)."""
    name = target.name
    for ext in TIFF_EXTENSIONS:
        if name.lower().endswith(ext):
            name = name[: -len(ext)]
            break
    if "." in name:
        stem, word = name.rsplit(".", 1)
        if _COMPRESSION_WORDS.get(word.lower(), word.lower()) in TIFF_COMPRESSIONS:
            name = stem
    return name


def _write_straightened(path: str, data, meta: dict, kind: str) -> list[str]:
    from .processing.backproject.config import CONFIG_SUFFIX, configuration_from_metadata, save_straightened

    target = _with_extension(path, TIFF_EXTENSIONS)
    layer = str(meta.get("name") or kind)
    config = configuration_from_metadata(meta.get("metadata"))
    if config is None:
        raise LayerWriteError(
            f"layer {layer!r} has no straightening configuration (<name>-configuration.json) in its metadata, so "
            "it cannot be saved with one. Choose the layer and its configuration in the 'Backproject into the "
            "source' widget and press 'attach configuration to layer', or save it as a plain TIFF"
        )
    if not config.is_file():
        raise LayerWriteError(f"layer {layer!r}: its configuration {config} does not exist (moved or deleted?); "
                              "attach the right one with the Backproject widget")
    base = _base_name(target)
    config_out = target.parent / f"{base}{CONFIG_SUFFIX}"
    if_exists = _if_exists()
    for output in (target, config_out):
        if if_exists == "error" and output.exists():
            raise _refuse_message(output)
    options = _layer_options(meta, kind)
    options.pop("rgb")
    level0 = data[0] if meta.get("multiscale") else data
    try:
        save_straightened(target, level0, config, name=base, value_mode="labels" if kind == "labels" else None,
                          compression=compression_from_filename(str(target), TIFF_EXTENSIONS, TIFF_COMPRESSIONS,
                                                                settings.tiff_compression),
                          if_exists=if_exists, memory_budget_gb=settings.memory_budget_gb, tiff_options=options,
                          source_name=f"layer {layer!r}")
    except OutputExistsError as err:
        raise _refuse_message(target if target.exists() else config_out) from err
    except (ValueError, OSError) as err:
        raise LayerWriteError(f"cannot save layer {layer!r} with its configuration to {target}: {err}") from err
    return [str(target), str(config_out)]


def write_straightened_image_tiff(path: str, data, meta: dict) -> list[str]:
    """npe2 writer: a straightened volume (image layer) as a TIFF stack plus ``<name>-configuration.json``.

    Parameters
    ----------
    path : str
        Target ``*.tif``/``*.tiff`` (appended when missing); a compression word before the extension picks
        the compression (``vessel.zstd.tif``), and is not part of ``<name>``.
    data : array-like or list of array-like
        The layer data ``(slices, height, width)`` (level 0 when multiscale).
    meta : dict
        The layer's attributes; ``meta["metadata"]`` must name the straightening's configuration.

    Returns
    -------
    list of str
        The TIFF and the configuration written.

    Raises
    ------
    LayerWriteError
        If the layer has no configuration, or its shape is not the one the configuration describes (nothing
        is written).
    OutputExistsError
        If the TIFF or the configuration exists (unless ``settings.if_exists == "overwrite"``).
    """
    return _write_straightened(path, data, meta, "image")


def write_straightened_labels_tiff(path: str, data, meta: dict) -> list[str]:
    """npe2 writer: a segmentation of a straightened volume (labels layer) as a TIFF stack, ids kept exactly,
    plus ``<name>-configuration.json`` (see :func:`write_straightened_image_tiff`)."""
    return _write_straightened(path, data, meta, "labels")
