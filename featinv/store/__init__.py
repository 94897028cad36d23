"""The feature cache: Zarr stores written once per tap, and batches read straight from them."""
