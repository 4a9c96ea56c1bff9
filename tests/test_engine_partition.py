"""The partitioned split equals the plain two-backward exact gradient; two gloo processes equal one process."""

import socket
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from engine_helpers import base_config, ddp_worker, tiny_model  # noqa: E402

from siss_fast.engine import load_config  # noqa: E402
from siss_fast.engine.partition import PartitionedForward  # noqa: E402
from siss_fast.gradients import GradientCombiner  # noqa: E402
from siss_fast.objectives import Objective  # noqa: E402


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()  # 2 shared cores: more threads only spin against each other
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _unet():
    from siss_fast.engine.models import load_model

    model = load_model(str(tiny_model("ddpm")))
    return model.unet.double(), model.scheduler.alphas_cumprod


def _grads(unet, alphas, rule, scaling_norm, partitioned, t_range, seed=3):
    torch.manual_seed(0)
    x0 = torch.rand(6, 3, 16, 16, dtype=torch.float64) * 2 - 1
    a0 = torch.rand(6, 3, 16, 16, dtype=torch.float64) * 2 - 1
    objective = Objective("siss", alphas, lambd=0.5, t_range=t_range)
    params = list(unet.parameters())
    combiner = GradientCombiner(params, rule, scaling_norm=scaling_norm, max_grad_norm=None)
    gen = torch.Generator().manual_seed(seed)
    counts = None
    if partitioned:
        wrapper = PartitionedForward(unet, objective, x0, a0)
        terms = objective(wrapper, x0, a0, generator=gen)
        combiner.backward(*wrapper.terms(terms.retain, terms.forget))
        counts = wrapper.counts
    else:
        terms = objective(unet, x0, a0, generator=gen)
        combiner.backward(terms.retain, terms.forget)
    info = combiner.finish_step()
    grads = [p.grad.clone() for p in params]
    unet.zero_grad(set_to_none=True)
    return grads, info, counts


@pytest.mark.parametrize("rule, scaling_norm", [("rescale", 1.0), ("rescale", "auto"), ("erasediff", 1.0)])
@pytest.mark.parametrize("t_range", [(0, 999), (990, 999)])
def test_partitioned_equals_two_backward(rule, scaling_norm, t_range):
    unet, alphas = _unet()
    plain, info_p, _ = _grads(unet, alphas, rule, scaling_norm, False, t_range)
    split, info_s, counts = _grads(unet, alphas, rule, scaling_norm, True, t_range)
    assert sum(counts.values()) == 6
    if t_range == (0, 999):
        assert counts["retain"] + counts["forget"] > 0  # something was pure, so something was saved
    flat_p, flat_s = torch.cat([g.flatten() for g in plain]), torch.cat([g.flatten() for g in split])
    err = float((flat_p - flat_s).norm() / flat_p.norm())
    assert err < 1e-10, err  # fp64 model: the dropped cross terms are below 1e-12 of the kept ones
    assert info_s.forget_coef == pytest.approx(info_p.forget_coef, rel=1e-10)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_equal_one_process(tmp_path):
    """2 gloo processes x batch b (accumulation 1) == 1 process x 2 micro-batches of b (the global batch 2b)."""
    import torch.multiprocessing as mp
    from safetensors.torch import load_file

    # Adam's eps set large: at eps=1e-8 an element with |g| ~ 1e-8 turns reduction-order rounding into a visible step
    common = dict(method={"name": "siss"}, train={"steps": 2, "eps": 1e-3}, gradient={"scaling_norm": "auto"})
    two = base_config(tiny_model("ddpm"), tmp_path / "two", **common)
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    port = _free_port()
    # the worker lives in engine_helpers: spawned children import it from the tests folder on sys.path
    procs = [ctx.Process(target=ddp_worker, args=(r, 2, port, two, queue)) for r in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=240)
    results = sorted(queue.get(timeout=5) for _ in procs)
    assert results == [(0, "ok"), (1, "ok")], results

    from siss_fast.engine.loop import run

    one = base_config(tiny_model("ddpm"), tmp_path / "one", **common)
    one["train"]["accumulation_steps"] = 2
    run(load_config(one))
    a = load_file(str(tmp_path / "two" / "final" / "unet" / "diffusion_pytorch_model.safetensors"))
    b = load_file(str(tmp_path / "one" / "final" / "unet" / "diffusion_pytorch_model.safetensors"))
    base = load_file(str(tiny_model("ddpm") / "unet" / "diffusion_pytorch_model.safetensors"))
    moved = max(float((b[k] - base[k]).abs().max()) for k in b)
    diff = max(float((a[k] - b[k]).abs().max()) for k in a)
    assert moved > 1e-6 and diff <= 1e-3 * moved, (diff, moved)  # a few fp32 ulps of the weights
