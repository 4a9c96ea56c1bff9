"""The demo's unlearning step through the engine (``siss_fast.engine.unlearn``), layer 5 on top of layer 4.

The demo's data become two image folders in the run directory (``data/retain``: the 1,797 digits as 16x16 8-bit
PNGs; ``data/forget``: the one planted image -- the engine samples with replacement, so one file stands for its 75
copies), the engine runs with its defaults except for the budget (and what a caller of :class:`DemoConfig` sets)
and its validation uses this package's metrics (``forget_rate``, ``classifier_quality``, registered with the
engine's metric registry). The engine writes ``metrics.jsonl``, ``manifest.json``, ``best.safetensors`` and
``final/`` into the run directory; the demo then loads ``final/`` (the best validated state that met the forget
target, else the end state) for the after-measurement.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Dict

import torch

from .data import DemoData, to_unit
from .record import method_lambd

__all__ = ["write_image_folders", "given", "engine_config", "unlearn_engine"]


def write_image_folders(data: DemoData, root: Path) -> Dict[str, Path]:
    """``root/retain/NNNN.png`` (digits) and ``root/forget/forget_000.png`` (distinct forget images), 8-bit."""
    from PIL import Image

    folders = {"retain": Path(root) / "retain", "forget": Path(root) / "forget"}
    for name, images in (("retain", data.retain), ("forget", data.forget_image)):
        folder = folders[name]
        folder.mkdir(parents=True, exist_ok=True)
        arrs = (to_unit(images)[:, 0] * 255).round().to(torch.uint8).numpy()
        for i, arr in enumerate(arrs):
            Image.fromarray(arr, mode="L").save(folder / (f"{i:04d}.png" if name == "retain" else f"forget_{i:03d}.png"))
    return folders


def given(**kw: Any) -> Dict[str, Any]:
    """The keyword arguments that are not ``None`` (engine config sections: ``None`` = the engine's default)."""
    return {k: v for k, v in kw.items() if v is not None}


def fresh_run_dir(run_dir: Path) -> None:
    """A demo run owns its folder: the record of a previous demo run there is replaced (the engine refuses to reopen a
    finished run, so its manifest goes first)."""
    from siss_fast.engine.run_record import read_finished

    if read_finished(Path(run_dir)) is not None:
        (Path(run_dir) / "manifest.json").unlink()


def engine_config(cfg, model_dir: Path, run_dir: Path, folders: Dict[str, Path]) -> Dict[str, Any]:
    """The engine config of a demo run (a plain dict, validated by the engine). Settings the demo leaves at
    ``None`` are not written, so the engine's defaults apply."""
    return {
        "model": {"path": str(model_dir)},
        "data": {"retain_dir": str(folders["retain"]), "forget_dir": str(folders["forget"])},
        "method": given(name=cfg.method, lambd=method_lambd(cfg.method, cfg.lambd), weight_clip=cfg.weight_clip),
        "gradient": given(scaling_norm=cfg.scaling_norm, max_grad_norm=cfg.max_grad_norm),
        "train": given(steps=cfg.max_steps, batch_size=cfg.batch_size, lr=cfg.lr, seed=cfg.seed, device="cpu"),
        "checkpoint": {"every": 0},
        # the engine's own stop signal (targeted probe + retain-fit guard, its defaults): the demo's classifier is the
        # independent judge of the report, never a stop rule
        "validation": {
            **given(every=cfg.val_every, num_samples=cfg.val_samples, forget_target=cfg.forget_target,
                    forget_target_ratio=cfg.forget_target_ratio, quality_tolerance=cfg.quality_tolerance,
                    target_patience=cfg.target_patience,
                    min_steps=cfg.min_steps),
            "seed": cfg.seed + 1,
        },
        "log": {"progress": False},
        "output_dir": str(run_dir),
    }


def unlearn_engine(unet, model_dir: Path, data: DemoData, cfg, *, run_dir: Path) -> Dict[str, Any]:
    """Run the engine on the demo's data (it writes ``metrics.jsonl`` and ``manifest.json`` into ``run_dir``); load
    its final model into ``unet`` (in place). Returns ``{"steps", "final_step", "stop_reason", "final_dir"}``."""
    from diffusers import UNet2DModel

    import siss_fast.metrics  # noqa: F401  (registers the package's metrics with the engine)
    from siss_fast.engine import unlearn

    folders = write_image_folders(data, Path(run_dir) / "data")
    fresh_run_dir(run_dir)
    result = unlearn(engine_config(cfg, Path(model_dir), Path(run_dir), folders))
    final = UNet2DModel.from_pretrained(str(Path(result.final_dir) / "unet"), use_safetensors=True,
                                        local_files_only=True)
    unet.load_state_dict(final.state_dict())
    unet.eval()
    return {"steps": result.steps_done, "final_step": result.kept_step, "stop_reason": result.stop_reason, "final_dir": str(result.final_dir)}
