"""The scalar rule math of SPEC §6, used by :class:`siss_fast.gradients.GradientCombiner`.

Plain Python floats in, floats out (no tensors). With the retain gradient ``G_x`` and the *positive* forget
gradient ``G_a`` of one optimizer step, the step direction is

* ``rescale`` (research code):  ``G = G_x - s * G_a``,  ``s = c / ||G_a||``           (forget part has norm ``c``)
* ``clip``:                     ``G = G_x - s * G_a``,  ``s = min(1, c / ||G_a||)``    (only ever shrinks it)
* ``erasediff``:                ``G = G_x + s * G_a``,  ``s = max(eta - <G_x, G_a> / ||G_a||^2, 0)``

written uniformly as ``G = G_x + f * G_a`` with the signed *forget coefficient* ``f`` (``f = -s`` for rescale/clip,
``f = s`` for erasediff; :func:`forget_coef`); ``c`` is ``scaling_norm``. Then ``G`` is clipped to
``max_grad_norm`` exactly as :func:`torch.nn.utils.clip_grad_norm_` does:
``G <- G * min(1, max_grad_norm / (||G|| + 1e-6))`` (:func:`clip_factor`).

Stabilisation:

* ``|f| <= max_forget_scale`` (default ``1e4``; ``None`` disables). The cap only engages when ``||G_a||`` has all
  but vanished (``||G_a|| < c / 1e4`` for rescale): the forget gradient is then mostly rounding noise (fp32 keeps
  ~7 digits, so a 1e4 amplification still leaves it ~1e-3 accurate) and rescaling it to norm ``c`` would turn
  noise into a full-size step.
* ``||G_a||`` zero or non-finite: the forget part is dropped for the step (``f = 0``). A NaN forget loss therefore
  costs one forget update, not the step.
* ``scaling_norm="auto"``: ``c = 0.1 * median ||G_x||`` over the first ``auto_steps`` steps that have a finite,
  non-zero ``G_x`` (the running median until then; :func:`auto_scaling_norm`), then fixed. One batch's ``||G_x||``
  moves by ~20 % between seeds; the median of 8 (the engine's default ``gradient.auto_steps``) by a few per cent.
"""

from __future__ import annotations

import math
import statistics
from typing import Any, Optional, Sequence, Tuple

__all__ = ["RULES", "forget_coef", "auto_scaling_norm", "clip_factor", "positive_finite"]

RULES = ("rescale", "clip", "erasediff")

# Same epsilon as torch.nn.utils.clip_grad_norm_, so clipping matches it bit for bit.
_CLIP_EPS = 1e-6


def positive_finite(value: Any) -> bool:
    """``value`` is an int or float (not a bool), finite and > 0."""
    return (
        isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value > 0
    )


def forget_coef(rule: str, norm_a: float, dot: Optional[float], *, scaling_norm: Optional[float], eta: float,
                max_forget_scale: Optional[float]) -> Tuple[float, bool, bool]:
    """Signed f of ``G = G_x + f * G_a``, and (capped, dropped). ``dot`` = <G_x, G_a> (None means 0).

    ``scaling_norm`` is ``c`` (rescale/clip; ``None`` while auto has not measured it: the forget part is dropped).
    ``eta`` applies to erasediff only. ``|f|`` is capped at ``max_forget_scale`` unless that is ``None``.
    """
    if not positive_finite(norm_a):
        return 0.0, False, True
    if rule == "erasediff":
        scale = max(eta - (dot or 0.0) / (norm_a * norm_a), 0.0)
    elif scaling_norm is None:  # auto could not measure c (G_x zero): no forget update this step
        return 0.0, False, True
    elif rule == "rescale":
        scale = scaling_norm / norm_a
    else:  # clip
        scale = min(1.0, scaling_norm / norm_a)
    capped = max_forget_scale is not None and scale > max_forget_scale
    if capped:
        scale = max_forget_scale
    return (scale if rule == "erasediff" else -scale), capped, False


def auto_scaling_norm(norms_x: Sequence[float]) -> float:
    """``c`` for ``scaling_norm="auto"``: 0.1 x the median of the ``||G_x||`` measured so far."""
    return 0.1 * statistics.median(norms_x)


def clip_factor(max_grad_norm: float, total_norm: float) -> float:
    """The factor :func:`torch.nn.utils.clip_grad_norm_` would apply: ``min(1, max_grad_norm / (||G|| + 1e-6))``."""
    return min(1.0, max_grad_norm / (total_norm + _CLIP_EPS))
