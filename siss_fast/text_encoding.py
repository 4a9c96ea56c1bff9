"""Prompt embeddings for Stable Diffusion: each distinct prompt through the text encoder once.

Shared by the engine (training batches, validation sampling; re-exported as
:func:`siss_fast.engine.data.encode_prompts`), the metrics (``feature_guard``'s unconditional prompt) and the
demos, so all of them embed a prompt identically. It sits below both the engine and the metrics and imports
neither.
"""

from __future__ import annotations

from typing import Any, List, Sequence, Tuple

import torch
from torch import Tensor

__all__ = ["encode_prompts"]


def encode_prompts(tokenizer: Any, text_encoder: Any, prompts: Sequence[str], device: torch.device,
                   dtype: torch.dtype) -> Tuple[Tensor, List[int]]:
    """Embeddings of each *distinct* prompt, once: ``(P, L, D)`` fp32 and the index of each prompt in it.

    ``P`` is the number of distinct prompts (in order of first appearance), ``L`` the tokenizer's
    ``model_max_length`` (every prompt is padded or truncated to it), ``D`` the encoder's hidden size. The token
    ids (int64) go to ``device``; the encoder runs in its own dtype (``dtype`` is not used) and its last hidden
    state is returned cast to fp32, without gradients. The list has one entry per prompt of ``prompts``: its row
    in the tensor, so ``emb[idx]`` is ``(len(prompts), L, D)``.
    """
    distinct = list(dict.fromkeys(prompts))
    tokens = tokenizer(distinct, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                       return_tensors="pt")
    with torch.no_grad():
        hidden = text_encoder(tokens.input_ids.to(device), return_dict=False)[0]
    lookup = {p: i for i, p in enumerate(distinct)}
    return hidden.float(), [lookup[p] for p in prompts]
