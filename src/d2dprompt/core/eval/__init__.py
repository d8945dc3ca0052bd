"""Scoring what a method produced: metrics, thresholds, map post-processing, reports and overlays."""
