"""Serving a trained run: the Python API (`Detector`), the web app and the MLflow model."""
