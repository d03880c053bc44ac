"""Moved to :mod:`pipeline.viz.detections`; re-exported here for the imports that still use this path."""
from pipeline.viz.detections import draw_detections, write_detection_pictures  # noqa: F401
