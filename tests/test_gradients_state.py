"""GradientCombiner (SPEC §6): its state dict, distributed options in one process, argument checks and misuse.

The oracle and the tiny network are :mod:`gradient_oracle`'s.
"""

from __future__ import annotations

import copy
import sys
from pathlib import Path

import pytest
import torch

from siss_fast.gradients import GradientCombiner, StepInfo

sys.path.insert(0, str(Path(__file__).resolve().parent))

from gradient_oracle import assert_same, losses, make_model, micro_batch, run_engine, trainable  # noqa: E402


def test_state_dict_round_trip():
    kwargs = dict(scaling_norm="auto", mode="lagged", lag_every=3)
    model = make_model()
    uninterrupted = run_engine(model, GradientCombiner(trainable(model), "rescale", **kwargs), 5, 1)

    model = make_model()
    first = GradientCombiner(trainable(model), "rescale", **kwargs)
    opt = torch.optim.SGD(trainable(model), lr=0.02, momentum=0.5)
    head = []
    for step in range(2):
        first.backward(*losses(model, micro_batch(step, 0)))
        info = first.finish_step()
        head.append(info)
        opt.step()
        opt.zero_grad(set_to_none=True)
    state = copy.deepcopy(first.state_dict())
    assert state["scaling_norm"] == first.scaling_norm and state["lagged_coef"] is not None

    resumed = GradientCombiner(trainable(model), "rescale", **kwargs)
    resumed.load_state_dict(state)
    assert resumed.state_dict() == state
    tail = []
    for step in range(2, 5):
        resumed.backward(*losses(model, micro_batch(step, 0)))
        info = resumed.finish_step()
        tail.append((info, [p.grad.clone() for p in trainable(model)]))
        opt.step()
        opt.zero_grad(set_to_none=True)
    for (ref_grads, ref_info), (info, grads) in zip(uninterrupted[2:], tail):
        assert (info.step, info.path, info.scaling_norm) == (ref_info.step, ref_info.path, ref_info.scaling_norm)
        assert info.forget_coef == pytest.approx(ref_info.forget_coef, rel=1e-12)
        assert_same(grads, ref_grads)

    with pytest.raises(ValueError, match="rule"):
        GradientCombiner(trainable(model), "clip").load_state_dict(state)


def test_distributed_options_single_process(tmp_path):
    """With a world of one process the collectives are identities: results must not change (smoke test)."""
    dist = torch.distributed
    if not dist.is_available():
        pytest.skip("torch.distributed not available")
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        for rule, accumulation in [("rescale", 1), ("rescale", 2), ("erasediff", 1)]:
            results = []
            for option in ({}, dict(distributed_norm=True), dict(average_grads=True)):
                model = make_model()
                comb = GradientCombiner(trainable(model), rule, scaling_norm=0.05, eta=0.4,
                                        accumulation_steps=accumulation, **option)
                results.append(run_engine(model, comb, 2, accumulation))
            for reference, other in [(results[0], results[1]), (results[0], results[2])]:
                for (g0, i0), (g1, i1) in zip(reference, other):
                    assert_same(g1, g0)
                    assert i1.norm_a == pytest.approx(i0.norm_a, rel=1e-14)
    finally:
        dist.destroy_process_group()
    with pytest.raises(ValueError, match="average_grads"):
        GradientCombiner(trainable(make_model()), average_grads=True, distributed_norm=True)


# ---------------------------------------------------------------------------------------------- errors


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(rule="sum"), "rule"),
        (dict(mode="fast"), "mode"),
        (dict(scaling_norm=-1.0), "scaling_norm"),
        (dict(scaling_norm="big"), "scaling_norm"),
        (dict(max_forget_scale=0.0), "max_forget_scale"),
        (dict(max_grad_norm=float("inf")), "max_grad_norm"),
        (dict(lag_every=0), "lag_every"),
        (dict(accumulation_steps=1.5), "accumulation_steps"),
        (dict(eta=-0.1), "eta"),
    ],
)
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        GradientCombiner(trainable(make_model()), **kwargs)


def test_misuse_raises():
    model = make_model()
    with pytest.raises(ValueError, match="params"):
        GradientCombiner([p for p in model.parameters() if not p.requires_grad])
    combiner = GradientCombiner(trainable(model), "rescale")
    with pytest.raises(RuntimeError, match="finish_step"):
        combiner.finish_step()
    with pytest.raises(ValueError, match="neither"):
        combiner.backward(None, None)
    retain, forget = losses(model, micro_batch(0, 0))
    with pytest.raises(ValueError, match="scalar"):
        combiner.backward(torch.ones(2, requires_grad=True), None)
    combiner = GradientCombiner(trainable(model), "rescale")
    combiner.backward(retain, forget)
    retain, forget = losses(model, micro_batch(0, 1))
    with pytest.raises(RuntimeError, match="accumulation_steps"):
        combiner.backward(retain, forget)
    with pytest.raises(RuntimeError, match="in progress"):
        combiner.state_dict()
    assert isinstance(combiner.finish_step(), StepInfo)
    combiner = GradientCombiner(trainable(model), "rescale", accumulation_steps=2)
    combiner.backward(*losses(model, micro_batch(0, 0)))
    with pytest.raises(ValueError, match="must not change"):
        combiner.backward(losses(model, micro_batch(0, 1))[0], None)
