"""SPEC §8: every bad argument raises ValueError/TypeError naming the argument, before any kernel runs."""

import pytest
import torch

import siss_fast as sf
from siss_fast import testing as T

C = T.make_case((3, 2, 4, 5), t=10, seed=0)
ABAR = T.linear_alphas_cumprod()


def loss(**over):
    kw = dict(pred=C["pred"], noisy=C["noisy"], x0=C["x0"], a0=C["a0"], gamma=C["gamma"], sigma=C["sigma"], lambd=0.5)
    kw.update(over)
    return sf.siss_loss(**kw)


def weights(**over):
    kw = dict(noisy=C["noisy"], x0=C["x0"], a0=C["a0"], gamma=C["gamma"], sigma=C["sigma"], lambd=0.5)
    kw.update(over)
    return sf.importance_weights(**kw)


def mixture(**over):
    kw = dict(x0=C["x0"], a0=C["a0"], noise=C["noise"], gamma=C["gamma"], sigma=C["sigma"], mask=C["mask"])
    kw.update(over)
    return sf.mixture_noise(**kw)


def schedule(**over):
    kw = dict(alphas_cumprod=ABAR, timesteps=C["timesteps"])
    kw.update(over)
    return sf.schedule_coefficients(**kw)


BAD = [
    # (call, override, exception, argument named in the message)
    (loss, {"pred": C["pred"][:, :1]}, ValueError, "pred"),
    (loss, {"noisy": C["noisy"][:2]}, ValueError, "noisy"),
    (loss, {"x0": C["x0"].flatten(1)}, ValueError, "x0"),
    (loss, {"a0": C["a0"][..., :4]}, ValueError, "a0"),
    (loss, {"pred": C["pred"].numpy()}, TypeError, "pred"),
    (loss, {"pred": C["pred"].long()}, TypeError, "pred"),
    (loss, {"x0": C["x0"].int()}, TypeError, "x0"),
    (loss, {"gamma": C["gamma"][:2]}, ValueError, "gamma"),
    (loss, {"sigma": C["sigma"][:, None]}, ValueError, "sigma"),
    (loss, {"gamma": C["gamma"].long()}, TypeError, "gamma"),
    (loss, {"sigma": torch.tensor([0.1, 0.0, 0.2])}, ValueError, "sigma"),
    (loss, {"sigma": torch.tensor([0.1, -1.0, 0.2])}, ValueError, "sigma"),
    (loss, {"lambd": -0.1}, ValueError, "lambd"),
    (loss, {"lambd": 1.5}, ValueError, "lambd"),
    (loss, {"lambd": float("nan")}, ValueError, "lambd"),
    (loss, {"lambd": "0.5"}, TypeError, "lambd"),
    (loss, {"lambd": True}, TypeError, "lambd"),
    (loss, {"weight_clip": 0.0}, ValueError, "weight_clip"),
    (loss, {"weight_clip": -2.0}, ValueError, "weight_clip"),
    (loss, {"weight_clip": "big"}, TypeError, "weight_clip"),
    (loss, {"reduction": "avg"}, ValueError, "reduction"),
    (loss, {"pred": torch.zeros(0, 2, 4, 5), "noisy": torch.zeros(0, 2, 4, 5), "x0": torch.zeros(0, 2, 4, 5),
            "a0": torch.zeros(0, 2, 4, 5)}, ValueError, "pred"),
    (loss, {"pred": torch.tensor(1.0)}, ValueError, "pred"),
    (loss, {"pred": C["pred"].to("meta")}, ValueError, "noisy"),
    (loss, {"gamma": C["gamma"].to("meta")}, ValueError, "gamma"),
    (weights, {"lambd": 2.0}, ValueError, "lambd"),
    (weights, {"x0": C["x0"][:1]}, ValueError, "x0"),
    (weights, {"sigma": -C["sigma"]}, ValueError, "sigma"),
    (weights, {"weight_clip": 0}, ValueError, "weight_clip"),
    (mixture, {"a0": C["a0"][:, :1]}, ValueError, "a0"),
    (mixture, {"noise": C["noise"].long()}, TypeError, "noise"),
    (mixture, {"mask": C["mask"].float()}, TypeError, "mask"),
    (mixture, {"mask": C["mask"][:2]}, ValueError, "mask"),
    (mixture, {"mask": [True, False, True]}, TypeError, "mask"),
    (mixture, {"gamma": C["gamma"][:1]}, ValueError, "gamma"),
    (mixture, {"sigma": torch.zeros(3)}, ValueError, "sigma"),
    (mixture, {"x0": C["x0"].to("meta")}, ValueError, "a0"),
    (schedule, {"timesteps": torch.tensor([0, 1000, 3])}, ValueError, "timesteps"),
    (schedule, {"timesteps": torch.tensor([-1, 0, 3])}, ValueError, "timesteps"),
    (schedule, {"timesteps": torch.tensor([0.0, 1.0])}, TypeError, "timesteps"),
    (schedule, {"timesteps": torch.zeros(0, dtype=torch.long)}, ValueError, "timesteps"),
    (schedule, {"timesteps": torch.zeros(2, 2, dtype=torch.long)}, ValueError, "timesteps"),
    (schedule, {"alphas_cumprod": ABAR[None]}, ValueError, "alphas_cumprod"),
    (schedule, {"alphas_cumprod": torch.ones(1000)}, ValueError, "alphas_cumprod"),
    (schedule, {"alphas_cumprod": [0.5, 0.4]}, TypeError, "alphas_cumprod"),
    (schedule, {"dtype": torch.float16}, TypeError, "dtype"),
]


@pytest.mark.parametrize("call,override,exc,name", BAD, ids=[f"{c.__name__}-{n}-{i}" for i, (c, _, _, n) in enumerate(BAD)])
def test_bad_argument_raises_naming_it(call, override, exc, name):
    with pytest.raises(exc) as info:
        call(**override)
    message = str(info.value)
    assert message.startswith(name + ":"), message
    assert "expected" in message and "got" in message, message


def test_module_validates_constructor_arguments():
    with pytest.raises(ValueError, match="^lambd:"):
        sf.SISSLoss(ABAR, lambd=1.2)
    with pytest.raises(ValueError, match="^weight_clip:"):
        sf.SISSLoss(ABAR, weight_clip=-1)
    with pytest.raises(ValueError, match="^reduction:"):
        sf.SISSLoss(ABAR, reduction="max")
    with pytest.raises(ValueError, match="^t_range:"):
        sf.SISSLoss(ABAR)(lambda x, t: x, C["x0"], C["a0"], t_range=(5, 1000))


def test_checks_run_before_any_kernel(monkeypatch):
    """A bad argument is reported even when the backend itself would fail: nothing reaches it."""
    from siss_fast import reference

    def boom(*args, **kwargs):
        raise AssertionError("kernel ran")

    monkeypatch.setattr(reference, "siss_loss_forward", boom)
    previous = sf.get_backend()
    sf.set_backend("torch")
    try:
        with pytest.raises(ValueError, match="^lambd:"):
            loss(lambd=3.0)
    finally:
        sf.set_backend(previous)
