"""GradientCombiner (SPEC §6) against a naive oracle that clones every gradient.

The oracle takes G_x and G_a with two separate ``torch.autograd.grad`` calls per micro-batch, combines them with plain
tensor math and clips like ``torch.nn.utils.clip_grad_norm_``. Everything runs in float64 on a tiny network whose
retain and forget losses share one forward graph (as SISS's do) and which has a parameter only the retain term
reaches, one only the forget term reaches, and a frozen one.
"""

from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest
import torch

from siss_fast.gradients import GradientCombiner

sys.path.insert(0, str(Path(__file__).resolve().parent))

from gradient_oracle import (DTYPE, NaiveCombiner, assert_same, losses, make_model, micro_batch,  # noqa: E402
                             run_engine, run_naive, trainable)


RULE_CASES = [
    pytest.param("rescale", dict(scaling_norm=0.05), id="rescale"),
    pytest.param("clip", dict(scaling_norm=0.01), id="clip-shrinks"),
    pytest.param("clip", dict(scaling_norm=100.0), id="clip-unit"),
    pytest.param("erasediff", dict(eta=0.3), id="erasediff-eta0.3"),  # max(., 0) both active and not
    pytest.param("erasediff", dict(eta=10.0), id="erasediff-eta10"),
]
MODE_CASES = [
    pytest.param(dict(mode="exact"), 1, id="exact-acc1"),
    pytest.param(dict(mode="exact"), 3, id="exact-acc3"),
    pytest.param(dict(mode="lagged", lag_every=1), 1, id="lagged1"),
    pytest.param(dict(mode="lagged", lag_every=3), 1, id="lagged3"),
    pytest.param(dict(mode="lagged", lag_every=2), 2, id="lagged2-acc2"),
]


@pytest.mark.parametrize("max_grad_norm", [1e-2, None], ids=["clipped", "unclipped"])
@pytest.mark.parametrize("mode_kwargs, accumulation", MODE_CASES)
@pytest.mark.parametrize("rule, rule_kwargs", RULE_CASES)
def test_matches_naive(rule, rule_kwargs, mode_kwargs, accumulation, max_grad_norm):
    steps = 5
    kwargs = dict(rule_kwargs, max_grad_norm=max_grad_norm, **mode_kwargs)
    model, ref_model = make_model(), make_model()
    combiner = GradientCombiner(trainable(model), rule, accumulation_steps=accumulation, **kwargs)
    got = run_engine(model, combiner, steps, accumulation)
    want = run_naive(ref_model, NaiveCombiner(rule, **kwargs), steps, accumulation)
    for (grads, info), (ref_grads, coef) in zip(got, want):
        assert not info.skipped and not info.dropped_forget
        assert info.forget_coef == pytest.approx(coef, rel=1e-12, abs=0)
        assert_same(grads, ref_grads)
        if max_grad_norm is not None:
            assert info.clip_coef < 1.0  # clipping really engaged
    assert_same(trainable(model), trainable(ref_model))

    lag = mode_kwargs.get("lag_every", 1)
    paths = [info.path for _, info in got]
    expected_exact = "direct" if (accumulation == 1 and rule != "erasediff") else "buffered"
    assert paths == [expected_exact if s % lag == 0 else "lagged" for s in range(steps)]


@pytest.mark.parametrize("rule", ["rescale", "clip", "erasediff"])
@pytest.mark.parametrize("mode_kwargs, accumulation", MODE_CASES)
@pytest.mark.parametrize("terms", [("retain",), ("forget",)], ids=["naive-deletion", "neggrad"])
def test_single_term_matches_naive(terms, mode_kwargs, accumulation, rule):
    kwargs = dict(scaling_norm=0.05, eta=0.5, **mode_kwargs)
    model, ref_model = make_model(), make_model()
    combiner = GradientCombiner(trainable(model), rule, accumulation_steps=accumulation, **kwargs)
    got = run_engine(model, combiner, 3, accumulation, terms)
    want = run_naive(ref_model, NaiveCombiner(rule, **kwargs), 3, accumulation, terms)
    for (grads, info), (ref_grads, _) in zip(got, want):
        assert not info.skipped and not info.dropped_forget and info.extra_buffers == 0
        assert_same(grads, ref_grads)
    assert_same(trainable(model), trainable(ref_model))


def test_lagged_uses_stale_coefficient():
    model = make_model()
    combiner = GradientCombiner(trainable(model), "rescale", scaling_norm=0.05, mode="lagged", lag_every=3)
    infos = [info for _, info in run_engine(model, combiner, 7, 1)]
    assert [i.path for i in infos] == ["direct", "lagged", "lagged", "direct", "lagged", "lagged", "direct"]
    assert infos[1].forget_coef == infos[2].forget_coef == infos[0].forget_coef
    assert infos[4].forget_coef == infos[5].forget_coef == infos[3].forget_coef != infos[0].forget_coef
    assert all(i.norm_a is None for i in infos if i.path == "lagged")
    # Lagged is an approximation: the stale coefficient differs from the one an exact run measures at step 1.
    exact = make_model()
    exact_combiner = GradientCombiner(trainable(exact), "rescale", scaling_norm=0.05)
    exact_infos = [info for _, info in run_engine(exact, exact_combiner, 2, 1)]
    assert exact_infos[1].forget_coef != pytest.approx(infos[1].forget_coef, rel=1e-6)


def test_callable_terms_match_tensor_terms():
    """The extension point: a term given as callable(weight) that runs its own backward."""

    def callable_term(loss):
        return lambda weight: (loss * weight).backward(retain_graph=True)

    for kwargs, acc in [(dict(mode="exact"), 1), (dict(mode="exact"), 2), (dict(mode="lagged", lag_every=2), 1)]:
        results = []
        for wrap in (False, True):
            model = make_model()
            comb = GradientCombiner(trainable(model), "rescale", scaling_norm=0.05, accumulation_steps=acc,
                                    **kwargs)
            for step in range(3):
                for micro in range(acc):
                    retain, forget = losses(model, micro_batch(step, micro))
                    comb.backward(retain, callable_term(forget) if wrap else forget)
                comb.finish_step()
                with torch.no_grad():
                    for p in trainable(model):
                        p -= 0.1 * p.grad
            results.append([p.detach().clone() for p in trainable(model)])
        assert_same(results[1], results[0])


# ---------------------------------------------------------------------------------------------- stabilisation


@pytest.mark.parametrize("accumulation", [1, 3])
def test_auto_scaling_norm_fixed_after_first_step(accumulation):
    model, ref_model = make_model(), make_model()
    combiner = GradientCombiner(trainable(model), "rescale", scaling_norm="auto", accumulation_steps=accumulation)
    assert combiner.scaling_norm is None
    got = run_engine(model, combiner, 4, accumulation)
    naive = NaiveCombiner("rescale", scaling_norm="auto")
    want = run_naive(ref_model, naive, 4, accumulation)
    first = got[0][1]
    assert first.path == "buffered" and first.norm_x is not None
    assert combiner.scaling_norm == pytest.approx(0.1 * first.norm_x, rel=1e-15)
    assert combiner.scaling_norm == pytest.approx(naive.c, rel=1e-12)
    assert all(info.scaling_norm == combiner.scaling_norm for _, info in got)
    for (grads, _), (ref_grads, _) in zip(got, want):
        assert_same(grads, ref_grads)
    if accumulation == 1:  # measured once with one buffer, then the no-buffer path
        assert [info.path for _, info in got] == ["buffered", "direct", "direct", "direct"]
        assert [info.extra_buffers for _, info in got] == [1, 0, 0, 0]


def test_auto_scaling_norm_median_of_the_first_steps():
    """auto_steps=3: c follows the running median of ||G_x|| for three steps (the buffered path measures it), then
    stays fixed on the direct path; the measured norms survive state_dict, so a resumed combiner continues alike."""
    model = make_model()
    combiner = GradientCombiner(trainable(model), "rescale", scaling_norm="auto", auto_steps=3)
    got = run_engine(model, combiner, 5, 1)
    norms = [info.norm_x for _, info in got[:3]]
    assert [info.path for _, info in got] == ["buffered"] * 3 + ["direct"] * 2
    for k in range(3):  # the c each step used is 0.1 x the median of the norms measured so far (itself included)
        assert got[k][1].scaling_norm == pytest.approx(0.1 * sorted(norms[:k + 1])[k // 2] if k != 1
                                                       else 0.05 * (norms[0] + norms[1]), rel=1e-15)
    assert combiner.scaling_norm == pytest.approx(0.1 * sorted(norms)[1], rel=1e-15)
    assert got[4][1].scaling_norm == combiner.scaling_norm
    fresh = GradientCombiner(trainable(make_model()), "rescale", scaling_norm="auto", auto_steps=3)
    fresh.load_state_dict(combiner.state_dict())
    assert fresh.scaling_norm == combiner.scaling_norm and not fresh._auto_measuring
    with pytest.raises(ValueError, match="auto_steps"):
        GradientCombiner(trainable(model), "rescale", scaling_norm="auto", auto_steps=0)


def test_auto_scaling_needs_a_retain_term():
    model = make_model()
    combiner = GradientCombiner(trainable(model), "rescale", scaling_norm="auto")
    _, forget = losses(model, micro_batch(0, 0))
    with pytest.raises(ValueError, match="scaling_norm='auto'"):
        combiner.backward(None, forget)


@pytest.mark.parametrize("rule, accumulation", [("rescale", 1), ("rescale", 3), ("erasediff", 1)])
def test_forget_scale_capped(rule, accumulation):
    kwargs = dict(scaling_norm=10.0, eta=50.0, max_forget_scale=0.02, max_grad_norm=None)
    model, ref_model = make_model(), make_model()
    combiner = GradientCombiner(trainable(model), rule, accumulation_steps=accumulation, **kwargs)
    got = run_engine(model, combiner, 3, accumulation)
    want = run_naive(ref_model, NaiveCombiner(rule, **kwargs), 3, accumulation)
    for (grads, info), (ref_grads, _) in zip(got, want):
        assert info.capped and abs(info.forget_coef) == 0.02
        assert_same(grads, ref_grads)
    assert combiner.capped_steps == 3


def zero_forget_variants(model, mb):
    retain, forget = losses(model, mb)
    return {
        "independent": (retain, torch.tensor(3.0, dtype=DTYPE)),  # does not require grad at all
        "times-zero": (retain, forget * 0.0),
        "nan": (retain, forget * float("nan")),
    }


@pytest.mark.parametrize("variant", ["independent", "times-zero", "nan"])
@pytest.mark.parametrize(
    "rule, kwargs, accumulation",
    [("rescale", {}, 1), ("clip", {}, 3), ("erasediff", {}, 1), ("rescale", dict(mode="lagged", lag_every=1), 1)],
    ids=["direct", "buffered", "erasediff", "lagged-measure"],
)
def test_zero_or_nonfinite_forget_gradient_is_dropped(variant, rule, kwargs, accumulation):
    model = make_model()
    combiner = GradientCombiner(trainable(model), rule, accumulation_steps=accumulation, max_grad_norm=None,
                                **kwargs)
    expected = [torch.zeros_like(p) for p in trainable(model)]
    for micro in range(accumulation):
        mb = micro_batch(0, micro)
        retain, forget = zero_forget_variants(model, mb)[variant]
        combiner.backward(retain, forget)
        retain_again, _ = losses(model, mb)
        for e, g in zip(expected, torch.autograd.grad(retain_again, trainable(model), allow_unused=True)):
            if g is not None:
                e += g
    info = combiner.finish_step()
    assert info.dropped_forget and not info.skipped and info.forget_coef == 0.0
    assert combiner.dropped_forget_steps == 1 and combiner.skipped_steps == 0
    assert_same([torch.zeros_like(p) if p.grad is None else p.grad for p in trainable(model)], expected)
    if kwargs.get("mode") == "lagged":  # a dropped measurement is re-measured, never reused
        assert combiner.state_dict()["lagged_coef"] is None


@pytest.mark.parametrize(
    "rule, kwargs, accumulation, nan_in",
    [
        ("rescale", {}, 1, "retain"),
        ("rescale", {}, 3, "retain"),
        ("erasediff", {}, 1, "retain"),
        ("rescale", dict(mode="lagged", lag_every=5), 1, "forget"),  # step 1 is lagged: cannot separate terms
    ],
    ids=["direct", "buffered", "erasediff", "lagged"],
)
def test_nonfinite_total_skips_the_step(rule, kwargs, accumulation, nan_in):
    model = make_model()
    combiner = GradientCombiner(trainable(model), rule, accumulation_steps=accumulation, **kwargs)
    opt = torch.optim.SGD(trainable(model), lr=0.1, momentum=0.5)
    run_engine_steps = 2 if kwargs.get("mode") == "lagged" else 1
    for step in range(run_engine_steps):
        before = [p.detach().clone() for p in model.parameters()]
        poisoned = step == run_engine_steps - 1
        for micro in range(accumulation):
            retain, forget = losses(model, micro_batch(step, micro))
            if poisoned and micro == accumulation - 1:
                if nan_in == "retain":
                    retain = retain * float("nan")
                else:
                    forget = forget * float("inf")
            combiner.backward(retain, forget)
        info = combiner.finish_step()
        if poisoned:
            break
        opt.step()
        opt.zero_grad(set_to_none=True)
    assert info.skipped and not math.isfinite(info.total_norm)
    assert combiner.skipped_steps == 1
    assert all(p.grad is None for p in model.parameters())  # zeroed by the combiner itself
    opt.step()  # even an engine that steps anyway cannot move the weights: there is no gradient
    for p, b in zip(model.parameters(), before):
        assert torch.equal(p, b)
    # The next step is normal again.
    for micro in range(accumulation):
        combiner.backward(*losses(model, micro_batch(9, micro)))
    assert not combiner.finish_step().skipped


# ---------------------------------------------------------------------------------------------- memory


def record_grad_storages(model):
    """Hold every tensor that ever served as p.grad during backward (held, so addresses cannot be reused)."""
    seen = {p: [] for p in trainable(model)}
    handles = [p.register_post_accumulate_grad_hook(lambda q: seen[q].append(q.grad)) for p in trainable(model)]
    return seen, handles


@pytest.mark.parametrize(
    "rule, accumulation, expected_buffers",
    [("rescale", 1, 0), ("clip", 1, 0), ("rescale", 3, 1), ("clip", 2, 1), ("erasediff", 1, 1), ("erasediff", 3, 1)],
)
def test_extra_buffer_accounting(rule, accumulation, expected_buffers):
    model = make_model()
    combiner = GradientCombiner(trainable(model), rule, scaling_norm=0.05, accumulation_steps=accumulation)
    for step in range(2):
        seen, handles = record_grad_storages(model)
        for micro in range(accumulation):
            combiner.backward(*losses(model, micro_batch(step, micro)))
        assert combiner.extra_buffers == expected_buffers
        info = combiner.finish_step()
        for h in handles:
            h.remove()
        assert info.extra_buffers == expected_buffers
        assert combiner.extra_buffers == 0  # freed at the end of the step
        # Independent check: how many distinct tensors autograd accumulated into, per parameter.
        distinct = max(len({t.data_ptr() for t in tensors}) for tensors in seen.values())
        assert distinct == 1 + expected_buffers
    assert combiner.peak_extra_buffers == expected_buffers


# ---------------------------------------------------------------------------------------------- state
