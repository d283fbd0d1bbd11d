"""Synthetic S-OCT acquisitions with ground truth (for tests, demos and benchmarks).

>>> from napari_soct.processing.synthetic import make_acquisition
>>> acq = make_acquisition("/tmp/soct_demo", preset="tiny", seed=0)   # doctest: +SKIP
>>> acq.true_tile(acq.slice_ids[0], 0, 0).shape                         # doctest: +SKIP
(32, 40, 40)

See :mod:`.acquisition` for the physical model and the frames of reference.
"""

from .acquisition import SyntheticAcquisition, make_acquisition, tile_folder_name
from .evaluate import (LevelFigures, TruthFrame, TruthOnVolumeGrid, level_against_truth, level_ncc,
                       ncc_over_tissue, placement_drift_px, slice_placement_errors, tissue_mask,
                       volume_in_truth_frame, z_overlap_errors)
from .phantom import Phantom
from .presets import DEFAULT_STAGE_AFFINE, PRESETS, SyntheticConfig

__all__ = ["PRESETS", "DEFAULT_STAGE_AFFINE", "Phantom", "SyntheticAcquisition", "SyntheticConfig",
           "make_acquisition", "tile_folder_name",
           # comparing a reconstructed volume with the truth (evaluate.py)
           "LevelFigures", "TruthFrame", "TruthOnVolumeGrid", "level_against_truth", "level_ncc", "ncc_over_tissue",
           "placement_drift_px", "slice_placement_errors", "tissue_mask", "volume_in_truth_frame",
           "z_overlap_errors"]
