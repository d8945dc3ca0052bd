"""The DVC stages, one module each (`python -m d2dprompt.pipeline.<stage>`): they read params.yaml, do the I/O and logging, and reach methods through `d2dprompt.methods.registry`."""
