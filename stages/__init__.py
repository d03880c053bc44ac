"""Thin Hydra entry points, one per stage: config in, library calls, artifacts out."""
