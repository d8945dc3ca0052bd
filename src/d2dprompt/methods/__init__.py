"""Each method's pure torch model (no I/O); the stages are the orchestration."""
