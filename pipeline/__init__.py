"""Thin DVC stage entry points: read params.yaml, build the config, call one library function."""
