"""LoRA adapters on the UNet (``train.lora_rank`` > 0) through ``peft``: attach, check, save, merge.

With ``train.lora_rank: R`` the engine injects rank-``R`` LoRA adapters (``peft.inject_adapter_in_model``, adapter
``"default"``, ``lora_alpha`` = ``train.lora_alpha`` or ``R``, no dropout; ``lora_B`` starts at 0, so step 0 is the
base model) into the UNet's attention projections (``to_q``, ``to_k``, ``to_v``, ``to_out.0``; with
``train.lora_targets: attention+conv`` also every ``Conv2d`` but ``conv_in`` / ``conv_out``). Only the adapter
parameters require grad: the optimizer and the SPEC §6 combiner hold them alone, the base weights never change.

What is small (adapter tensors only, fp32, keyed as in the adapted UNet's ``state_dict``, e.g.
``...to_q.lora_A.default.weight``): checkpoints' ``unet.safetensors``, the EMA's average and the validator's kept
states. At the end the kept adapter is loaded, ``OUTPUT_DIR/final_adapter/`` gets it in peft's save format
(``adapter_config.json`` + ``adapter_model.safetensors`` with ``base_model.model.`` keys: ``PeftModel.from_pretrained
(base_unet, folder)`` loads it) and ``OUTPUT_DIR/final/`` the merged weights ``W + (alpha / R) * B @ A`` as a plain
diffusers folder (no peft needed, nothing to unload).

With ``train.mixed_precision`` bf16 / fp16 the frozen ``Linear`` / ``Conv2d`` layers are stored in that dtype
(:func:`store_frozen_in`): SD-v1's UNet takes 1.72 GB instead of 3.44 GB, and the run computes the same bits as with
fp32 storage (autocast rounds those weights to the same dtype on every call). ``final/`` is then merged into the base
folder's fp32 weights, never into the rounded copies (:func:`merged_state` ``base_folder``).
"""

from __future__ import annotations

import importlib
import json
import os
import shutil
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import torch

from .errors import ConfigError

__all__ = ["ADAPTER", "TARGETS", "INSTALL", "check_config", "check_rank", "target_layers", "attach", "is_adapted",
           "store_frozen_in", "trainable_state", "load_trainable_state", "merged_state", "save_adapter"]

ADAPTER = "default"
TARGETS = ("attention", "attention+conv")
INSTALL = "pip install peft (or pip install 'siss_fast[lora]')"
_ATTENTION = ("to_q", "to_k", "to_v", "to_out.0")
_OUTER_CONVS = ("conv_in", "conv_out")  # their width is the image's channel count (3 or 4): too narrow for a rank


def check_config(train: Any) -> None:
    """Model-free checks of ``train.lora_rank`` / ``lora_alpha`` / ``lora_targets``; peft importable when used."""
    if train.lora_rank < 0:
        raise ConfigError(f"train.lora_rank: expected an integer >= 0 (0: train the full UNet), got {train.lora_rank}")
    if train.lora_targets not in TARGETS:
        raise ConfigError(f"train.lora_targets: expected one of {TARGETS}, got {train.lora_targets!r}")
    if train.lora_alpha is not None and not train.lora_alpha > 0:
        raise ConfigError(f"train.lora_alpha: expected a number > 0 or null (= train.lora_rank), got "
                          f"{train.lora_alpha}")
    if train.lora_rank > 0:
        try:
            importlib.import_module("peft")
        except ImportError as exc:
            raise ConfigError(f"train.lora_rank: {train.lora_rank} trains LoRA adapters through peft, which cannot "
                              f"be imported ({exc}); install it: {INSTALL}, or set train.lora_rank: 0") from None


def target_layers(unet: torch.nn.Module, targets: str) -> List[Tuple[str, int, int]]:
    """``(module name, in width, out width)`` of every layer ``targets`` adapts (Linear: features; Conv2d: channels)."""
    found = []
    for name, module in unet.named_modules():
        if isinstance(module, torch.nn.Linear) and (name.endswith(tuple("." + s for s in _ATTENTION))):
            found.append((name, module.in_features, module.out_features))
        elif (targets == "attention+conv" and isinstance(module, torch.nn.Conv2d) and name not in _OUTER_CONVS
              and module.groups == 1):
            found.append((name, module.in_channels, module.out_channels))
    return found


def check_rank(model_cfg: Any, train: Any) -> None:
    """The rank against the targeted layers of the configured UNet, built from its config on the meta device (no
    weights read). Raises :class:`ConfigError` naming ``train.lora_rank`` or ``train.lora_targets``."""
    from . import models

    try:
        unet = models.unet_skeleton(model_cfg)
    except models.ModelError as exc:
        raise ConfigError(f"model.path: {exc}") from None
    layers = target_layers(unet, train.lora_targets)
    if not layers:
        raise ConfigError(f"train.lora_targets: {train.lora_targets!r} matches no layer of this "
                          f"{type(unet).__name__} (no attention projections {', '.join(_ATTENTION)}); use "
                          "attention+conv, or train.lora_rank: 0")
    name, d_in, d_out = min(layers, key=lambda layer: min(layer[1], layer[2]))
    if train.lora_rank > min(d_in, d_out):
        raise ConfigError(f"train.lora_rank: {train.lora_rank} is larger than the smallest targeted layer "
                          f"({name}: {d_in} -> {d_out}); expected at most {min(d_in, d_out)}")


def lora_config(unet: torch.nn.Module, train: Any) -> Any:
    from peft import LoraConfig

    names = [name for name, _, _ in target_layers(unet, train.lora_targets)]
    alpha = train.lora_alpha if train.lora_alpha is not None else train.lora_rank
    return LoraConfig(r=train.lora_rank, lora_alpha=alpha, target_modules=names, lora_dropout=0.0,
                      init_lora_weights=True, bias="none")


def attach(unet: torch.nn.Module, train: Any) -> List[torch.nn.Parameter]:
    """Inject the adapters into ``unet`` in place; freeze everything else. Returns the adapter parameters (fp32, on
    the base layers' device); ``lora_A`` is drawn from torch's global generator, ``lora_B`` is 0."""
    from peft import inject_adapter_in_model

    if not is_adapted(unet):  # a second UnlearnStep on the same UNet reuses its adapter
        inject_adapter_in_model(lora_config(unet, train), unet, adapter_name=ADAPTER)
    unet.requires_grad_(False)
    params = [p for name, p in unet.named_parameters() if _is_adapter_key(name)]
    for p in params:
        p.requires_grad_(True)
    return params


def _cast_input(module: torch.nn.Module, args: Tuple[Any, ...]) -> Optional[Tuple[Any, ...]]:
    if not args or not torch.is_tensor(args[0]):
        module._siss_input_dtype = None
        return None
    module._siss_input_dtype = args[0].dtype  # the output goes back to it outside autocast (_restore_output)
    return (args[0].to(module.weight.dtype), *args[1:])


def _restore_output(module: torch.nn.Module, args: Tuple[Any, ...], out: torch.Tensor) -> torch.Tensor:
    if module._siss_input_dtype is None or torch.is_autocast_enabled(out.device.type):
        return out  # autocast's own rule: the layer's low-precision output flows on
    return out.to(module._siss_input_dtype)


def store_frozen_in(unet: torch.nn.Module, dtype: torch.dtype) -> int:
    """Store every frozen ``Linear`` / ``Conv2d`` layer of the adapted ``unet`` (weight and bias; the base layers
    under the adapters included) in ``dtype``, the run's autocast dtype, in place. Returns the bytes freed.

    Under autocast these layers compute in ``dtype`` whatever their storage: autocast casts an fp32 weight to it on
    every call, with the round-to-nearest-even of ``Tensor.to``, so forward, backward and the adapters' gradients are
    bit-identical to fp32 storage (``tests/test_lora.py``). Outside autocast (a metric that calls the UNet directly)
    a stored layer casts its input to ``dtype`` and its output back to the input's dtype: it computes as it would
    under autocast. Norm layers, the adapters and ``conv_in`` / ``conv_out`` stay fp32 -- the last two (0.1 % of
    SD-v1's weights) because diffusers reports a model's dtype as its first parameter's, which samplers and metrics
    read. ``lora_*`` layers require grad and are never touched.

    The frozen tensors left in fp32 (norms, the outer convolutions: a few MB) are copied into memory of their own:
    a UNet loaded from safetensors holds views of the file's memory map, and one such view would keep the whole map
    (3.44 GB of SD-v1 pages, counted in the resident set) alive after the large layers were cast."""
    freed = 0
    for name, module in unet.named_modules():
        if (isinstance(module, (torch.nn.Linear, torch.nn.Conv2d)) and name not in _OUTER_CONVS
                and not module.weight.requires_grad and module.weight.dtype != dtype):
            before = sum(p.numel() * p.element_size() for p in module.parameters(recurse=False))
            module.to(dtype)
            freed += before - sum(p.numel() * p.element_size() for p in module.parameters(recurse=False))
            module.register_forward_pre_hook(_cast_input)
            module.register_forward_hook(_restore_output)
    with torch.no_grad():
        for tensor in [*unet.parameters(), *unet.buffers()]:
            if not tensor.requires_grad and tensor.dtype != dtype:
                tensor.data = tensor.data.clone()
    return freed


def _is_low(tensor: torch.Tensor) -> bool:
    """A floating-point tensor stored below fp32 (:func:`store_frozen_in`)."""
    return tensor.is_floating_point() and tensor.dtype != torch.float32


def _is_adapter_key(key: str) -> bool:
    return any(part.startswith("lora_") for part in key.split("."))


def is_adapted(unet: torch.nn.Module) -> bool:
    """Whether ``unet`` (or the module ``torch.compile`` wraps) carries LoRA adapters."""
    unet = getattr(unet, "_orig_mod", unet)
    return any(_is_adapter_key(name) for name, _ in unet.named_parameters())


def trainable_state(unet: torch.nn.Module, *, copy: bool = True) -> Dict[str, torch.Tensor]:
    """What a run trains: the adapter tensors when ``unet`` is adapted, else the whole ``state_dict``; detached
    (CPU clones with ``copy``)."""
    unet = getattr(unet, "_orig_mod", unet)
    adapted = is_adapted(unet)
    state = {k: v.detach() for k, v in unet.state_dict().items() if not adapted or _is_adapter_key(k)}
    return {k: v.cpu().clone() for k, v in state.items()} if copy else state


def load_trainable_state(unet: torch.nn.Module, state: Dict[str, torch.Tensor]) -> None:
    """Inverse of :func:`trainable_state`: the keys must be exactly the adapter's (or the full UNet's) keys, else
    ``ValueError`` (e.g. a full-UNet checkpoint resumed with ``train.lora_rank`` > 0, or the reverse)."""
    unet = getattr(unet, "_orig_mod", unet)
    if not is_adapted(unet):
        unet.load_state_dict(state)
        return
    expected = {k for k in unet.state_dict() if _is_adapter_key(k)}
    if set(state) != expected:
        extra, missing = sorted(set(state) - expected)[:3], sorted(expected - set(state))[:3]
        raise ValueError(f"the saved state is not this run's adapter (train.lora_rank / lora_targets differ?): "
                         f"unexpected keys {extra}, missing {missing}")
    unet.load_state_dict(state, strict=False)


@torch.no_grad()
def merged_state(unet: torch.nn.Module, base_folder: Optional[Path] = None) -> Dict[str, torch.Tensor]:
    """The base UNet's ``state_dict`` (plain diffusers keys, CPU, fp32) with every adapter merged into its layer's
    weight: ``W + scaling * delta`` (peft's ``get_delta_weight``). Tensors the run stored in low precision
    (:func:`store_frozen_in`) are read from the base UNet folder's safetensors ``base_folder`` instead, in fp32."""
    from peft.tuners.lora import LoraLayer

    unet = getattr(unet, "_orig_mod", unet)
    state = {k.replace(".base_layer.", "."): v.detach() if _is_low(v) else v.detach().cpu().clone()  # low: replaced
             for k, v in unet.state_dict().items() if not _is_adapter_key(k)}
    lowered = [k for k, v in state.items() if _is_low(v)]
    if lowered:
        if base_folder is None:
            raise ValueError(f"merged_state: {len(lowered)} base weights are stored in {state[lowered[0]].dtype} "
                             "(store_frozen_in); pass base_folder, the base UNet's folder, for their fp32 values")
        from safetensors import safe_open

        from .models import weight_files

        wanted = set(lowered)
        for file in weight_files(base_folder):  # never an fp16 variant lying beside the fp32 file
            with safe_open(str(file), framework="pt") as f:
                for key in wanted.intersection(f.keys()):
                    state[key] = f.get_tensor(key).to(torch.float32)
                    wanted.discard(key)
        if wanted:
            raise ValueError(f"merged_state: {str(base_folder)!r} lacks {sorted(wanted)[:3]} of the base UNet")
    for name, module in unet.named_modules():
        if isinstance(module, LoraLayer) and ADAPTER in module.lora_A:
            key = f"{name}.weight"
            state[key] += module.get_delta_weight(ADAPTER).detach().cpu().to(state[key].dtype)
    return state


def save_adapter(unet: torch.nn.Module, train: Any, folder: Path) -> None:
    """``folder`` (written to a temp folder, then renamed): the adapter in peft's format, loadable with
    ``PeftModel.from_pretrained(base_unet, folder)``; ``siss_fast.json`` records rank, alpha and targets."""
    from peft import get_peft_model_state_dict
    from safetensors.torch import save_file

    unet = getattr(unet, "_orig_mod", unet)
    folder = Path(folder)
    tmp = folder.with_name(".tmp-" + folder.name)
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    weights = get_peft_model_state_dict(unet, adapter_name=ADAPTER)
    save_file({f"base_model.model.{k}": v.detach().cpu().contiguous() for k, v in weights.items()},
              str(tmp / "adapter_model.safetensors"), metadata={"format": "pt"})
    unet.peft_config[ADAPTER].save_pretrained(str(tmp))
    (tmp / "siss_fast.json").write_text(json.dumps({"lora_rank": train.lora_rank, "lora_alpha": train.lora_alpha,
                                                    "lora_targets": train.lora_targets}, indent=1))
    shutil.rmtree(folder, ignore_errors=True)
    os.replace(tmp, folder)
