"""Write the tiny example image sets used by examples/tiny-*.yaml (16x16 PNGs, a few KB in total).

    python examples/make_example_data.py        # writes examples/data/{retain,forget}/ and captions.tsv

Retain: 12 smooth colour gradients with a soft blob; forget: 2 checkerboard-like "planted" images that look unlike
the retain set (so a memorised forget item is easy to spot by pixel distance). Deterministic (seeded).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parent / "data"


def main() -> None:
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:16, 0:16] / 15.0
    (ROOT / "retain").mkdir(parents=True, exist_ok=True)
    (ROOT / "forget").mkdir(parents=True, exist_ok=True)
    captions = []
    for i in range(12):
        c0, c1 = rng.uniform(0.1, 0.9, 3), rng.uniform(0.1, 0.9, 3)
        cy, cx = rng.uniform(0.2, 0.8, 2)
        blob = np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / 0.05)[..., None]
        img = (1 - xx[..., None]) * c0 + xx[..., None] * c1
        img = np.clip(img * (1 - 0.5 * blob) + 0.5 * blob, 0, 1)
        Image.fromarray((img * 255).round().astype(np.uint8)).save(ROOT / "retain" / f"retain_{i:02d}.png")
        captions.append(f"retain_{i:02d}.png\ta soft gradient with a blob")
    for i in range(2):
        check = ((np.arange(16)[:, None] // (2 + i) + np.arange(16)[None] // (2 + i)) % 2).astype(float)
        img = np.stack([check, 1 - check, 0.5 * np.ones_like(check)], -1)
        Image.fromarray((img * 255).round().astype(np.uint8)).save(ROOT / "forget" / f"forget_{i:02d}.png")
        captions.append(f"forget_{i:02d}.png\tthe planted checkerboard")
    (ROOT / "captions.tsv").write_text("\n".join(captions) + "\n")


if __name__ == "__main__":
    main()
