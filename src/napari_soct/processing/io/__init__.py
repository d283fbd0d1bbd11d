"""Reading and writing the lab's formats: raw tiles, OME-Zarr, CSV tables."""

from .atomic import OutputExistsError, atomic_output
from .omezarr import OmeZarrImage, create_ome_zarr_image, is_ome_zarr, open_ome_zarr
from .rawtiles import (
    BadTileWarning,
    RawAcquisition,
    RawFormatError,
    RawTile,
    TileInfo,
    is_raw_acquisition,
    open_raw_acquisition,
    parse_info_txt,
)
from .tables import (
    SliceConfigRow,
    SliceShift,
    read_shifts_xy,
    read_slice_config,
    write_shifts_xy,
    write_slice_config,
)

__all__ = [
    "BadTileWarning",
    "OmeZarrImage",
    "OutputExistsError",
    "RawAcquisition",
    "RawFormatError",
    "RawTile",
    "SliceConfigRow",
    "SliceShift",
    "TileInfo",
    "atomic_output",
    "create_ome_zarr_image",
    "is_ome_zarr",
    "is_raw_acquisition",
    "open_ome_zarr",
    "open_raw_acquisition",
    "parse_info_txt",
    "read_shifts_xy",
    "read_slice_config",
    "write_shifts_xy",
    "write_slice_config",
]
