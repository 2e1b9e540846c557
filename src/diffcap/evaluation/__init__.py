"""Scoring captions (COCO metrics, the COCO results file) and the HTML report of a captioned set."""
