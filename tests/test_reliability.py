"""Engine reliability (issue 8): kills and resumes, non-finite steps, a full disk, hostile pickles, no network,
audit hashes in the manifest, deterministic runs. Tiny random-weight DDPM on the CPU; the kill test runs the CLI in
subprocesses (about a minute on two shared cores).
"""

import errno
import functools
import hashlib
import json
import os
import random
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from engine_helpers import DATA, base_config, tiny_model  # noqa: E402

from siss_fast.engine import load_config  # noqa: E402
from siss_fast.engine.checkpoint import CheckpointError, find_latest, load_checkpoint  # noqa: E402
from siss_fast.engine.loop import run  # noqa: E402

import siss_fast  # noqa: E402

# Subprocesses import the siss_fast under test (installed, or the in-tree build), never the cwd's source tree: the
# folder holding the imported package goes on PYTHONPATH and they run from its parent (python -c / -m put the cwd
# first on sys.path).
ROOT = Path(siss_fast.__file__).resolve().parent.parent
SUBPROCESS_CWD = str(ROOT.parent)


def _config(out, **sections):
    return base_config(tiny_model("ddpm"), out, **sections)


def _final_unet(out):
    from safetensors.torch import load_file

    return load_file(str(Path(out) / "final" / "unet" / "diffusion_pytorch_model.safetensors"))


def _assert_same_tensors(a, b):
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


def _equal_nested(a, b) -> bool:
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_equal_nested(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(_equal_nested(x, y) for x, y in zip(a, b))
    return a == b


def _records(out):
    records = []
    path = Path(out) / "metrics.jsonl"
    if path.is_file():
        for line in path.read_text().splitlines():
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:  # a torn last line of a killed run
                pass
    return [r for r in records if "total_norm" in r]


@functools.lru_cache(maxsize=1)
def _finds_package_by_itself() -> bool:
    """Whether a child interpreter (this one's executable, run from SUBPROCESS_CWD) imports the same siss_fast without
    help (an installed or editable package). Then ROOT stays off PYTHONPATH: in a source checkout ROOT also holds the
    top-level ``kernels/`` folder (installed as ``siss_fast.kernels``), which would shadow the ``kernels`` package
    that transformers / diffusers import."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    probe = subprocess.run([sys.executable, "-c", "import siss_fast; print(siss_fast.__file__)"], env=env,
                           cwd=SUBPROCESS_CWD, capture_output=True, text=True, timeout=120)
    return probe.returncode == 0 and Path(probe.stdout.strip()).resolve() == Path(siss_fast.__file__).resolve()


def _subprocess_env(**extra):
    env = dict(os.environ)
    if not _finds_package_by_itself():
        env["PYTHONPATH"] = os.pathsep.join([str(ROOT)] + [p for p in [env.get("PYTHONPATH")] if p])
    env.update(extra)
    return env


def _write_yaml(path, cfg):
    import yaml

    path.write_text(yaml.safe_dump(cfg))
    return path


# ----------------------------------------------------------------------------------------------------- faults


def test_sigkill_at_random_moments_then_resume_matches_uninterrupted(tmp_path):
    steps = 40  # a step takes tens of ms: the kills below land within the first ~20
    sections = dict(train={"steps": steps}, checkpoint={"every": 1, "keep_last": 2})
    reference = run(load_config(_config(tmp_path / "reference", **sections)))
    assert reference.steps_done == steps
    out = tmp_path / "killed"
    cfg_path = _write_yaml(tmp_path / "run.yaml", _config(out, **sections))
    root = out / "checkpoints"
    env = _subprocess_env(HF_HUB_OFFLINE="1")
    log = open(tmp_path / "cli.log", "ab")

    # 1. deterministically inside a checkpoint write: killed right after trainer.pt of step 3 hits the disk
    driver = textwrap.dedent("""
        import os, signal, sys, torch
        real_save = torch.save
        def save(obj, f, *args, **kwargs):
            real_save(obj, f, *args, **kwargs)
            if str(f).endswith(os.path.join(".tmp-step-000003", "trainer.pt")):
                os.kill(os.getpid(), signal.SIGKILL)
        torch.save = save
        from siss_fast.cli import main
        sys.exit(main(sys.argv[1:]))
    """)
    proc = subprocess.run([sys.executable, "-c", driver, "unlearn", str(cfg_path)], env=env, cwd=SUBPROCESS_CWD, stdout=log,
                          stderr=subprocess.STDOUT, timeout=300)
    assert proc.returncode == -signal.SIGKILL
    half = root / ".tmp-step-000003"
    assert (half / "trainer.pt").is_file() and not (half / "COMPLETE.json").exists()
    with pytest.raises(CheckpointError, match="incomplete"):
        load_checkpoint(half)  # the half-written folder never loads ...
    assert find_latest(root).name == "step-000002"  # ... and is never picked by resume=latest
    assert load_checkpoint(find_latest(root))["step"] == 2

    # 2. at seeded random moments: once during start-up, then shortly after the run has made progress
    rng = random.Random(8)
    kills, history = 0, []  # (checkpoint step at launch, latest after the kill, half-written folders)
    for attempt in range(5):
        latest = find_latest(root)
        at_launch = load_checkpoint(latest)["step"] if latest is not None else 0
        proc = subprocess.Popen([sys.executable, "-m", "siss_fast", "unlearn", str(cfg_path), "resume=latest"],
                                env=env, cwd=SUBPROCESS_CWD, stdout=log, stderr=subprocess.STDOUT)
        try:
            if attempt == 0:
                time.sleep(rng.uniform(0.5, 3.0))
            else:
                deadline = time.monotonic() + 120
                while proc.poll() is None and time.monotonic() < deadline:  # until it saved a new checkpoint
                    newest = find_latest(root)
                    if newest is not None and int(newest.name.split("-")[1]) > at_launch:
                        break
                    time.sleep(0.01)
                time.sleep(rng.uniform(0.0, 0.15))  # mid-step or mid-save
            if proc.poll() is None:
                os.kill(proc.pid, signal.SIGKILL)
                kills += 1
        finally:
            proc.wait(timeout=300)
        if proc.returncode == 0:
            break
        assert proc.returncode == -signal.SIGKILL
        latest = find_latest(root)  # whatever moment it hit, the newest complete-looking checkpoint loads
        assert latest is None or load_checkpoint(latest)["step"] >= at_launch
        history.append((at_launch, latest and latest.name, sorted(p.name for p in root.glob(".tmp-*"))))
    assert kills >= 4, history

    # 3. the last resume finishes; the weights are the uninterrupted run's, bit for bit
    proc = subprocess.run([sys.executable, "-m", "siss_fast", "unlearn", str(cfg_path), "resume=latest"], env=env, cwd=SUBPROCESS_CWD,
                          capture_output=True, text=True, timeout=300)
    log.close()
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "resumed from" in proc.stdout
    _assert_same_tensors(_final_unet(tmp_path / "reference"), _final_unet(out))
    assert sorted({r["step"] for r in _records(out)}) == list(range(1, steps + 1))
    assert not any(p.name.startswith(".tmp-") for p in root.iterdir())


def test_non_finite_step_leaves_weights_and_optimizer_state_untouched(tmp_path, monkeypatch, capsys):
    from siss_fast.objectives import Objective

    original, calls = Objective.__call__, []

    def poisoned(self, *args, **kwargs):  # one call per step (siss_nois, one micro-batch)
        calls.append(1)
        terms = original(self, *args, **kwargs)
        if len(calls) in (2, 4, 5):
            terms.retain = terms.retain * float("inf")
        return terms

    monkeypatch.setattr(Objective, "__call__", poisoned)
    out = tmp_path / "n"
    cfg = load_config(_config(out, method={"name": "siss_nois"}, train={"steps": 6, "ema_decay": 0},
                              gradient={"max_consecutive_skips": 2, "scaling_norm": 1.0},
                              checkpoint={"every": 1, "keep_last": 10}))
    result = run(cfg)
    assert (result.stop_reason, result.steps_done) == ("non_finite", 5)
    assert "2 consecutive steps had a non-finite gradient" in capsys.readouterr().out
    recs = _records(out)
    assert [r["skipped"] for r in recs] == [False, True, False, True, True]
    assert [r["skipped_steps"] for r in recs] == [0, 1, 1, 2, 3]
    ck = {c: load_checkpoint(out / "checkpoints" / f"step-{c:06d}") for c in (1, 2, 3, 4)}
    for before, after in ((1, 2), (3, 4)):  # a skipped step changes neither the weights nor the optimizer state
        _assert_same_tensors(ck[before]["unet"], ck[after]["unet"])
        assert _equal_nested(ck[before]["trainer"]["optimizer"]["state"], ck[after]["trainer"]["optimizer"]["state"])
    assert not all(torch.equal(ck[2]["unet"][k], ck[3]["unet"][k]) for k in ck[2]["unet"])  # the run went on
    assert not _equal_nested(ck[2]["trainer"]["optimizer"]["state"], ck[3]["trainer"]["optimizer"]["state"])
    _assert_same_tensors(ck[4]["unet"], _final_unet(out))  # the stopping step 5 did not touch the weights either
    assert json.loads((out / "manifest.json").read_text())["skipped_steps"] == 3


def test_disk_full_while_saving_keeps_previous_checkpoint_and_stops(tmp_path, monkeypatch):
    sections = dict(train={"steps": 4}, checkpoint={"every": 2, "keep_last": 2})
    real_save = torch.save

    def full_disk(obj, f, *args, **kwargs):
        if ".tmp-step-000004" in str(f):  # the second file of the second checkpoint: half written, then ENOSPC
            Path(f).write_bytes(b"\0" * 100)
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(f))
        return real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", full_disk)
    out = tmp_path / "full"
    with pytest.raises(CheckpointError, match=r"cannot write checkpoint step 4.*No space left on device.*run stops"
                                              r".*step-000002' is intact.*resume=latest"):
        run(load_config(_config(out, **sections)))
    monkeypatch.setattr(torch, "save", real_save)
    root = out / "checkpoints"
    assert [p.name for p in root.iterdir()] == ["step-000002"]  # the partial folder is gone (its space freed)
    assert load_checkpoint(root / "step-000002")["step"] == 2
    assert not (out / "final").exists()
    resumed = run(load_config(_config(out, train={"steps": 4}, checkpoint={"every": 2, "resume": "latest"})))
    assert resumed.steps_done == 4
    run(load_config(_config(tmp_path / "reference", **sections)))
    _assert_same_tensors(_final_unet(tmp_path / "reference"), _final_unet(out))  # nothing was lost


# ----------------------------------------------------------------------------------------------------- safety


class _CodeOnLoad:
    """A pickle that creates a file when unpickled (stands for arbitrary code)."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_foreign_pickles_in_a_checkpoint_are_never_executed(tmp_path):
    out = tmp_path / "c"
    run(load_config(_config(out, train={"steps": 2}, checkpoint={"every": 1})), stop_after=1)  # not finished
    ckpt = out / "checkpoints" / "step-000001"
    marker = tmp_path / "executed"

    def rehash():  # an attacker can also rewrite COMPLETE.json: the hashes are against damage, not malice
        meta = json.loads((ckpt / "COMPLETE.json").read_text())
        meta["sha256"] = {p.name: hashlib.sha256(p.read_bytes()).hexdigest()
                          for p in sorted(ckpt.iterdir()) if p.name != "COMPLETE.json"}
        (ckpt / "COMPLETE.json").write_text(json.dumps(meta))

    torch.save({"payload": _CodeOnLoad(marker)}, ckpt / "extra.pt")  # not the engine's: never loaded
    rehash()
    resumed = run(load_config(_config(out, train={"steps": 2}, checkpoint={"every": 0, "resume": "latest"})),
                  stop_after=2)
    assert resumed.steps_done == 2 and not marker.exists()

    trainer = torch.load(ckpt / "trainer.pt", weights_only=True)
    trainer["consecutive_skips"] = _CodeOnLoad(marker)  # the engine's own file, poisoned
    torch.save(trainer, ckpt / "trainer.pt")
    rehash()
    with pytest.raises(CheckpointError, match="cannot read"):
        run(load_config(_config(out, train={"steps": 2}, checkpoint={"resume": str(ckpt)})))
    assert not marker.exists()


def test_pickle_weights_with_code_are_refused_even_when_allowed(tmp_path):
    import shutil

    from safetensors.torch import load_file

    from siss_fast.engine.models import ModelError, load_model

    model = tmp_path / "model"
    shutil.copytree(tiny_model("ddpm"), model)
    unet = model / "unet"
    state = load_file(str(unet / "diffusion_pytorch_model.safetensors"))
    (unet / "diffusion_pytorch_model.safetensors").unlink()
    marker = tmp_path / "executed"
    for suffix in (".ckpt", ".pt"):  # .bin is in test_engine_config.py
        torch.save(state, unet / f"diffusion_pytorch_model{suffix}")
        with pytest.raises(ModelError, match="only pickle weights.*allow_pickle"):
            load_model(str(model))
        (unet / f"diffusion_pytorch_model{suffix}").unlink()
    state["conv_in.weight"] = _CodeOnLoad(marker)
    torch.save(state, unet / "diffusion_pytorch_model.bin")
    with pytest.raises(ModelError, match=r"weights_only=True"):
        load_model(str(model), allow_pickle=True)
    assert not marker.exists()


SITECUSTOMIZE = """
import os, socket

_LOG = os.environ["SISS_TEST_NET_LOG"]


def _blocked(name):
    def deny(*args, **kwargs):
        with open(_LOG, "a") as fh:
            fh.write(f"{name} {args[1:3]!r}\\n")
        raise OSError(f"network access blocked by the test ({name})")
    return deny


socket.socket.connect = _blocked("connect")
socket.socket.connect_ex = _blocked("connect_ex")
socket.socket.sendto = _blocked("sendto")
socket.create_connection = _blocked("create_connection")
socket.getaddrinfo = _blocked("getaddrinfo")
"""


def test_a_run_needs_no_network(tmp_path):
    guard = tmp_path / "guard"
    guard.mkdir()
    (guard / "sitecustomize.py").write_text(SITECUSTOMIZE)
    net_log = tmp_path / "net.log"
    env = _subprocess_env(SISS_TEST_NET_LOG=str(net_log))
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(guard), env.get("PYTHONPATH")) if p)
    for key in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE"):
        env.pop(key, None)  # the engine must go offline by itself
    cfg = _config(tmp_path / "out", train={"steps": 1}, checkpoint={"every": 1})
    cfg["model"] = {"build": "tiny-ddpm"}  # the build path too
    probe = "import socket; print(socket.create_connection.__name__)"
    assert subprocess.run([sys.executable, "-c", probe], env=env, cwd=SUBPROCESS_CWD, capture_output=True, text=True,
                          timeout=60).stdout.strip() == "deny"  # the guard is active in child processes
    proc = subprocess.run([sys.executable, "-m", "siss_fast", "unlearn", str(_write_yaml(tmp_path / "c.yaml", cfg))],
                          env=env, cwd=SUBPROCESS_CWD, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert (tmp_path / "out" / "final" / "model_index.json").is_file()
    assert not net_log.exists(), net_log.read_text()


def test_manifest_records_content_hashes(tmp_path):
    from siss_fast.engine.models import hash_model_folder

    out = tmp_path / "m"
    run(load_config(_config(out, train={"steps": 1})))
    manifest = json.loads((out / "manifest.json").read_text())
    expected = [{"file": p.name, "sha256": hashlib.sha256(p.read_bytes()).hexdigest()}
                for p in sorted((DATA / "forget").iterdir())]
    assert manifest["forget_items"] == expected
    assert manifest["base_model"]["sha256"] == hash_model_folder(tiny_model("ddpm"))
    assert manifest["final_model"]["sha256"] == hash_model_folder(out / "final")
    assert len(manifest["final_model"]["sha256"]) == 64
    assert manifest["final_model"]["sha256"] != manifest["base_model"]["sha256"]  # the weights changed


# ------------------------------------------------------------------------------------------------ determinism


def test_deterministic_runs_are_bit_identical_on_cpu(tmp_path, monkeypatch):
    from siss_fast.engine import setup as run_setup

    seen = []
    make_optimizer = run_setup.make_optimizer

    def spy(*args, **kwargs):
        seen.append(torch.are_deterministic_algorithms_enabled())
        return make_optimizer(*args, **kwargs)

    monkeypatch.setattr(run_setup, "make_optimizer", spy)
    assert not torch.are_deterministic_algorithms_enabled()
    outs = [tmp_path / "a", tmp_path / "b"]
    for out in outs:
        cfg = load_config(_config(out, train={"steps": 3, "deterministic": True}))
        assert cfg.train.deterministic is True
        assert run(cfg).steps_done == 3
    assert seen == [True, True] and not torch.are_deterministic_algorithms_enabled()  # restored after the run
    _assert_same_tensors(_final_unet(outs[0]), _final_unet(outs[1]))
    losses = [[{k: v for k, v in r.items() if k.startswith("loss")} for r in _records(out)] for out in outs]
    assert losses[0] == losses[1] and len(losses[0]) == 3 and all(losses[0][0].values())
    with pytest.raises(Exception, match=r"train\.deterministic: expected true/false"):
        load_config(_config(tmp_path / "x"), ["train.deterministic=sometimes"])
