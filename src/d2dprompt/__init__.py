"""D2D-Prompt: learnable prompts on frozen Stable Diffusion cross-attention for anomaly segmentation."""

__version__ = "0.1.0"
