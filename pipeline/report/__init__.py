"""The HTML report of one experiment (``make report``): plain functions on paths, no Hydra."""
from pipeline.report.build import ReportError, build_report, format_report_summary
from pipeline.report.published import FULL_SET_IMAGES, PUBLISHED_CORLOC, published_corloc

__all__ = ["FULL_SET_IMAGES", "PUBLISHED_CORLOC", "ReportError", "build_report", "format_report_summary", "published_corloc"]
