"""Open a raw acquisition in napari with the preprocessing widget docked.

Run: ``python examples/view_acquisition.py RAW_DIR`` (or without argument for the tiny sample).
"""

import sys

import napari

viewer = napari.Viewer()
if len(sys.argv) > 1:
    viewer.open(sys.argv[1], plugin="napari-soct")
else:
    viewer.open_sample("napari-soct", "soct_tiny")
viewer.window.add_plugin_dock_widget("napari-soct", "Preprocess raw tiles")
napari.run()
