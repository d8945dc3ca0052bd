"""Benchmarks that print figures (`python -m d2dprompt.bench.<name>`); speed and memory goals live here, not in timed tests."""
