"""Loading diffusion models offline, and building tiny ones with random weights.

* Pixel DDPM: a diffusers folder holding ``unet/`` (``UNet2DModel``) and ``scheduler/``, or a bare ``UNet2DModel``
  folder (``config.json`` + weights; the scheduler from ``scheduler_config.json`` there, else DDPM defaults).
* Stable Diffusion: a pipeline folder with ``unet/``, ``vae/``, ``text_encoder/``, ``tokenizer/``, ``scheduler/``.

Loading never touches the network (every ``from_pretrained`` gets ``local_files_only=True``, and the loaders run
with ``HF_HUB_OFFLINE=1``, ``TRANSFORMERS_OFFLINE=1`` and ``HF_HUB_DISABLE_TELEMETRY=1`` set for their duration only:
:func:`offline`, so a diffusers / transformers imported there starts offline; importing this module changes nothing)
and reads safetensors only. Pickle files (``.bin``, ``.ckpt``, ``.pt``) are refused unless
``allow_pickle: true``; then they are read with ``torch.load(weights_only=True)``.

The tiny builders (``tiny-ddpm``, ``tiny-sd``) make random-weight models from configs, save them as a diffusers
folder (the SD tokenizer is a byte-level BPE written here: the 256-byte base vocabulary, its end-of-word forms and a
few merges) and the engine loads that folder back through the same code as any user model.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional

import torch

__all__ = ["ModelError", "ModelInfo", "LoadedModel", "peek_model", "load_model", "build_tiny", "save_final",
           "unet_folder", "unet_safetensors", "weight_files", "unet_skeleton", "PICKLE_SUFFIXES"]

PICKLE_SUFFIXES = (".bin", ".ckpt", ".pt", ".pth")
SD_COMPONENTS = ("unet", "vae", "text_encoder", "tokenizer", "scheduler")


class ModelError(ValueError):
    """The folder is not a loadable diffusers model (the message says what is missing)."""


@dataclass
class ModelInfo:
    kind: str  # "ddpm" | "sd"
    image_size: Optional[int]  # pixels, if the configs say
    channels: int  # image channels
    num_timesteps: int


@dataclass
class LoadedModel:
    kind: str
    path: Path
    unet: Any
    scheduler: Any
    vae: Any = None
    text_encoder: Any = None
    tokenizer: Any = None

    @property
    def image_channels(self) -> int:
        return self.unet.config.in_channels if self.kind == "ddpm" else self.vae.config.in_channels

    @property
    def vae_scale(self) -> int:
        return 1 if self.vae is None else 2 ** (len(self.vae.config.block_out_channels) - 1)


_OFFLINE_ENV = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_HUB_DISABLE_TELEMETRY": "1"}


@contextlib.contextmanager
def offline() -> Iterator[None]:
    """Hugging Face libraries offline (and without telemetry) for the duration: the variables of ``_OFFLINE_ENV``
    are set inside and restored on exit."""
    saved = {key: os.environ.get(key) for key in _OFFLINE_ENV}
    os.environ.update(_OFFLINE_ENV)
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def _offline_call(fn: Any) -> Any:
    """Run ``fn`` inside :func:`offline`."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        with offline():
            return fn(*args, **kwargs)

    return wrapper


def _read_json(path: Path) -> Dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ModelError(f"cannot read {str(path)!r}: {exc}") from None


def _layout(path: Path) -> str:
    """``"sd"``, ``"ddpm"`` (pipeline folder with unet/ + scheduler/) or ``"unet"`` (a bare UNet2DModel folder)."""
    if not path.is_dir():
        raise ModelError(f"{str(path)!r} is not a folder")
    if all((path / c).is_dir() for c in SD_COMPONENTS):
        return "sd"
    if (path / "unet" / "config.json").is_file():
        cls = _read_json(path / "unet" / "config.json").get("_class_name")
        if cls == "UNet2DConditionModel":
            missing = [c for c in SD_COMPONENTS if not (path / c).is_dir()]
            raise ModelError(f"{str(path)!r} has a UNet2DConditionModel but lacks {missing} of a Stable Diffusion "
                             "pipeline folder")
        return "ddpm"
    if (path / "config.json").is_file() and _read_json(path / "config.json").get("_class_name") == "UNet2DModel":
        return "unet"
    raise ModelError(f"{str(path)!r} is not a diffusers model folder: expected unet/ + scheduler/ (pixel DDPM), "
                     f"{', '.join(c + '/' for c in SD_COMPONENTS)} (Stable Diffusion) or a UNet2DModel config.json")


def peek_model(model_cfg: Any) -> ModelInfo:
    """Kind, image size and timestep count from the JSON configs only (no weights): for config validation."""
    if model_cfg.build is not None:
        return ModelInfo("ddpm" if model_cfg.build == "tiny-ddpm" else "sd", model_cfg.image_size,
                         model_cfg.channels, 1000)
    path = Path(model_cfg.path)
    layout = _layout(path)
    unet_dir = path if layout == "unet" else path / "unet"
    unet_cfg = _read_json(unet_dir / "config.json")
    sched_file = path / "scheduler_config.json" if layout == "unet" else path / "scheduler" / "scheduler_config.json"
    steps = _read_json(sched_file).get("num_train_timesteps", 1000) if sched_file.is_file() else 1000
    size = unet_cfg.get("sample_size")
    size = size[0] if isinstance(size, (list, tuple)) else size
    if layout == "sd":
        vae_cfg = _read_json(path / "vae" / "config.json")
        factor = 2 ** (len(vae_cfg.get("block_out_channels", [0])) - 1)
        return ModelInfo("sd", None if size is None else size * factor, vae_cfg.get("in_channels", 3), steps)
    return ModelInfo("ddpm", size, unet_cfg.get("in_channels", 3), steps)


def _weights_format(folder: Path, allow_pickle: bool) -> bool:
    """True for safetensors; False for pickle (only with allow_pickle); raises otherwise."""
    if any(folder.glob("*.safetensors")):
        return True
    pickles = [p.name for p in folder.iterdir() if p.suffix in PICKLE_SUFFIXES]
    if pickles and not allow_pickle:
        raise ModelError(f"{str(folder)!r} holds only pickle weights {pickles}: convert them to safetensors, or set "
                         "model.allow_pickle: true to load them with torch.load(weights_only=True)")
    if not pickles:
        raise ModelError(f"{str(folder)!r} holds no weights (*.safetensors)")
    return False


def _load_component(cls: Any, folder: Path, allow_pickle: bool) -> Any:
    if not (folder / "config.json").is_file():
        raise ModelError(f"{str(folder)!r}: missing config.json")
    if _weights_format(folder, allow_pickle):
        return cls.from_pretrained(str(folder), local_files_only=True, use_safetensors=True)
    # pickle, explicitly allowed: build from the config and read the state dict with weights_only=True
    weights = sorted(p for p in folder.iterdir() if p.suffix in PICKLE_SUFFIXES)
    if hasattr(cls, "from_config"):
        model = cls.from_config(cls.load_config(str(folder)))
    else:  # transformers
        model = cls(cls.config_class.from_pretrained(str(folder), local_files_only=True))
    state: Dict[str, Any] = {}
    for w in weights:
        try:
            state.update(torch.load(w, map_location="cpu", weights_only=True))
        except Exception as exc:  # weights_only refuses code, unknown globals, and anything but tensors/containers
            raise ModelError(f"{str(w)!r}: not loadable as plain weights with torch.load(weights_only=True) "
                             f"(a pickle that is not a state dict is never executed): {exc}") from None
    model.load_state_dict(state)
    return model


@_offline_call
def load_model(path: str, *, allow_pickle: bool = False) -> LoadedModel:
    """Load a pixel DDPM or a Stable Diffusion pipeline folder (fp32, CPU, offline)."""
    from diffusers import DDPMScheduler

    root = Path(path)
    layout = _layout(root)
    if layout == "sd":
        from diffusers import AutoencoderKL, UNet2DConditionModel
        from transformers import CLIPTextModel, CLIPTokenizer

        unet = _load_component(UNet2DConditionModel, root / "unet", allow_pickle)
        vae = _load_component(AutoencoderKL, root / "vae", allow_pickle)
        text_encoder = _load_component(CLIPTextModel, root / "text_encoder", allow_pickle)
        try:
            tokenizer = CLIPTokenizer.from_pretrained(str(root / "tokenizer"), local_files_only=True)
        except Exception as exc:
            raise ModelError(f"{str(root / 'tokenizer')!r}: cannot load the CLIP tokenizer: {exc}") from None
        scheduler = DDPMScheduler.from_pretrained(str(root / "scheduler"), local_files_only=True)
        return LoadedModel("sd", root, unet, scheduler, vae, text_encoder, tokenizer)
    from diffusers import UNet2DModel

    unet_dir = root if layout == "unet" else root / "unet"
    unet = _load_component(UNet2DModel, unet_dir, allow_pickle)
    sched_dir = root if layout == "unet" else root / "scheduler"
    if (sched_dir / "scheduler_config.json").is_file():
        scheduler = DDPMScheduler.from_pretrained(str(sched_dir), local_files_only=True)
    else:
        scheduler = DDPMScheduler(num_train_timesteps=1000)
    return LoadedModel("ddpm", root, unet, scheduler)


# ------------------------------------------------------------------------------------------------ tiny builders


def _bytes_to_unicode() -> List[str]:
    """The byte -> printable-character table of byte-level BPE (GPT-2 / CLIP)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    extra = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + extra)
            extra += 1
    return [chr(c) for c in cs]


def write_tiny_tokenizer(folder: Path, max_length: int = 16) -> None:
    """A CLIP byte-level BPE tokenizer: 256 bytes, their ``</w>`` forms, a few merges, the two special tokens."""
    folder.mkdir(parents=True, exist_ok=True)
    chars = _bytes_to_unicode()
    merges = [("t", "h"), ("th", "e</w>"), ("a", "n"), ("an", "d</w>"), ("o", "f</w>")]
    vocab = chars + [c + "</w>" for c in chars] + [a + b for a, b in merges] + ["<|startoftext|>", "<|endoftext|>"]
    (folder / "vocab.json").write_text(json.dumps({tok: i for i, tok in enumerate(vocab)}))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges))
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "CLIPTokenizer", "model_max_length": max_length, "bos_token": "<|startoftext|>",
        "eos_token": "<|endoftext|>", "pad_token": "<|endoftext|>", "unk_token": "<|endoftext|>"}))


@_offline_call
def build_tiny(name: str, folder: Path, *, channels: int = 3, image_size: int = 16, seed: int = 0) -> Path:
    """Write a random-weight ``tiny-ddpm`` or ``tiny-sd`` diffusers folder to ``folder`` (safetensors)."""
    from diffusers import DDPMScheduler

    torch.manual_seed(seed)
    folder = Path(folder)
    scheduler = DDPMScheduler(num_train_timesteps=1000, beta_schedule="linear")
    if name == "tiny-sd":  # latents are not images in [-1, 1]: never clip them (Stable Diffusion's own setting)
        scheduler = DDPMScheduler(num_train_timesteps=1000, beta_schedule="linear", clip_sample=False)
    if name == "tiny-ddpm":
        unet = _tiny_unet(name, channels, image_size)
        unet.save_pretrained(str(folder / "unet"), safe_serialization=True)
        scheduler.save_pretrained(str(folder / "scheduler"))
        (folder / "model_index.json").write_text(json.dumps({
            "_class_name": "DDPMPipeline", "unet": ["diffusers", "UNet2DModel"],
            "scheduler": ["diffusers", "DDPMScheduler"]}, indent=2))
        return folder
    if name != "tiny-sd":
        raise ModelError(f"model.build: expected tiny-ddpm or tiny-sd, got {name!r}")
    from diffusers import AutoencoderKL
    from transformers import CLIPTextConfig, CLIPTextModel

    write_tiny_tokenizer(folder / "tokenizer")
    vocab_size = len(json.loads((folder / "tokenizer" / "vocab.json").read_text()))
    text_cfg = CLIPTextConfig(vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                              num_attention_heads=4, max_position_embeddings=16, bos_token_id=vocab_size - 2,
                              eos_token_id=vocab_size - 1, pad_token_id=vocab_size - 1)
    CLIPTextModel(text_cfg).save_pretrained(str(folder / "text_encoder"), safe_serialization=True)
    vae = AutoencoderKL(in_channels=channels, out_channels=channels, latent_channels=4, block_out_channels=(16, 32),
                        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                        layers_per_block=1, norm_num_groups=8, sample_size=image_size)
    vae.save_pretrained(str(folder / "vae"), safe_serialization=True)
    unet = _tiny_unet(name, channels, image_size)
    unet.save_pretrained(str(folder / "unet"), safe_serialization=True)
    scheduler.save_pretrained(str(folder / "scheduler"))
    (folder / "model_index.json").write_text(json.dumps(_sd_index(), indent=2))
    return folder


def _tiny_unet(name: str, channels: int, image_size: int) -> Any:
    """The tiny UNet of ``build_tiny`` (random weights, on torch's current default device)."""
    if name == "tiny-ddpm":
        from diffusers import UNet2DModel

        return UNet2DModel(sample_size=image_size, in_channels=channels, out_channels=channels, layers_per_block=1,
                           block_out_channels=(16, 32), norm_num_groups=8,
                           down_block_types=("DownBlock2D", "AttnDownBlock2D"),
                           up_block_types=("AttnUpBlock2D", "UpBlock2D"))
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(sample_size=image_size // 2, in_channels=4, out_channels=4, layers_per_block=1,
                                block_out_channels=(32, 64), norm_num_groups=8, cross_attention_dim=32,
                                attention_head_dim=8,
                                down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"))


def unet_folder(path: Path) -> Path:
    """The UNet's own folder of the model folder ``path`` (``path`` itself for a bare UNet2DModel folder)."""
    path = Path(path)
    return path if _layout(path) == "unet" else path / "unet"


def weight_files(folder: Path) -> List[Path]:
    """The ``*.safetensors`` files of a component folder that diffusers loads without a variant (one file or the
    shards), sorted: ``diffusion_pytorch_model.fp16.safetensors`` and other variants lying beside them are left out."""
    return sorted(f for f in Path(folder).glob("*.safetensors") if "." not in f.stem)


def unet_safetensors(path: Optional[Path]) -> bool:
    """Whether ``path`` is a model folder holding its UNet's weights as safetensors (readable tensor by tensor)."""
    if path is None:
        return False
    try:
        return bool(weight_files(unet_folder(path)))
    except ModelError:
        return False


def unet_skeleton(model_cfg: Any) -> torch.nn.Module:
    """The configured UNet built from its config alone on the meta device (shapes, no weights, no memory): for
    config checks that depend on layer sizes (``train.lora_rank``). Raises :class:`ModelError`."""
    with torch.device("meta"):
        if model_cfg.build is not None:
            return _tiny_unet(model_cfg.build, model_cfg.channels, model_cfg.image_size)
        unet_dir = unet_folder(Path(model_cfg.path))
        config = _read_json(unet_dir / "config.json")
        import diffusers

        cls = getattr(diffusers, str(config.get("_class_name", "UNet2DModel")), None)
        if cls is None:
            raise ModelError(f"{str(unet_dir / 'config.json')!r}: unknown UNet class {config.get('_class_name')!r}")
        return cls.from_config(config)


def _sd_index() -> Dict[str, Any]:
    return {"_class_name": "StableDiffusionPipeline", "unet": ["diffusers", "UNet2DConditionModel"],
            "vae": ["diffusers", "AutoencoderKL"], "text_encoder": ["transformers", "CLIPTextModel"],
            "tokenizer": ["transformers", "CLIPTokenizer"], "scheduler": ["diffusers", "DDPMScheduler"],
            "safety_checker": [None, None], "feature_extractor": [None, None], "requires_safety_checker": False}


def save_final(model: LoadedModel, unet_state: Dict[str, torch.Tensor], folder: Path, *,
               frozen_from: Optional[Path] = None) -> None:
    """A diffusers folder at ``folder`` (written to a temp folder, then renamed): the UNet ``unet_state`` (fp32: its
    config and one safetensors file, written from the state itself -- no second UNet in memory, 3.4 GB at SD-v1
    size) plus the other components. Stable Diffusion's ``vae/``, ``text_encoder/`` and ``tokenizer/`` are copied
    byte for byte from ``frozen_from`` when given -- the engine's case: they are the base model's, never trained,
    whatever precision the run cast them to and whether or not it still holds them (:func:`release_frozen`) -- else
    saved from ``model``'s objects (a pipeline built in memory, e.g. the text-to-image demo's trained VAE)."""
    import shutil

    from safetensors.torch import save_file

    folder = Path(folder)
    tmp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    model.unet.save_config(str(tmp / "unet"))
    state = {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in unet_state.items()}
    save_file(state, str(tmp / "unet" / "diffusion_pytorch_model.safetensors"), metadata={"format": "pt"})
    del state
    model.scheduler.save_pretrained(str(tmp / "scheduler"))
    if model.kind == "sd":
        if frozen_from is not None:
            for part in ("vae", "text_encoder", "tokenizer"):
                shutil.copytree(Path(frozen_from) / part, tmp / part)
        else:
            model.vae.save_pretrained(str(tmp / "vae"), safe_serialization=True)
            model.text_encoder.save_pretrained(str(tmp / "text_encoder"), safe_serialization=True)
            model.tokenizer.save_pretrained(str(tmp / "tokenizer"))
        index = _sd_index()
    else:
        index = {"_class_name": "DDPMPipeline", "unet": ["diffusers", "UNet2DModel"],
                 "scheduler": ["diffusers", "DDPMScheduler"]}
    (tmp / "model_index.json").write_text(json.dumps(index, indent=2))
    shutil.rmtree(folder, ignore_errors=True)
    os.replace(tmp, folder)


def release_frozen(model: LoadedModel) -> None:
    """Free the VAE's and the text encoder's weights (moved to the meta device; their configs stay readable) once the
    run has cached what it needs of them (latents, prompt embeddings) and nothing will call them again -- a run
    without validation. SD-v1: 0.82 GB. :func:`save_final` copies them from the base folder."""
    for part in (model.vae, model.text_encoder):
        if part is not None:
            part.to("meta")


def hash_model_folder(path: Path) -> str:
    """sha256 over the sorted (relative path, content) of every weight and config file of a model folder."""
    import hashlib

    from ..hashing import update_from_file

    digest = hashlib.sha256()
    for f in sorted(p for p in Path(path).rglob("*") if p.is_file()):
        if f.suffix in (".safetensors", ".json", ".txt") + PICKLE_SUFFIXES:
            digest.update(str(f.relative_to(path)).encode())
            update_from_file(digest, f)
    return digest.hexdigest()
