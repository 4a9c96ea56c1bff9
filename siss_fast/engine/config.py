"""Run configuration: YAML -> typed dataclasses, ``key=value`` overrides, validation before any model loads.

A config file is a YAML mapping with the sections below (every key optional except the data folders and a model)::

    model:      {path: DIR | build: tiny-ddpm | tiny-sd, allow_pickle: false, channels: 3, image_size: 16, seed: 0}
    data:       {retain_dir: DIR, forget_dir: DIR, captions: FILE, retain_prompt: STR, forget_prompt: STR,
                 train_size: N}
    method:     {name: siss, lambd: 0.5, weight_clip: null, t_range: null, retain_source: complement}
    gradient:   {rule: null (the method's rule), scaling_norm: auto, auto_steps: 8, max_forget_scale: 1e4, max_grad_norm: 1.0,
                 mode: exact, partitioned: true, lag_every: 10, eta: 0.1, max_consecutive_skips: 10}
    train:      {steps: 100, batch_size: null, accumulation_steps: 1, lr: null, weight_decay: 0.01, betas: [0.9, 0.999],
                 eps: 1e-8, lr_schedule: constant, warmup_steps: 0, mixed_precision: "no", gradient_checkpointing: false,
                 compile: false, seed: 0, device: auto, cpu_threads: null, deterministic: false,
                 lora_rank: 0 (0: the full UNet), lora_alpha: null (= rank), lora_targets: attention}
    checkpoint: {every: 0, keep_last: 2, resume: null | latest | DIR}
    validation: {every: null, num_samples: null, sampler_steps: null (null: the model kind's default,
                 engine/defaults.py), seed: 0, ... stop rules, see ValidationConfig}
    log:        {progress: true, tensorboard: false}
    output_dir: runs/unlearn

Overrides are dotted keys (``train.lr=1e-4``) with YAML-parsed values; shortcuts: ``model=PATH``, ``steps=N``,
``output_dir=PATH``, ``checkpoint_every=N``, ``resume=latest``, ``method=NAME``, ``batch_size=N``, ``lr=X``.
Every violation raises :class:`ConfigError` naming the key (or the file) and what is valid. This module holds the
schema (the dataclasses below), loading and validation; checking values against the annotations is the generic
layer in :mod:`siss_fast.engine.config_types`.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Union

from siss_fast.gradient_rules import RULES
from siss_fast.methods import check_method_params

from .config_types import build_dataclass, merge_mappings
from . import lora
from .defaults import KIND_DEFAULTS, VALIDATION_DEFAULTS, apply_kind_defaults, resolve_validation
from .errors import ConfigError

__all__ = ["ConfigError", "EngineConfig", "load_config", "parse_overrides", "to_dict", "SHORTCUTS", "KIND_DEFAULTS",
           "VALIDATION_DEFAULTS", "apply_kind_defaults"]


BUILDS = ("tiny-ddpm", "tiny-sd")
PRECISIONS = ("no", "bf16", "fp16")
LR_SCHEDULES = ("constant", "linear", "cosine")

SHORTCUTS = {
    "model": "model.path",
    "steps": "train.steps",
    "batch_size": "train.batch_size",
    "lr": "train.lr",
    "seed": "train.seed",
    "device": "train.device",
    "checkpoint_every": "checkpoint.every",
    "resume": "checkpoint.resume",
    "method": "method.name",
    "validation_every": "validation.every",
}


@dataclass
class ModelConfig:
    path: Optional[str] = None  # local diffusers folder (DDPM pipeline/UNet folder, or SD pipeline folder)
    build: Optional[str] = None  # tiny-ddpm | tiny-sd: random weights from a config (examples, tests)
    allow_pickle: bool = False  # accept .bin/.ckpt/.pt weights (loaded with weights_only=True)
    channels: int = 3  # build only: image channels (tiny-ddpm: 1 or 3)
    image_size: int = 16  # build only: image side in pixels
    seed: int = 0  # build only: weight initialisation


@dataclass
class DataConfig:
    retain_dir: str = ""
    forget_dir: str = ""
    captions: Optional[str] = None  # JSON {file name: caption} or lines "file name<TAB>caption"
    retain_prompt: Optional[str] = None  # one prompt for every retain image (SD)
    forget_prompt: Optional[str] = None  # one prompt for every forget image (SD)
    train_size: Optional[int] = None  # n = |X| for retain_source=full (default: retain + forget images)


@dataclass
class MethodConfig:
    name: str = "siss"  # a registered method (siss_fast.methods: siss, siss_nois, naive, neggrad, erasediff, ...)
    lambd: Optional[float] = None  # the methods that take it (siss, bernoulli; default 0.5)
    weight_clip: Optional[float] = None  # the methods that take it (siss)
    t_range: Optional[List[int]] = None  # inclusive [t_min, t_max]; default the whole range
    retain_source: str = "complement"  # complement | full


@dataclass
class GradientConfig:
    rule: Optional[str] = None  # rescale | clip | erasediff; default: the method's (siss_fast.methods, MethodSpec.rule)
    scaling_norm: Union[float, str] = "auto"  # c, or auto = 0.1 x the median |G_x| of the first auto_steps steps
    auto_steps: int = 8  # steps whose |G_x| the auto scaling norm takes the median of
    max_forget_scale: Optional[float] = 1e4
    max_grad_norm: Optional[float] = 1.0
    mode: str = "exact"  # exact | lagged (approximation: one backward with the last measured coefficient)
    partitioned: bool = True  # siss, exact: pure-retain / pure-forget / mixed groups (about one backward)
    lag_every: int = 10
    eta: float = 0.1  # erasediff
    max_consecutive_skips: int = 10  # non-finite steps in a row before the run stops


@dataclass
class TrainConfig:
    steps: int = 100
    batch_size: Optional[int] = None  # per process and micro-batch; null: the model kind's default (KIND_DEFAULTS)
    accumulation_steps: int = 1
    lr: Optional[float] = None  # null: the model kind's default (KIND_DEFAULTS)
    ema_decay: Union[float, str] = "auto"  # validate and keep the weights' moving average (engine/ema.py); 0: off;
    #   auto: the model kind's default (KIND_DEFAULTS: pixel DDPM 0.97, SD off -- one more copy of the UNet)
    weight_decay: float = 0.01
    betas: List[float] = field(default_factory=lambda: [0.9, 0.999])
    eps: float = 1e-8
    lr_schedule: str = "constant"
    warmup_steps: int = 0
    mixed_precision: str = "no"  # no | bf16 | fp16 (autocast; fp32 master weights)
    gradient_checkpointing: bool = False
    compile: bool = False
    seed: int = 0
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    cpu_threads: Optional[int] = None  # torch.set_num_threads for the run (null: torch's default)
    deterministic: bool = False  # torch.use_deterministic_algorithms(True) for the run (see engine.loop)
    lora_rank: int = 0  # > 0: train LoRA adapters of this rank (peft) instead of the full UNet (engine/lora.py)
    lora_alpha: Optional[float] = None  # LoRA scale alpha / rank; null: = lora_rank
    lora_targets: str = "attention"  # attention | attention+conv


@dataclass
class CheckpointConfig:
    every: int = 0  # 0: no periodic checkpoints
    keep_last: int = 2
    resume: Optional[str] = None  # null | latest | a checkpoint folder


@dataclass
class ValidationConfig:
    # null / "auto": the model kind's default (engine/defaults.py: VALIDATION_DEFAULTS)
    every: Optional[int] = None  # 0: no validation (then no stop rules, the final model is the end state)
    num_samples: Optional[int] = None  # unconditional samples per check (guard, forget_nn)
    sampler_steps: Optional[int] = None  # DDIM steps of those samples
    seed: int = 0
    batch_size: int = 64
    guidance_scale: float = 1.0  # SD: classifier-free guidance (1 = off)
    prompt: Optional[str] = None  # SD: default the forget prompt (of the first forget image)
    metrics: Optional[List[str]] = None
    metric_options: Dict[str, Dict[str, Any]] = field(default_factory=dict)
    forget_metric: Optional[str] = "auto"  # null: no forget target
    forget_target: Optional[float] = None  # absolute: met when forget_metric <= it (>= if higher-is-better)
    forget_target_ratio: float = 0.1  # forget_target null: met when forget_metric <= ratio x its value at step 0
    target_patience: int = 2  # validations in a row that must meet the target before it stops the run
    quality_metric: Optional[str] = "auto"  # null: no quality guard
    quality_tolerance: Optional[float] = None  # guard trips when quality worsens by more than this fraction of the
    #   baseline; null: the quality metric's registered tolerance (feature_fd 0.5, others 0.15)
    stop_on_target: bool = True
    stop_on_guard: bool = True
    min_steps: int = 1  # no stop rule before this step
    grids: bool = True


@dataclass
class LogConfig:
    progress: bool = True
    tensorboard: bool = False


@dataclass
class EngineConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    method: MethodConfig = field(default_factory=MethodConfig)
    gradient: GradientConfig = field(default_factory=GradientConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    validation: ValidationConfig = field(default_factory=ValidationConfig)
    log: LogConfig = field(default_factory=LogConfig)
    output_dir: str = "runs/unlearn"
    config_dir: str = field(default=".", metadata={"internal": True})  # relative paths resolve against it


# ----------------------------------------------------------------------------------------------------- loading


def parse_overrides(overrides: Sequence[str]) -> Dict[str, Any]:
    """``["train.lr=1e-4", "steps=5"]`` -> nested dict (values parsed as YAML; shortcuts expanded)."""
    import yaml

    nested: Dict[str, Any] = {}
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r}: expected KEY=VALUE (e.g. steps=50, train.lr=1e-4)")
        key, raw = item.split("=", 1)
        key = SHORTCUTS.get(key.strip(), key.strip())
        try:
            value = yaml.safe_load(raw) if raw.strip() else None
        except yaml.YAMLError as exc:
            raise ConfigError(f"{key}: cannot parse value {raw!r}: {exc}") from None
        if key == "model.path":
            nested.setdefault("model", {})["build"] = None  # a path replaces a build recipe
        node = nested
        parts = key.split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"{key}: {part} is not a section")
        node[parts[-1]] = value
    return nested


def to_dict(cfg: EngineConfig) -> Dict[str, Any]:
    """The resolved config as plain data (written to the run folder and the manifest)."""
    d = dataclasses.asdict(cfg)
    d.pop("config_dir", None)
    return d


def load_config(source: Union[str, os.PathLike, Dict[str, Any], None] = None, overrides: Sequence[str] = (),
                *, check_files: bool = True) -> EngineConfig:
    """Read a YAML file (or a dict), apply ``key=value`` overrides, type-check and validate.

    Relative paths in the file resolve against the file's folder. ``check_files`` also opens the image folders
    and captions (sizes, readability) and reads the model's JSON configs -- still before any weights load.
    """
    import yaml

    config_dir = Path.cwd()
    if source is None:
        data: Dict[str, Any] = {}
    elif isinstance(source, dict):
        data = dict(source)
    else:
        path = Path(source)
        if not path.is_file():
            raise ConfigError(f"config file {str(path)!r}: not found")
        try:
            data = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as exc:
            raise ConfigError(f"config file {str(path)!r}: invalid YAML: {exc}") from None
        if not isinstance(data, dict):
            raise ConfigError(f"config file {str(path)!r}: expected a mapping at the top level")
        config_dir = path.resolve().parent
    model = data.get("model")
    if isinstance(model, str):  # `model: PATH` shorthand
        data["model"] = {"path": model}
    data = merge_mappings(data, parse_overrides(overrides))
    cfg = build_dataclass(EngineConfig, data, "")
    cfg.config_dir = str(config_dir)
    cfg = _resolve_paths(cfg, Path.cwd() if overrides else config_dir, data, overrides)
    validate(cfg, check_files=check_files)
    return cfg


def _resolve_paths(cfg: EngineConfig, cwd: Path, data: Dict[str, Any], overrides: Sequence[str]) -> EngineConfig:
    """File paths from the config file resolve against its folder; paths given on the command line against cwd."""
    base = Path(cfg.config_dir)
    from_cli = set()
    for item in overrides:
        key = item.split("=", 1)[0].strip()
        from_cli.add(SHORTCUTS.get(key, key))

    def fix(section: Any, name: str, dotted: str) -> None:
        value = getattr(section, name)
        if value and not os.path.isabs(value) and not (dotted == "checkpoint.resume" and value == "latest"):
            root = Path.cwd() if dotted in from_cli else base
            setattr(section, name, str((root / value).resolve()))

    fix(cfg.model, "path", "model.path")
    fix(cfg.data, "retain_dir", "data.retain_dir")
    fix(cfg.data, "forget_dir", "data.forget_dir")
    fix(cfg.data, "captions", "data.captions")
    fix(cfg.checkpoint, "resume", "checkpoint.resume")
    fix(cfg, "output_dir", "output_dir")
    return cfg


# ----------------------------------------------------------------------------------------------- validation


def _require(ok: bool, key: str, message: str) -> None:
    if not ok:
        raise ConfigError(f"{key}: {message}")


def _positive(key: str, value: Optional[float], *, allow_none: bool = False, allow_zero: bool = False) -> None:
    if value is None:
        _require(allow_none, key, "expected a number, got null")
        return
    ok = math.isfinite(value) and (value >= 0 if allow_zero else value > 0)
    _require(ok, key, f"expected a finite number {'>= 0' if allow_zero else '> 0'}, got {value!r}")


def validate(cfg: EngineConfig, *, check_files: bool = True) -> None:
    """Range and consistency checks; with ``check_files`` also the model folder's JSON and the image folders."""
    m, g, t, v = cfg.method, cfg.gradient, cfg.train, cfg.validation

    # model
    _require((cfg.model.path is None) != (cfg.model.build is None), "model",
             f"expected exactly one of model.path (a local diffusers folder) or model.build ({', '.join(BUILDS)}), "
             f"got path={cfg.model.path!r}, build={cfg.model.build!r}")
    if cfg.model.build is not None:
        _require(cfg.model.build in BUILDS, "model.build", f"expected one of {BUILDS}, got {cfg.model.build!r}")
        ch = (1, 3) if cfg.model.build == "tiny-ddpm" else (3,)
        _require(cfg.model.channels in ch, "model.channels", f"expected one of {ch}, got {cfg.model.channels}")
        _require(cfg.model.image_size >= 8 and cfg.model.image_size % 8 == 0, "model.image_size",
                 f"expected a multiple of 8 >= 8, got {cfg.model.image_size}")

    # method: what the method's record (siss_fast.methods) takes
    try:
        spec = check_method_params(m.name, lambd=m.lambd, weight_clip=m.weight_clip, retain_source=m.retain_source)
    except ValueError as exc:  # "<param>: <what is valid>"; the unknown-name message starts with "method:"
        param, _, message = str(exc).partition(": ")
        raise ConfigError(f"method.{'name' if param == 'method' else param}: {message}") from None
    if m.weight_clip is not None:
        _positive("method.weight_clip", m.weight_clip)
    if m.t_range is not None:
        _require(len(m.t_range) == 2 and 0 <= m.t_range[0] <= m.t_range[1], "method.t_range",
                 f"expected [t_min, t_max] with 0 <= t_min <= t_max, got {m.t_range}")

    # gradient
    if g.rule is not None:
        _require(g.rule in RULES, "gradient.rule", f"expected one of {RULES} or null, got {g.rule!r}")
    if isinstance(g.scaling_norm, str):
        _require(g.scaling_norm == "auto", "gradient.scaling_norm",
                 f"expected a number > 0 or 'auto', got {g.scaling_norm!r}")
        # auto measures |G_x| on the first steps; a method without a retain term (neggrad) has none to measure
        _require(spec.has_retain, "gradient.scaling_norm",
                 f"expected a number > 0 for method {m.name} ('auto' = 0.1 |G_x| needs a retain term), got 'auto'")
    else:
        _positive("gradient.scaling_norm", g.scaling_norm)
    _positive("gradient.max_forget_scale", g.max_forget_scale, allow_none=True)
    _positive("gradient.max_grad_norm", g.max_grad_norm, allow_none=True)
    _require(g.mode in ("exact", "lagged"), "gradient.mode", f"expected exact or lagged, got {g.mode!r}")
    _require(g.lag_every >= 1, "gradient.lag_every", f"expected an integer >= 1, got {g.lag_every}")
    _require(g.auto_steps >= 1, "gradient.auto_steps", f"expected an integer >= 1, got {g.auto_steps}")
    _positive("gradient.eta", g.eta, allow_zero=True)
    _require(g.max_consecutive_skips >= 1, "gradient.max_consecutive_skips",
             f"expected an integer >= 1, got {g.max_consecutive_skips}")

    # train
    for key, value in (("steps", t.steps), ("batch_size", t.batch_size), ("accumulation_steps", t.accumulation_steps)):
        _require(value is None and key == "batch_size" or value is not None and value >= 1, f"train.{key}",
                 f"expected an integer >= 1{' or null (the model kind default)' if key == 'batch_size' else ''}, "
                 f"got {value}")
    _positive("train.lr", t.lr, allow_none=True)
    _require(t.ema_decay == "auto" or not isinstance(t.ema_decay, str) and 0 <= t.ema_decay < 1, "train.ema_decay",
             f"expected 'auto' or a number in [0, 1) (0: off), got {t.ema_decay!r}")
    _positive("train.weight_decay", t.weight_decay, allow_zero=True)
    _positive("train.eps", t.eps)
    _require(len(t.betas) == 2 and all(0 <= b < 1 for b in t.betas), "train.betas",
             f"expected [beta1, beta2] in [0, 1), got {t.betas}")
    _require(t.lr_schedule in LR_SCHEDULES, "train.lr_schedule", f"expected one of {LR_SCHEDULES}, got {t.lr_schedule!r}")
    _require(t.warmup_steps >= 0, "train.warmup_steps", f"expected an integer >= 0, got {t.warmup_steps}")
    _require(t.mixed_precision in PRECISIONS, "train.mixed_precision",
             f"expected one of {PRECISIONS}, got {t.mixed_precision!r}")
    _require(t.cpu_threads is None or t.cpu_threads >= 1, "train.cpu_threads",
             f"expected null or an integer >= 1, got {t.cpu_threads}")
    _require(t.device == "auto" or t.device == "cpu" or t.device.startswith("cuda"), "train.device",
             f"expected auto, cpu, cuda or cuda:N, got {t.device!r}")
    lora.check_config(t)

    # checkpoint
    c = cfg.checkpoint
    _require(c.every >= 0, "checkpoint.every", f"expected an integer >= 0 (0 = off), got {c.every}")
    _require(c.keep_last >= 1, "checkpoint.keep_last", f"expected an integer >= 1, got {c.keep_last}")
    if c.resume not in (None, "latest"):
        _require(os.path.isdir(c.resume), "checkpoint.resume",
                 f"expected null, 'latest' or an existing checkpoint folder, got {c.resume!r}")

    # validation and its metrics (importing user functions is cheap and catches typos before the model loads);
    # null / "auto" settings are the model kind's defaults, checked once the kind is known (_check_resolved)
    for key in ("every", "num_samples", "sampler_steps", "batch_size"):
        value, low = getattr(v, key), 0 if key == "every" else 1
        _require(value is None or value >= low, f"validation.{key}",
                 f"expected an integer >= {low}{' (0 = off)' if key == 'every' else ''} or null (the model kind's "
                 f"default), got {value}")
    _positive("validation.guidance_scale", v.guidance_scale)
    _positive("validation.quality_tolerance", v.quality_tolerance, allow_zero=True, allow_none=True)
    _require(0 <= v.forget_target_ratio < 1, "validation.forget_target_ratio",
             f"expected a number in [0, 1), got {v.forget_target_ratio}")
    _require(v.min_steps >= 0, "validation.min_steps", f"expected an integer >= 0, got {v.min_steps}")
    _require(v.target_patience >= 1, "validation.target_patience",
             f"expected an integer >= 1, got {v.target_patience}")
    from .validation import check_metric_name, get_metric

    # metric names are checked even when validation is off: a typo should not wait for a later run
    named = [(f"validation.metrics[{i}]", n) for i, n in enumerate(v.metrics or [])]
    named += [(f"validation.{k}", getattr(v, k)) for k in ("forget_metric", "quality_metric")
              if getattr(v, k) not in (None, "auto")]
    named += [("validation.metric_options", n) for n in v.metric_options]
    for key, name in named:
        try:
            check_metric_name(name)
        except ValueError as exc:
            raise ConfigError(f"{key}: {exc}") from None
    for name, options in v.metric_options.items():
        check = get_metric(name).check_options
        if check is not None:
            try:
                check(dict(options))
            except ValueError as exc:
                raise ConfigError(str(exc)) from None
    kind = {"tiny-ddpm": "ddpm", "tiny-sd": "sd"}.get(cfg.model.build or "")
    if kind is not None:
        _check_resolved(v, kind)

    # data (and the model's expected image size) -- reads only headers and JSON
    _require(bool(cfg.data.retain_dir), "data.retain_dir", "expected a folder of retain images, got nothing")
    _require(bool(cfg.data.forget_dir), "data.forget_dir", "expected a folder of forget images, got nothing")
    if cfg.data.train_size is not None:
        _require(cfg.data.train_size >= 2, "data.train_size", f"expected an integer >= 2, got {cfg.data.train_size}")
    if not check_files:
        return
    from . import data as data_mod
    from . import models as models_mod

    try:
        info = models_mod.peek_model(cfg.model)
    except models_mod.ModelError as exc:
        raise ConfigError(f"model.path: {exc}") from None
    if cfg.model.build is None:
        _check_resolved(v, info.kind)
    if t.lora_rank > 0:
        lora.check_rank(cfg.model, t)
    if m.t_range is not None:
        _require(m.t_range[1] < info.num_timesteps, "method.t_range",
                 f"expected t_max < {info.num_timesteps} (the scheduler's timesteps), got {m.t_range}")
    retain = data_mod.scan_folder(cfg.data.retain_dir, "data.retain_dir")
    forget = data_mod.scan_folder(cfg.data.forget_dir, "data.forget_dir")
    for key, scan in (("data.retain_dir", retain), ("data.forget_dir", forget)):
        if info.image_size is not None and scan.size != (info.image_size, info.image_size):
            raise ConfigError(f"{key}: images are {scan.size[0]}x{scan.size[1]}, the model expects "
                              f"{info.image_size}x{info.image_size} (e.g. {scan.files[0]})")
    _require(retain.size == forget.size, "data.forget_dir",
             f"images are {forget.size[0]}x{forget.size[1]}, the retain images {retain.size[0]}x{retain.size[1]}")
    n = cfg.data.train_size
    if n is not None:
        _require(n > len(forget.files), "data.train_size",
                 f"expected n > the number of forget images ({len(forget.files)}), got {n}")
    if info.kind == "sd":
        try:
            data_mod.resolve_prompts(cfg.data, retain.files, forget.files)
        except data_mod.DataError as exc:
            raise ConfigError(str(exc)) from None
    else:
        for key in ("captions", "retain_prompt", "forget_prompt"):
            _require(getattr(cfg.data, key) is None, f"data.{key}",
                     "a pixel DDPM is unconditional: expected null (prompts are for Stable Diffusion)")
        _require(v.prompt is None, "validation.prompt", "a pixel DDPM is unconditional: expected null")


def _check_resolved(v: ValidationConfig, kind: str) -> None:
    """The validation settings as a model of ``kind`` resolves them: the forget / quality metrics and every
    ``metric_options`` entry must be among the metrics, and a relative forget target needs a lower-is-better metric."""
    from .validation import get_metric

    r = resolve_validation(v, kind)
    for key in ("forget_metric", "quality_metric"):
        name = r[key]
        _require(name is None or name in r["metrics"], f"validation.{key}",
                 f"expected null or one of validation.metrics {r['metrics']}, got {name!r}"
                 + (f" ('auto': the {kind} default)" if getattr(v, key) == "auto" else ""))
    if r["forget_metric"] is not None and v.forget_target is None:
        _require(not get_metric(r["forget_metric"]).higher_is_better, "validation.forget_target",
                 f"expected a number: {r['forget_metric']!r} is higher-is-better, so the relative default "
                 "(forget_target_ratio x its value before training) does not apply")
    for name in v.metric_options:
        _require(name in r["metrics"], "validation.metric_options",
                 f"options for {name!r}, which is not in validation.metrics {r['metrics']}")


def describe(cfg: EngineConfig) -> str:
    return json.dumps(to_dict(cfg), indent=2, default=str)
