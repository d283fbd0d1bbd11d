"""The science of napari-soct: pure functions on numpy, dask and zarr. No napari or Qt imports here."""
