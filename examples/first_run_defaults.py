"""A first run with nothing but the engine's defaults, on the demo's model and data, scored by the demo's metrics.

    python examples/first_run_defaults.py [OUT_DIR]      (needs '.[demo]'; ~2-3 minutes on one CPU thread)

The engine gets only a model folder, the two image folders and a 200-step budget: batch, learning rate and weight
average (the pixel-DDPM defaults of ``siss_fast/engine/defaults.py``), the gradient rule, the stop signal (the
targeted ``forget_probe`` per forget item, the ``retain_fit`` guard: the retain set's denoising error -- no classifier) and
the stop rules are all defaults. Then the demo's own metrics (forget rate on 1,000 samples within L2 4.5 of the
T-shirt, classifier quality) measure the base model and the engine's final model. Prints one JSON line, with the
share of the run's time its validation took (from the manifest).
"""

import json
import sys
import time
from pathlib import Path

import torch


def main(out: Path) -> dict:
    from diffusers import UNet2DModel

    from siss_fast.demo.data import demo_data
    from siss_fast.demo.engine_backend import fresh_run_dir, write_image_folders
    from siss_fast.demo.models import SHIPPED_MODEL, load_base_model
    from siss_fast.demo.run import measure
    from siss_fast.engine import unlearn

    torch.set_num_threads(1)
    torch.set_flush_denormal(True)
    out.mkdir(parents=True, exist_ok=True)
    data = demo_data()
    folders = write_image_folders(data, out / "data")
    fresh_run_dir(out)  # a rerun replaces the previous record in OUT_DIR
    t0 = time.perf_counter()
    result = unlearn({"model": {"path": str(SHIPPED_MODEL)},
                      "data": {"retain_dir": str(folders["retain"]), "forget_dir": str(folders["forget"])},
                      "train": {"steps": 200, "device": "cpu"}, "log": {"progress": False}, "output_dir": str(out)})
    wall = time.perf_counter() - t0
    unet, scheduler, classifier = load_base_model(SHIPPED_MODEL)
    abar = scheduler.alphas_cumprod.double()
    kw = dict(num_samples=1000, sampler_steps=25, seed=0, likelihood=False)
    before, _, _ = measure(unet, abar, classifier, data, **kw)
    final = UNet2DModel.from_pretrained(str(result.final_dir / "unet"), use_safetensors=True, local_files_only=True)
    after, _, _ = measure(final, abar, classifier, data, **kw)
    manifest = json.loads((out / "manifest.json").read_text())
    return {"stop_reason": result.stop_reason, "steps": result.steps_done, "kept_step": result.kept_step,
            "unlearn_wall_s": round(wall, 1), "validation_share": manifest["time"]["validation_share"],
            "forget_rate": [before["forget_rate"], after["forget_rate"]],
            "quality": [round(before["quality"], 4), round(after["quality"], 4)]}


if __name__ == "__main__":
    print(json.dumps(main(Path(sys.argv[1] if len(sys.argv) > 1 else "runs/first-run-defaults"))))
