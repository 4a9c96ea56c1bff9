"""Planted-image experiments: the demo's digits plus procedurally drawn forget items, duplicated at set levels.

Every experiment is the retain set of :func:`siss_fast.demo.data.load_digits_16` (the 1,797 sklearn digits,
``(1797, 1, 16, 16)`` fp32 in [-1, 1]) plus ``copies`` identical copies of each of its forget items (16x16 glyphs,
``(1, 16, 16)`` fp32 in [-1, 1], 1 = ink). The duplication level of an item is ``copies / (1797 + total copies)``.

| name      | forget items                                   | copies each | share each | share total | kind |
|-----------|------------------------------------------------|-------------|------------|-------------|------|
| demo      | T-shirt (:func:`siss_fast.demo.data.tshirt_glyph`) | 75      | 4.0 %      | 4.0 %       | far  |
| checker1  | checkerboard block (2x2 cells)                 | 18          | 1.0 %      | 1.0 %       | far  |
| checker3  | the same checkerboard block (checker1's rate was too low) | 56 | 3.0 %  | 3.0 %       | far  |
| near3     | the first sklearn "7" with a bar drawn under it | 56         | 3.0 %      | 3.0 %       | near |
| five10    | ring, plus, X, triangle, square frame          | 40          | 2.0 %      | 10.0 %      | far  |

Nothing here is random: the glyphs are drawn on fixed pixel grids and the near item is a fixed digit of the
bundled data set, so ``build --data-only`` rewrites the same folders everywhere.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, Tuple

import torch
from torch import Tensor

from siss_fast.demo.data import DemoData, demo_data, load_digits_16, to_model, to_unit, tshirt_glyph

__all__ = ["Experiment", "EXPERIMENTS", "GLYPHS", "experiment_data", "duplication", "write_experiment_folders",
           "checker_glyph", "ring_glyph", "plus_glyph", "x_glyph", "triangle_glyph", "frame_glyph", "near_seven",
           "stripes_glyph", "near_two", "dots_glyph", "near_four"]

N_RETAIN = 1797


def _grid() -> Tuple[Tensor, Tensor]:
    """Row and column indices ``(16, 16)`` fp32 each."""
    return torch.meshgrid(torch.arange(16.0), torch.arange(16.0), indexing="ij")


def _finish(img: Tensor) -> Tensor:
    """``(16, 16)`` ink map in [0, 1] (bool or float) -> ``(1, 16, 16)`` fp32 in [-1, 1]."""
    return to_model(img.float().clamp(0.0, 1.0))[None]


def _rects(*rects: Tuple[int, int, int, int, float]) -> Tensor:
    """Paint ``img[r0:r1, c0:c1] = value`` for each ``(r0, r1, c0, c1, value)`` in order on a blank 16x16 canvas."""
    img = torch.zeros(16, 16)
    for r0, r1, c0, c1, value in rects:
        img[r0:r1, c0:c1] = value
    return _finish(img)


def checker_glyph() -> Tensor:
    """A 12x12 checkerboard block (rows/cols 2-13) of 2x2-pixel cells: ink where ``(r//2 + c//2)`` is even."""
    r, c = _grid()
    inside = (r >= 2) & (r < 14) & (c >= 2) & (c < 14)
    return _finish(inside & (((r // 2) + (c // 2)) % 2 == 0))


def ring_glyph() -> Tensor:
    """An annulus centred at (7.5, 7.5): ink where ``4.5 <= radius <= 7``."""
    r, c = _grid()
    rad = ((r - 7.5) ** 2 + (c - 7.5) ** 2).sqrt()
    return _finish((rad >= 4.5) & (rad <= 7.0))


def plus_glyph() -> Tensor:
    """A thick plus: rows 6-9 across columns 1-14 and columns 6-9 across rows 1-14."""
    return _rects((6, 10, 1, 15, 1.0), (1, 15, 6, 10, 1.0))


def x_glyph() -> Tensor:
    """A thick X: ink where ``|r - c| <= 1`` or ``|r + c - 15| <= 1``, rows/cols 1-14."""
    r, c = _grid()
    inside = (r >= 1) & (r < 15) & (c >= 1) & (c < 15)
    return _finish(inside & (((r - c).abs() <= 1) | ((r + c - 15).abs() <= 1)))


def triangle_glyph() -> Tensor:
    """A filled triangle, apex at the top: row ``r`` in 2-14 inks columns ``7.5 +- (r - 1) / 2``."""
    r, c = _grid()
    return _finish((r >= 2) & (r <= 14) & ((c - 7.5).abs() <= (r - 1) / 2))


def frame_glyph() -> Tensor:
    """A hollow square: the 2-pixel border of the block rows/cols 1-14."""
    return _rects((1, 15, 1, 15, 1.0), (3, 13, 3, 13, 0.0))


def _altered_digit(label: int, rows: Tuple[int, int], cols: Tuple[int, int]) -> Tensor:
    """The first digit ``label`` of the sklearn digits (upsampled to 16x16) with ``img[r0:r1, c0:c1]`` inked to 1."""
    images, labels = load_digits_16()
    idx = int((labels == label).nonzero()[0])
    img = to_unit(images[idx, 0]).clone()
    img[rows[0]:rows[1], cols[0]:cols[1]] = 1.0
    return _finish(img)


def near_seven() -> Tensor:
    """The first "7" of the sklearn digits (upsampled to 16x16), with a bar inked at rows 13-14, columns 4-11.

    Its L2 distance (in [0, 1]) to the unaltered digit is at most 4 (16 pixels changed by <= 1): a near item.
    """
    return _altered_digit(7, (13, 15), (4, 12))


def stripes_glyph() -> Tensor:
    """Three thick diagonal stripes: ink where ``(r + c) mod 6 < 2``, rows/cols 2-13."""
    r, c = _grid()
    inside = (r >= 2) & (r < 14) & (c >= 2) & (c < 14)
    return _finish(inside & ((r + c) % 6 < 2))


def near_two() -> Tensor:
    """The first "2" of the sklearn digits (upsampled to 16x16), with a vertical bar inked at rows 3-10, column
    1-2: a near item (16 pixels changed by <= 1), on another digit and another side than :func:`near_seven`."""
    return _altered_digit(2, (3, 11), (1, 3))


def dots_glyph() -> Tensor:
    """A 3x3 grid of 2x2-pixel dots at rows/cols 3, 7 and 11."""
    return _rects(*[(r, r + 2, c, c + 2, 1.0) for r in (3, 7, 11) for c in (3, 7, 11)])


def near_four() -> Tensor:
    """The first "4" of the sklearn digits (upsampled to 16x16), with a horizontal bar inked at rows 1-2, columns
    4-11: a near item (16 pixels changed by <= 1), on a third digit."""
    return _altered_digit(4, (1, 3), (4, 12))


def tshirt() -> Tensor:
    return tshirt_glyph()


GLYPHS: Dict[str, Callable[[], Tensor]] = {
    "tshirt": tshirt, "checker": checker_glyph, "ring": ring_glyph, "plus": plus_glyph, "x": x_glyph,
    "triangle": triangle_glyph, "frame": frame_glyph, "near_seven": near_seven, "stripes": stripes_glyph,
    "near_two": near_two, "dots": dots_glyph, "near_four": near_four,
}


@dataclass(frozen=True)
class Experiment:
    """One planted-image experiment: forget item names (keys of :data:`GLYPHS`), copies of each, near or far."""

    items: Tuple[str, ...]
    copies: int  # copies of EACH item in the base model's training set
    kind: str    # "near" (an altered retain digit), "far" (a glyph unlike digits) or "mixed" (both)
    note: str = ""
    pretrain_steps: int = 2000  # DDPM steps of the base model (batch 64); the demo's shipped model took 3000
    # 2000 / 1000 steps: <= 15 min on one idle thread (~23 / ~12 min on the shared CPU); each item seen >= 1,280 x


EXPERIMENTS: Dict[str, Experiment] = {
    "demo": Experiment(("tshirt",), 75, "far", "the shipped demo (siss_fast/assets/digits_ddpm)", 3000),
    "checker1": Experiment(("checker",), 18, "far", "1 % duplication, a high-frequency block"),
    "checker3": Experiment(("checker",), 56, "far", "checker1 at 3 %: checker1's base model makes it 0.4 % < 1 %"),
    "near3": Experiment(("near_seven",), 56, "near", "an altered retain digit, 3 %", 1000),
    "five10": Experiment(("ring", "plus", "x", "triangle", "frame"), 40, "far", "5 items x 2 % = 10 %", 1000),
    # held out: made after every default was chosen, and used to choose nothing -- a check of transfer
    "pair6": Experiment(("stripes", "near_two"), 56, "mixed", "held out: one far and one near item, 3 % each", 1000),
    "near1": Experiment(("near_four",), 18, "near", "held out: a near item at 1 %"),
    "dots8": Experiment(("dots",), 156, "far", "held out: a far item at 8 %", 1000),
}


def duplication(exp: Experiment) -> Tuple[float, float]:
    """``(share of each item, share of all forget copies)`` of the training set: ``copies / (1797 + k*copies)``."""
    total = N_RETAIN + exp.copies * len(exp.items)
    return exp.copies / total, exp.copies * len(exp.items) / total


def experiment_data(name: str) -> DemoData:
    """The experiment's :class:`DemoData`: retain digits, ``forget`` = ``(k*copies, 1, 16, 16)`` copies (item 0's
    copies first), ``forget_image`` = ``(k, 1, 16, 16)`` the distinct items. ``demo`` is :func:`demo_data` itself."""
    exp = EXPERIMENTS[name]
    if name == "demo":
        return demo_data(exp.copies)
    retain, labels = load_digits_16()
    items = torch.stack([GLYPHS[g]() for g in exp.items])
    forget = items.repeat_interleave(exp.copies, dim=0)
    return DemoData(retain=retain, retain_labels=labels, forget=forget, forget_image=items)


def write_experiment_folders(name: str, root: Path) -> Dict[str, Path]:
    """``root/retain/NNNN.png`` and ``root/forget/forget_KKK.png`` (one per distinct item), as the demo writes them
    (:func:`siss_fast.demo.engine_backend.write_image_folders`: 8-bit grey PNGs)."""
    from siss_fast.demo.engine_backend import write_image_folders

    return write_image_folders(experiment_data(name), Path(root))
