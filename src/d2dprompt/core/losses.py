"""Loss terms more than one method trains with. Pure torch."""

from __future__ import annotations

import torch


def focal_loss(probs: torch.Tensor, mask: torch.Tensor, gamma: float = 2.0, smooth: float = 1e-5) -> torch.Tensor:
    """The focal loss of DRAEM's and AnomalyCLIP's code (AnomalyCLIP's loss.py took DRAEM's FocalLoss): class
    probabilities (B, 2, H, W) [normal, anomalous] against a {0, 1} mask (B, H, W); the one-hot target clamped to
    [smooth, 1 - smooth], pt = <target, probs> + smooth, the mean of -(1 - pt)^gamma log pt (alpha 1).
    D2D-Prompt's own focal term (methods/d2dprompt/loss.py) takes fractional masks, where a latent cell is partly
    defective, and weighs the two classes' terms by them instead: another loss, not this one."""
    target = torch.stack([1 - mask, mask], dim=1).clamp(smooth, 1 - smooth)
    pt = (target * probs).sum(1) + smooth
    return (-((1 - pt) ** gamma) * pt.log()).mean()
