"""Backend selection: explicit choices that cannot run raise and name what is missing; auto falls back."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import siss_fast as sf
from siss_fast import backends
from siss_fast import testing as T


def python_c(code, env=None, check=False):
    """``python -c code`` importing the siss_fast under test (installed or in-tree build), not the cwd's source."""
    root = Path(sf.__file__).resolve().parent.parent
    env = dict(os.environ if env is None else env)
    env["PYTHONPATH"] = os.pathsep.join([str(root)] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=check,
                          cwd=str(root.parent))


def test_unknown_backend_name():
    with pytest.raises(ValueError, match="^name: expected one of"):
        sf.set_backend("fast")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error on a machine without CUDA")
def test_cuda_backend_unavailable_names_what_is_missing():
    previous = sf.get_backend()
    with pytest.raises(sf.BackendUnavailableError) as info:
        sf.set_backend("cuda")
    assert "cuda" in str(info.value).lower()
    assert any(word in str(info.value) for word in ("not built", "without CUDA", "no CUDA device"))
    assert sf.get_backend() == previous


def test_explicit_backend_on_wrong_device_raises():
    if not backends.availability("cpp")[0]:
        pytest.skip("extension not built")
    previous = sf.get_backend()
    sf.set_backend("cpp")
    try:
        with pytest.raises(sf.BackendUnavailableError, match="CPU tensors"):
            backends.resolve(torch.device("cuda"))
    finally:
        sf.set_backend(previous)


def test_auto_falls_back_and_says_why_once():
    code = (
        "import warnings, torch, siss_fast as sf, siss_fast.backends as b\n"
        "b.availability = (lambda orig: (lambda name, dev=None: (False, 'pretend missing') if name == 'cpp' "
        "else orig(name, dev)))(b.availability)\n"
        "with warnings.catch_warnings(record=True) as w:\n"
        "    warnings.simplefilter('always')\n"
        "    x = torch.randn(2, 3)\n"
        "    sf.mixture_noise(x, x, x, torch.ones(2), torch.ones(2), torch.tensor([True, False]))\n"
        "    sf.mixture_noise(x, x, x, torch.ones(2), torch.ones(2), torch.tensor([True, False]))\n"
        "msgs = [str(m.message) for m in w if 'siss_fast' in str(m.message)]\n"
        "print(len(msgs), msgs[0] if msgs else '')\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "SISS_FAST_BACKEND"}
    out = python_c(code, env=env, check=True).stdout
    count, _, message = out.strip().partition(" ")
    assert count == "1", out
    assert "'torch'" in message and "pretend missing" in message


def test_env_variable_selects_backend_and_rejects_bad_names():
    env = dict(os.environ, SISS_FAST_BACKEND="torch")
    out = python_c("import siss_fast as sf; print(sf.get_backend())", env=env, check=True).stdout
    assert out.strip() == "torch"
    env["SISS_FAST_BACKEND"] = "gpu"
    res = python_c("import siss_fast as sf; sf.get_backend()", env=env)
    assert res.returncode != 0 and "SISS_FAST_BACKEND: expected one of" in res.stderr


def test_import_does_not_touch_cuda_or_triton():
    code = ("import sys, siss_fast\n"
            "import torch\n"
            "print('triton' in sys.modules, torch.cuda.is_initialized())")
    out = python_c(code, check=True).stdout
    assert out.strip() == "False False"


def test_env_report_is_honest():
    report = sf.env_report()
    assert f"torch {torch.__version__}" in report
    assert "extension siss_fast._C:" in report
    for name in ("torch", "cpp", "triton", "cuda"):
        ok, why = backends.availability(name)
        assert f"{name:7s} {'available' if ok else 'unavailable'}: {why}" in report
    resolved, _ = backends.resolve(torch.device("cpu"))
    assert f"ops on cpu tensors run on: {resolved}" in report


def test_every_backend_agrees_on_one_case():
    c = T.make_case((2, 4, 8, 8), t=800, seed=9)
    results = {}
    previous = sf.get_backend()
    try:
        for name in ("torch", "cpp", "triton"):
            if not backends.availability(name, "cpu")[0]:
                continue
            sf.set_backend(name)
            results[name] = sf.siss_loss(c["pred"], c["noisy"], c["x0"], c["a0"], c["gamma"], c["sigma"], 0.5)
    finally:
        sf.set_backend(previous)
    base = results.pop("torch")
    for name, got in results.items():
        for a, b in zip(got, base):
            assert T.max_rel_error(a, b) <= 1e-5, name
