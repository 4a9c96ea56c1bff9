"""``cluster_score``: the Inception-style score over k-means clusters of the retain set's base-UNet features (the
pixel quality guard), on the demo's shipped model and digits (CPU, one thread, a few seconds)."""

import math

import pytest
import torch
import torch.nn.functional as F

from siss_fast.metrics.cluster_score import check_cluster_options, cluster_inception_score, kmeans
from siss_fast.metrics.registry import MetricContext, get_metric


def _blobs(k=4, per=50, dim=3, seed=0):
    gen = torch.Generator().manual_seed(seed)
    centres = 10.0 * torch.eye(k, dim) if k <= dim else 10.0 * torch.randn(k, dim, generator=gen)
    x = torch.cat([c + 0.3 * torch.randn(per, dim, generator=gen) for c in centres])
    return x, torch.arange(k).repeat_interleave(per)


def test_kmeans_recovers_separated_clusters_deterministically():
    x, labels = _blobs()
    c, a = kmeans(x, 4, seed=3)
    c2, a2 = kmeans(x, 4, seed=3)
    assert torch.equal(c, c2) and torch.equal(a, a2)
    # every true cluster maps to exactly one found cluster
    pairs = {(int(t), int(f)) for t, f in zip(labels, a)}
    assert len(pairs) == 4 and len({f for _, f in pairs}) == 4
    assert kmeans(x[:3], 10)[0].shape[0] == 3  # k is capped by the number of points


def test_score_is_k_for_confident_balanced_samples_and_one_for_a_single_cluster():
    x, _ = _blobs()
    c, a = kmeans(x, 4)
    spread = float((x.double() - c[a]).square().sum(1).mean())
    balanced = cluster_inception_score(x, c, spread, tau=1.0)
    assert balanced == pytest.approx(4.0, rel=1e-3)
    one = cluster_inception_score(x[a == a[0]], c, spread, tau=1.0)
    assert one == pytest.approx(1.0, abs=1e-3)
    # ambiguous samples (between two centres) score lower than confident ones
    between = (c[0] + c[1]).float() / 2 + 0.1 * torch.randn(50, 3, generator=torch.Generator().manual_seed(1))
    mixed = torch.cat([x, between])
    assert cluster_inception_score(mixed, c, spread, 1.0) < balanced


def test_floor_reads_samples_far_from_every_cluster_as_no_class():
    """Without the floor a sample far from every centroid is assigned *more* confidently (the softmax of large
    distances is sharp), so junk between clusters raises nothing; with the "none" logit it reads near uniform and
    lowers the score; samples as near their centroid as the retain set's own keep most of theirs."""
    from siss_fast.metrics.cluster_score import none_logit

    x, _ = _blobs()
    c, a = kmeans(x, 4)
    spread = float((x.double() - c[a]).square().sum(1).mean())
    none = none_logit(x, c, spread, 1.0, 0.99)
    d = torch.cdist(x.double(), c).square().min(1).values / spread
    assert -none == pytest.approx(float(torch.quantile(d, 0.99)))
    assert none_logit(x, c, spread, 1.0, None) is None
    plain, floored = cluster_inception_score(x, c, spread, 1.0), cluster_inception_score(x, c, spread, 1.0, none)
    assert 0.5 * plain < floored < plain  # some of every sample's mass goes to "none", spread evenly
    far = c[0].float() + 40.0 * torch.tensor([1.0, 1.0, 1.0])  # nearest centroid c[0], far from all of them
    junk = torch.cat([x, far.repeat(100, 1)])
    # the softmax calls the junk confidently class 0 (the score falls only by the classes' imbalance, 13 %); the
    # floor calls it no class and the score falls by 30 %
    drop_plain = 1 - cluster_inception_score(junk, c, spread, 1.0) / plain
    drop_floor = 1 - cluster_inception_score(junk, c, spread, 1.0, none) / floored
    assert drop_plain < 0.15 and drop_floor > drop_plain + 0.1, (drop_plain, drop_floor)


@pytest.mark.parametrize("options,bad", [({"k": 1}, "k"), ({"k": 2.5}, "k"), ({"tau": 0}, "tau"),
                                         ({"tau": "sharp"}, "tau"), ({"iters": 0}, "iters"), ({"t": -1}, "t"),
                                         ({"pool": "max"}, "pool"), ({"clusters": 5}, "clusters"),
                                         ({"floor": 0}, "floor"), ({"floor": 1.5}, "floor"), ({"floor": "x"}, "floor")])
def test_bad_options_raise_naming_the_option(options, bad):
    with pytest.raises(ValueError, match=rf"cluster_score\.{bad}\b"):
        check_cluster_options(options)


def test_bad_option_fails_at_config_time_naming_the_key(tmp_path):
    from siss_fast.engine import ConfigError, load_config

    cfg = {"model": {"path": str(tmp_path / "nowhere")}, "output_dir": str(tmp_path / "out"),
           "validation": {"quality_metric": "cluster_score", "metric_options": {"cluster_score": {"tau": -1}}}}
    with pytest.raises(ConfigError, match=r"cluster_score\.tau"):
        load_config(cfg)


@pytest.fixture(scope="module")
def setting():
    pytest.importorskip("diffusers")
    pytest.importorskip("sklearn")
    from siss_fast.demo.data import demo_data, to_unit
    from siss_fast.demo.models import SHIPPED_MODEL
    from siss_fast.engine.models import load_model

    torch.set_num_threads(1)
    data = demo_data()
    model = load_model(str(SHIPPED_MODEL))
    return model, to_unit(data.retain), to_unit(data.forget_image)


def _ctx(model, retain, forget, options=None):
    return MetricContext(retain, forget, dict(options or {}), model.kind, torch.device("cpu"), model, model.unet)


def test_registered_guard_prefers_clean_digits_and_ignores_forget_copies(setting):
    model, digits, shirt = setting
    entry = get_metric("cluster_score")
    assert entry.higher_is_better is True and entry.tolerance is not None
    score = entry.factory(_ctx(model, digits[:400], shirt, {"k": 10}))
    held_out = digits[400:700]
    clean = score(held_out)
    blurred = score(F.avg_pool2d(F.pad(held_out, (1, 1, 1, 1), mode="replicate"), 3, stride=1))
    mixed = score(0.5 * held_out + 0.5 * held_out.roll(1, 0))  # two digits overlaid: ambiguous shapes
    assert 1.0 <= clean <= 10.0 and clean > blurred and clean > mixed, (clean, blurred, mixed)
    assert score(held_out) == clean  # fixed noise and centroids: the same reading for the same samples
    # the samples that are forget copies are left out, so removing them does not move the score
    assert score(torch.cat([held_out, shirt.repeat(30, 1, 1, 1)])) == pytest.approx(clean, rel=1e-9)
    assert math.isfinite(score.spread) and score.centres.shape[0] == 10
