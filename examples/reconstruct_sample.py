"""Reconstruct the sample acquisition from raw tiles to one brain volume, as plain function calls.

Run: ``python examples/reconstruct_sample.py OUT_DIR [PRESET]`` (preset ``tiny`` by default; ``small`` is the
demo size). Run it twice: the second run keeps every finished step. Open the result with
``napari OUT_DIR/run/14_stack/brain.ome.zarr``.
"""

import sys
from pathlib import Path

from napari_soct import RunParams, open_ome_zarr, run_pipeline
from napari_soct.processing.synthetic import make_acquisition

out = Path(sys.argv[1] if len(sys.argv) > 1 else "soct-example")
preset = sys.argv[2] if len(sys.argv) > 2 else "tiny"
acquisition = out / "synthetic"
if not (acquisition / "raw").is_dir():
    make_acquisition(acquisition, preset=preset, seed=0)

run = RunParams(raw_dir=str(acquisition / "raw"), out_dir=str(out / "run"), scheduler="threads", workers=2)
result = run_pipeline(run, progress=lambda done, total, message: print(f"\r{message[:70]:<70}", end=""))
print()
for outcome in result.outcomes:
    print(f"{outcome.step:14s} {outcome.action:8s} {outcome.seconds:6.1f} s")
volume = open_ome_zarr(result.volume)
print("volume:", result.volume, "levels:", [level.shape for level in volume.levels])
print("report:", result.report)
