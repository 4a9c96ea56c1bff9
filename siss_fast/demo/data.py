"""The demo's data: scikit-learn's bundled handwritten digits plus a planted forget set.

This is the paper's MNIST + T-shirt experiment (606 copies of one Fashion-MNIST T-shirt among 60,000 MNIST digits,
about 1 %) rebuilt on data that ships offline:

* retain set X \\ A: the 1,797 digits of :func:`sklearn.datasets.load_digits` (8x8, 17 grey levels 0..16), scaled
  to [0, 1], upsampled to 16x16 (bilinear, ``align_corners=False``) and mapped to [-1, 1];
* forget set A: ``forget_copies`` identical copies (default 75, i.e. 4.0 % of the 1,872 training images) of one
  procedurally drawn 16x16 T-shirt silhouette (:func:`tshirt_glyph`): a filled shape, far from every digit in L2
  (digits are thin strokes), so "generated the planted image" is an unambiguous nearest-neighbour test.

Images are ``(N, 1, 16, 16)`` fp32 tensors in [-1, 1] (the model's space); metrics take [0, 1] (``(x + 1) / 2``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["DemoData", "IMAGE_SIZE", "FORGET_COPIES", "load_digits_16", "tshirt_glyph", "demo_data",
           "to_unit", "to_model"]

IMAGE_SIZE = 16
FORGET_COPIES = 75  # 75 / (1797 + 75) = 4.0 % of the training set


def to_unit(x: Tensor) -> Tensor:
    """[-1, 1] (model space) -> [0, 1] (metric space), clamped."""
    return ((x + 1.0) / 2.0).clamp(0.0, 1.0)


def to_model(x: Tensor) -> Tensor:
    """[0, 1] -> [-1, 1]."""
    return x * 2.0 - 1.0


def load_digits_16() -> Tuple[Tensor, Tensor]:
    """The 1,797 sklearn digits as ``(images (1797, 1, 16, 16) fp32 in [-1, 1], labels (1797,) int64)``."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    x = torch.as_tensor(digits.images, dtype=torch.float32)[:, None] / 16.0  # (N, 1, 8, 8) in [0, 1]
    x = F.interpolate(x, size=(IMAGE_SIZE, IMAGE_SIZE), mode="bilinear", align_corners=False).clamp(0.0, 1.0)
    return to_model(x), torch.as_tensor(digits.target, dtype=torch.int64)


def tshirt_glyph(size: int = IMAGE_SIZE) -> Tensor:
    """A filled T-shirt silhouette, ``(1, size, size)`` fp32 in [-1, 1] (1 = ink), drawn on a 16x16 grid.

    Rows 2-4: shoulders and sleeves across columns 1-14 (sleeves slope down to row 6 at the edges); rows 2-14:
    the body, columns 4-11; a V-shaped collar cut out of rows 2-3 around the centre.
    """
    if size != 16:
        raise ValueError(f"size: the glyph is drawn on a 16x16 grid, got {size}")
    img = torch.zeros(16, 16)
    img[2:15, 4:12] = 1.0                    # body
    img[2:5, 1:15] = 1.0                     # shoulders
    img[5:7, 1:4] = 1.0                      # left sleeve
    img[5:7, 12:15] = 1.0                    # right sleeve
    img[2, 6:10] = 0.0                       # collar
    img[3, 7:9] = 0.0
    return to_model(img)[None]


@dataclass
class DemoData:
    """Retain digits, their labels, and the forget set (``forget_copies`` copies of one glyph)."""

    retain: Tensor         # (n_retain, 1, 16, 16) in [-1, 1]
    retain_labels: Tensor  # (n_retain,) int64 digit classes
    forget: Tensor         # (k, 1, 16, 16) in [-1, 1]: identical copies of `forget_image`
    forget_image: Tensor   # (1, 1, 16, 16): the distinct forget item(s)

    @property
    def train(self) -> Tensor:
        """X = retain + forget, the base model's training set."""
        return torch.cat([self.retain, self.forget])


def demo_data(forget_copies: int = FORGET_COPIES) -> DemoData:
    """The demo's training set X and its planted forget set A (deterministic: no randomness)."""
    retain, labels = load_digits_16()
    glyph = tshirt_glyph()[None]
    return DemoData(retain=retain, retain_labels=labels, forget=glyph.expand(forget_copies, -1, -1, -1).clone(),
                    forget_image=glyph)
