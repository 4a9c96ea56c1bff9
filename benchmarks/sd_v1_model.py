"""Stable Diffusion v1's architecture with random weights, built offline from configs.

* :data:`SD_V1_UNET` -- ``UNet2DConditionModel`` of SD v1.x (859.5M parameters; 4 x 64 x 64 latents, 77 x 768
  text states);
* :data:`SD_V1_VAE` -- SD's ``AutoencoderKL`` (83.7M; 3 x 512 x 512 images <-> 4 x 64 x 64 latents, scaling
  factor 0.18215);
* :data:`SD_V1_TEXT` -- a CLIP ViT-L/14-sized text encoder (12 layers, width 768, 123M; vocabulary 49,408);
* :func:`sd_v1_scheduler` -- SD v1's training noise schedule (``scaled_linear``, betas 0.00085-0.012, 1,000 steps);
* :func:`build_sd_v1` -- all of it written as a ``StableDiffusionPipeline`` folder (safetensors, ~4.3 GB) with the
  engine's offline byte-level tokenizer at 77 tokens, loadable by ``siss_fast.engine.models.load_model`` and
  ``siss-fast unlearn``. Nothing is downloaded.

Used by ``bench_engine.py --sd-v1``, ``sd_v1_unlearn.py`` (the engine at SD-v1 size) and ``validation_cost.py``
(FLOP counts on meta-device models).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Dict

import torch

__all__ = ["SD_V1_UNET", "SD_V1_VAE", "SD_V1_TEXT", "sd_v1_scheduler", "build_sd_v1"]

SD_V1_UNET: Dict[str, Any] = dict(
    sample_size=64, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(320, 640, 1280, 1280),
    down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
    up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3, cross_attention_dim=768, attention_head_dim=8,
    norm_num_groups=32, act_fn="silu", center_input_sample=False, downsample_padding=1, flip_sin_to_cos=True,
    freq_shift=0, mid_block_scale_factor=1)
SD_V1_VAE: Dict[str, Any] = dict(
    in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(128, 256, 512, 512),
    down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4, layers_per_block=2,
    norm_num_groups=32, sample_size=512, scaling_factor=0.18215)
SD_V1_TEXT: Dict[str, Any] = dict(
    vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
    max_position_embeddings=77, hidden_act="quick_gelu")


def sd_v1_scheduler():
    """Stable Diffusion v1's training noise schedule (a ``DDPMScheduler``)."""
    from diffusers import DDPMScheduler

    return DDPMScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                         clip_sample=False)


def build_sd_v1(folder: Path, seed: int = 0) -> Path:
    """Write a random-weight pipeline of SD v1's architecture to ``folder`` (one component at a time, so the peak
    resident memory is about one UNet, 3.4 GB). Returns ``folder``."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from siss_fast.engine import models as engine_models

    folder = Path(folder)
    torch.manual_seed(seed)
    engine_models.write_tiny_tokenizer(folder / "tokenizer", max_length=77)
    vocab = len(json.loads((folder / "tokenizer" / "vocab.json").read_text()))
    text = CLIPTextModel(CLIPTextConfig(**SD_V1_TEXT, bos_token_id=vocab - 2, eos_token_id=vocab - 1,
                                        pad_token_id=vocab - 1))
    text.save_pretrained(str(folder / "text_encoder"), safe_serialization=True)
    del text
    vae = AutoencoderKL(**SD_V1_VAE)
    vae.save_pretrained(str(folder / "vae"), safe_serialization=True)
    del vae
    unet = UNet2DConditionModel(**SD_V1_UNET)
    unet.save_pretrained(str(folder / "unet"), safe_serialization=True)
    del unet
    sd_v1_scheduler().save_pretrained(str(folder / "scheduler"))
    (folder / "model_index.json").write_text(json.dumps(engine_models._sd_index(), indent=2))
    return folder
