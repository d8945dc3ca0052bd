"""D2D-Prompt: learnable prompts on frozen Stable Diffusion cross-attention for anomaly segmentation.

`from d2dprompt import Detector` loads a trained run and scores images (serve/detector.py); the import is lazy, so the
stage CLIs' --help stays free of torch.
"""

__version__ = "0.1.0"
__all__ = ["Detector", "Prediction"]


def __getattr__(name: str):
    if name in __all__:
        from d2dprompt.serve import detector

        return getattr(detector, name)
    raise AttributeError(f"module 'd2dprompt' has no attribute {name!r}")
