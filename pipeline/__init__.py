"""Unsupervised object detection: LOST and what comes after it, as a library (no Hydra, no global state)."""
