"""Triton backend of siss_fast (shipped as ``siss_fast.kernels``): pure kernels and their launchers.

The bottom layer of the package: it imports nothing from siss_fast. It exports the three backend functions with the
contract of :mod:`siss_fast.reference` (arguments already validated by the op registry):

* ``mixture_noise(x0, a0, noise, gamma, sigma, mask) -> noisy``
* ``siss_loss_forward(pred, noisy, x0, a0, gamma, sigma, lambd, weight_clip) -> (ell_x, ell_a, w_x, w_a)``
* ``siss_loss_backward(grad_ell_x, grad_ell_a, w_x, w_a, pred, noisy, x0, a0, gamma, sigma) -> dpred``

They run beneath the one public op of each operation (``siss_fast::mixture_noise``, ``siss_fast::siss_loss``,
``siss_fast::siss_loss_backward`` in :mod:`siss_fast.ops`) when the ``triton`` backend is chosen; there is no second
registration of them. ``torch.compile`` traces through the public ops (opaque custom ops with fake implementations).

``KERNELS`` lists every ``@triton.jit`` kernel with the arguments needed to compile it ahead of time for a GPU target
(used by tests/test_triton_codegen.py). Kernels run on GPU tensors, or on CPU tensors when ``TRITON_INTERPRET=1`` was
set before triton was imported.
"""

from __future__ import annotations

from typing import Dict, List, Tuple

from ._launch import INTERPRET, elementwise_configs
from .mixture_noise import mixture_noise, mixture_noise_kernel
from .siss_loss import (
    reduction_layout,
    siss_backward_kernel,
    siss_finish_kernel,
    siss_loss_backward,
    siss_loss_forward,
    siss_partials_kernel,
)

__all__ = [
    "mixture_noise",
    "siss_loss_forward",
    "siss_loss_backward",
    "INTERPRET",
    "KERNELS",
    "reduction_layout",
]


def _tensor_args(names: str, ty: str) -> Dict[str, str]:
    return {n: ty for n in names.split()}


def _kernel_specs() -> List[dict]:
    """Ahead-of-time compilation specs: one per kernel. ``"latent"``, ``"pred"`` and ``"acc"`` in the signature stand
    for the pointer element types of a dtype variant (e.g. ``fp32``/``bf16``/``fp64``); ``constexprs`` holds a
    representative block configuration (the one used on GPU, or the largest autotune candidate); ``autotune`` lists
    every autotune candidate of the elementwise kernels."""
    import triton

    scalars_i = {"D": "i32"}
    autotune = [{"constexprs": dict(c.kwargs), "num_warps": c.num_warps} for c in elementwise_configs(triton)]
    return [
        {
            "name": "mixture_noise_kernel",
            "kernel": mixture_noise_kernel,
            "signature": {
                **_tensor_args("x0_ptr a0_ptr noise_ptr", "*latent"),
                **_tensor_args("gamma_ptr sigma_ptr", "*acc"),
                "mask_ptr": "*u8",
                "out_ptr": "*latent",
                **scalars_i,
                "BLOCK": "constexpr",
            },
            "constexprs": {"BLOCK": 4096},
            "num_warps": 8,
            "autotune": autotune,
        },
        {
            "name": "siss_partials_kernel",
            "kernel": siss_partials_kernel,
            "signature": {
                "pred_ptr": "*pred",
                **_tensor_args("noisy_ptr x0_ptr a0_ptr", "*latent"),
                **_tensor_args("gamma_ptr sigma_ptr partial_ptr", "*acc"),
                **_tensor_args("D chunk_size n_chunks plane", "i32"),
                "BLOCK": "constexpr",
            },
            "constexprs": {"BLOCK": 2048},
            "num_warps": 8,
        },
        {
            "name": "siss_finish_kernel",
            "kernel": siss_finish_kernel,
            "signature": {
                "partial_ptr": "*acc",
                "pred_ptr": "*pred",
                **_tensor_args("noisy_ptr x0_ptr a0_ptr", "*latent"),
                **_tensor_args("gamma_ptr sigma_ptr ell_x_ptr ell_a_ptr w_x_ptr w_a_ptr", "*acc"),
                **_tensor_args("B D n_chunks plane", "i32"),
                **_tensor_args("log_keep_hi log_keep_lo log_lambd_hi log_lambd_lo clip_hi clip_lo", "fp32"),
                "BLOCK_B": "constexpr",
                "BLOCK_C": "constexpr",
                "BLOCK_W": "constexpr",
            },
            "constexprs": {"BLOCK_B": 32, "BLOCK_C": 32, "BLOCK_W": 1024},
            "num_warps": 4,
        },
        {
            "name": "siss_backward_kernel",
            "kernel": siss_backward_kernel,
            "signature": {
                "pred_ptr": "*pred",
                **_tensor_args("noisy_ptr x0_ptr a0_ptr", "*latent"),
                **_tensor_args("gamma_ptr sigma_ptr grad_x_ptr grad_a_ptr w_x_ptr w_a_ptr", "*acc"),
                "out_ptr": "*pred",
                "D": "i32",
                **_tensor_args("two_over_d_hi two_over_d_lo", "fp32"),
                "BLOCK": "constexpr",
            },
            "constexprs": {"BLOCK": 4096},
            "num_warps": 8,
            "autotune": autotune,
        },
    ]


#: Every Triton kernel of the backend with an ahead-of-time compilation spec (see ``_kernel_specs``).
KERNELS: List[dict] = _kernel_specs()

#: dtype variants ``(pred, latent, acc)`` as Triton type names, for ahead-of-time compilation.
DTYPE_VARIANTS: Dict[str, Tuple[str, str, str]] = {
    "fp32": ("fp32", "fp32", "fp32"),
    "fp16": ("fp16", "fp16", "fp32"),
    "bf16": ("bf16", "bf16", "fp32"),
    "bf16_pred_fp32_latents": ("bf16", "fp32", "fp32"),
    "fp64": ("fp64", "fp64", "fp64"),
}
