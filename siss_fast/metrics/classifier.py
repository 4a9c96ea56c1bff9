"""The small digits classifier behind the quality metric (the demo's stand-in for an Inception network).

A 3-layer CNN on ``(B, 1, 16, 16)`` images in [0, 1] returning 10 logits. Trained at pretrain time on the
16x16 sklearn digits (see :mod:`siss_fast.demo.pretrain`) and shipped with the base model.
"""

from __future__ import annotations

from torch import Tensor, nn

__all__ = ["DigitClassifier"]


class DigitClassifier(nn.Module):
    """conv(1->16) - conv(16->32, stride 2) - conv(32->64, stride 2) - global mean - linear(64->10).

    Input ``(B, 1, 16, 16)`` in [0, 1] (metric space, not the model's [-1, 1]); output ``(B, 10)`` logits.
    """

    def __init__(self, num_classes: int = 10):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 16, 3, padding=1), nn.SiLU(),
            nn.Conv2d(16, 32, 3, stride=2, padding=1), nn.SiLU(),
            nn.Conv2d(32, 64, 3, stride=2, padding=1), nn.SiLU(),
        )
        self.head = nn.Linear(64, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.features(x * 2.0 - 1.0).mean(dim=(2, 3)))
