"""Operators on sample stores: alignment, pixel size, tissue, patching, pooling.

Each operator reads a store lazily (local or remote), computes, and writes its result back into the
store with its provenance (:func:`hest_zarr.store.add_elements`).
"""
