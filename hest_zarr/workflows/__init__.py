"""Workflows: open a store -> run an operator -> write the result back (what the CLI and batch engines call).

Operators (:mod:`hest_zarr.ops`) are functions of elements; this layer is where URLs, storage options and
writes meet them. Each function takes the store's URL and returns what its operator returned.
"""
