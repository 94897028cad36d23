"""Frozen encoders truncated at a tap: the tap registry, weights (random, ImageNet, files, packaged) and normalisation."""
