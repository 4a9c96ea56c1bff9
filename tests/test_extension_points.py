"""Extending the package is one registration: a throwaway loss method, backend and metric, each registered through
the public API only and run through the real paths (config validation and an engine step; the op dispatch; the
engine's validation). Nothing else in the package is edited, which is what "adding a method touches <= 2 files
(siss_fast/methods.py or the user's module, and the docs), a backend <= 3 (its module, one register_backend call,
the README's backend table), a metric 1" rests on."""

import json
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from engine_helpers import base_config, tiny_model  # noqa: E402

import siss_fast as sf  # noqa: E402
from siss_fast import backends, reference  # noqa: E402
from siss_fast.engine import ConfigError, load_config  # noqa: E402
from siss_fast.methods import (Interval, MethodSpec, MethodTerms, get_method, method_names,  # noqa: E402
                               methods_markdown, plain_loss, register_method, unregister_method)
from siss_fast.testing import make_case  # noqa: E402


def _halved_forward(batch):
    """A throwaway method: siss_nois's two passes, the forget term halved when the mask (drawn with lambd) says so."""
    retain = plain_loss(batch.predict(batch.noised(forget=False), batch.cond_x), batch.noise)
    forget = plain_loss(batch.predict(batch.noised(forget=True), batch.cond_a), batch.noise)
    return MethodTerms(retain, torch.where(batch.mask, forget, 0.5 * forget))


@pytest.fixture
def throwaway_method():
    spec = register_method(MethodSpec("throwaway", _halved_forward, "clip", lambd=Interval(0.0, 0.5),
                                      lambd_default=0.25, summary=("L(eps_theta(x_t), eps)", "L or L / 2", 2)))
    try:
        yield spec
    finally:
        unregister_method("throwaway")


def test_a_registered_method_is_validated_and_runs_one_engine_step(tmp_path, throwaway_method):
    from siss_fast.engine import setup as run_setup
    from siss_fast.engine.step import UnlearnStep
    from siss_fast.objectives import Objective

    assert "throwaway" in method_names() and get_method("throwaway") is throwaway_method
    assert "`throwaway`" in methods_markdown()
    sections = dict(method={"name": "throwaway", "lambd": 0.4}, train={"steps": 1})
    with pytest.raises(ConfigError, match=r"method\.lambd: expected 0 <= lambd <= 0.5 for method 'throwaway'"):
        load_config(base_config(tiny_model("ddpm"), tmp_path / "bad", method={"name": "throwaway", "lambd": 0.9}))
    with pytest.raises(ConfigError, match=r"method\.weight_clip: only siss takes it, not 'throwaway'"):
        load_config(base_config(tiny_model("ddpm"), tmp_path / "bad", method={"name": "throwaway",
                                                                               "weight_clip": 2.0}))
    cfg = load_config(base_config(tiny_model("ddpm"), tmp_path / "run", **sections))
    model = run_setup.prepare_model(cfg, run_setup.Dist(), tmp_path / "run")
    step = UnlearnStep(cfg, model, run_setup.prepare_data(cfg, model, torch.device("cpu")), torch.device("cpu"))
    assert step.combiner.rule == "clip" and not step.partitioned  # the record's rule; not partitioned
    assert isinstance(step.objective, Objective) and step.objective.lambd == 0.4
    before = {k: v.clone() for k, v in step.unet.state_dict().items()}
    result = step()
    assert not result.info.skipped and {"loss_retain", "loss_forget", "mask_fraction"} <= set(result.stats)
    assert any(not torch.equal(before[k], v) for k, v in step.unet.state_dict().items())


def test_a_registered_backend_runs_beneath_the_public_ops():
    calls = []

    def counted(name):
        def run(*args):
            calls.append(name)
            return getattr(reference, name)(*args)
        return run

    ops = SimpleNamespace(**{n: counted(n) for n in ("mixture_noise", "siss_loss_forward", "siss_loss_backward")})
    backends.register_backend(backends.Backend("throwaway", ("cpu",), lambda device_type: (True, "a test backend"),
                                               lambda: ops))
    previous = sf.get_backend()
    try:
        assert "throwaway" in backends.backend_names("cpu") and backends.availability("throwaway", "cpu")[0]
        sf.set_backend("throwaway")
        c = make_case((3, 2, 5, 4), dtype=torch.float32, seed=1)
        noisy = sf.mixture_noise(c["x0"], c["a0"], c["noise"], c["gamma"], c["sigma"], c["mask"])
        pred = c["pred"].clone().requires_grad_(True)
        terms = sf.siss_loss(pred, noisy, c["x0"], c["a0"], c["gamma"], c["sigma"], 0.5)
        (terms.loss_x - terms.loss_a).backward()
        assert calls == ["mixture_noise", "siss_loss_forward", "siss_loss_backward"]
        sf.set_backend("torch")
        pred_ref = c["pred"].clone().requires_grad_(True)
        ref = sf.siss_loss(pred_ref, noisy, c["x0"], c["a0"], c["gamma"], c["sigma"], 0.5)
        (ref.loss_x - ref.loss_a).backward()
        assert torch.equal(terms.loss_x, ref.loss_x) and torch.equal(pred.grad, pred_ref.grad)
    finally:
        sf.set_backend(previous)
        backends.unregister_backend("throwaway")
    assert "throwaway" not in backends.backend_names()


def test_a_registered_metric_drives_validation(tmp_path):
    from siss_fast.engine.loop import run
    from siss_fast.metrics import registry

    seen = []

    @registry.register_metric("throwaway_metric")
    def _factory(ctx):
        def score(samples):
            seen.append(tuple(samples.shape))
            return float(samples.mean())
        return score

    try:
        validation = {"every": 1, "num_samples": 2, "sampler_steps": 2, "batch_size": 2,
                      "metrics": ["throwaway_metric"], "forget_metric": "throwaway_metric", "forget_target": -1.0,
                      "quality_metric": None}
        cfg = load_config(base_config(tiny_model("ddpm"), tmp_path / "run", train={"steps": 1},
                                      validation=validation))
        run(cfg)
    finally:
        registry.unregister_metric("throwaway_metric")
    assert seen and seen[0][0] == 2
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    checks = [r["validation"] for r in records if "validation" in r]
    assert checks and all("throwaway_metric" in v for v in checks)


def test_the_docs_tables_are_the_method_table():
    """The methods table of siss_fast/methods.py and of the README is what the records write."""
    import siss_fast.methods as methods

    table = methods_markdown()
    assert table in methods.__doc__
    assert table in (Path(__file__).resolve().parent.parent / "README.md").read_text()
