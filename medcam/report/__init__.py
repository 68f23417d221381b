"""HTML report of a medcam output folder: cohort table and a NiiVue viewer per case, offline from file://."""

from medcam.report.build import ReportError, write_report

__all__ = ["ReportError", "write_report"]
