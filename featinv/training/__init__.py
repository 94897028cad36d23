"""Decoders (and fusions) trained from the cache: the model, its losses and the training loop."""
