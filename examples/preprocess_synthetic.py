"""Make a synthetic S-OCT acquisition and preprocess it into mosaic grids, then compare with the truth.

Run: ``python examples/preprocess_synthetic.py OUT_DIR``
"""

import sys
from pathlib import Path

import numpy as np

from napari_soct import open_ome_zarr, preprocess_acquisition
from napari_soct.processing.synthetic import make_acquisition

out = Path(sys.argv[1] if len(sys.argv) > 1 else "soct-example")
acq = make_acquisition(out / "synthetic", preset="tiny", seed=1)
result = preprocess_acquisition(acq.raw_dir, out / "preprocess", workers=2, memory_budget_gb=1)

sid = acq.slice_ids[1]
mosaic = open_ome_zarr(out / "preprocess" / f"mosaic_grid_3d_z{sid:02d}.ome.zarr").levels[0]
tz, ty, tx = acq.tile_shape
tile = mosaic[:, :ty, :tx]
print("first tile equals the phantom's:", np.allclose(tile, acq.true_tile(sid, 0, 0), rtol=1e-6))
for s in result.slices:
    print(f"slice {s.slice_id}: galvo band at A-line {s.galvo['band_start']} "
          f"(truth {acq.galvo_offset(s.slice_id)}), confidence {s.galvo['confidence']:.2f}")
