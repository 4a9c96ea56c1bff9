"""The planted-image experiments (benchmarks/planted*.py): glyphs, duplication levels, the judge's membership rule."""

import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("sklearn")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))

import planted_data as PD  # noqa: E402
from planted_eval import assign_items, evaluate_samples_nn  # noqa: E402

from siss_fast.demo.data import to_unit  # noqa: E402


@pytest.mark.parametrize("name", sorted(PD.GLYPHS))
def test_glyphs_deterministic_and_in_range(name):
    a, b = PD.GLYPHS[name](), PD.GLYPHS[name]()
    assert a.shape == (1, 16, 16) and a.dtype == torch.float32
    assert torch.equal(a, b)
    assert a.min() >= -1 and a.max() <= 1 and (a > 0).any()


def test_glyphs_distinct():
    g = torch.stack([to_unit(f()).flatten() for f in PD.GLYPHS.values()])
    d = torch.cdist(g, g) + torch.eye(g.shape[0]) * 1e9
    assert d.min() > 2.0


def test_duplication_levels_match_table():
    expected = {"demo": (0.04, 0.04, 1), "checker1": (0.01, 0.01, 1), "checker3": (0.03, 0.03, 1), "near3": (0.03, 0.03, 1),
                "five10": (0.02, 0.10, 5)}
    assert set(expected) <= set(PD.EXPERIMENTS)
    for name, (each, total, k) in expected.items():
        spec = PD.EXPERIMENTS[name]
        got_each, got_total = PD.duplication(spec)
        assert len(spec.items) == k
        assert got_each == pytest.approx(each, abs=5e-4) and got_total == pytest.approx(total, abs=5e-4)
        data = PD.experiment_data(name)
        assert data.forget_image.shape == (k, 1, 16, 16)
        assert data.forget.shape[0] == k * spec.copies
        assert data.retain.shape == (PD.N_RETAIN, 1, 16, 16)
        assert spec.copies / data.train.shape[0] == pytest.approx(got_each)
    kinds = {PD.EXPERIMENTS[n].kind for n in expected}
    assert kinds == {"near", "far"}


def test_nearest_neighbour_rule():
    data = PD.experiment_data("five10")
    retain, items = to_unit(data.retain), to_unit(data.forget_image)
    samples = torch.cat([items[[3, 0]], retain[[5, 100]], (items[1:2] + 0.02).clamp(0, 1)])
    out = assign_items(samples, retain, items)
    assert out["item"].tolist() == [3, 0, -1, -1, 1]
    assert out["rms_item"][0] == 0 and out["rms_retain"][2] == 0
    res = evaluate_samples_nn(samples, retain, items, item_names=list(PD.EXPERIMENTS["five10"].items))
    assert res["per_item"]["triangle"]["count"] == 1 and res["per_item"]["ring"]["count_capped"] == 1
    assert res["forget_rate"] == pytest.approx(3 / 5)


def test_near_item_is_near_but_its_own_neighbour():
    data = PD.experiment_data("near3")
    retain, item = to_unit(data.retain), to_unit(data.forget_image)
    out = assign_items(item, retain, item)
    assert out["item"].tolist() == [0]
    assert out["rms_retain"].item() * 16 < 4.0  # within L2 4 of the unaltered digit: "near"


def test_correlated_items_count_degraded_copies_the_nearest_neighbour_misses():
    """A faded copy of an item (half its contrast, on a grey background) is nearer in pixels to some retain image than
    to the item, so the nearest-neighbour rule calls it a digit; its shape still correlates with the item above any
    retain image's correlation, so :func:`correlated_items` counts it. Retain images themselves never count."""
    from planted_eval import correlated_items

    data = PD.experiment_data("demo")
    retain, items = to_unit(data.retain), to_unit(data.forget_image)
    faded = 0.3 + 0.25 * items  # (1, 1, 16, 16): the T-shirt at a quarter of its contrast
    assert int(assign_items(faded, retain, items)["item"][0]) == -1  # the nearest-neighbour rule misses it
    assert correlated_items(faded, retain, items).tolist() == [0]
    assert (correlated_items(retain, retain, items) == -1).all()
    out = evaluate_samples_nn(torch.cat([faded, retain[:3]]), retain, items)
    assert out["forget_rate"] == 0.0 and out["forget_rate_correlated"] == 0.25


def test_fidelity_report_reads_a_higher_is_better_guard_the_right_way_round():
    from trajectory_report import fidelity

    judge = [7.0, 6.9, 6.7, 6.5, 6.6]  # falls below 97 % at step 20
    checks = [{"step": 10 * i, "judge_quality": q, "fit": 1.0 + 0.02 * i,
               "score": 2.0 - 0.1 * i + (0.15 if i == 4 else 0)}
              for i, q in enumerate(judge)]
    up = fidelity(checks, "score", 0.1, higher_is_better=True)
    down = fidelity(checks, "fit", 0.03, higher_is_better=False)
    assert up["spearman"] == pytest.approx(1.0) and down["spearman"] == pytest.approx(0.9)
    assert up["classifier_97"] == 20 and up["guard_trip"] == 30 and up["trip_vs_classifier"] == 1  # 1.7 < 0.9 x 2
    assert down["guard_trip"] == 20  # 1.04 > 1.03
    assert fidelity(checks, "score", 0.1)["spearman"] == pytest.approx(-1.0)  # read as lower-is-better: reversed


def test_composite_guard_table_flags_late_trips_and_default_run_rises():
    """``guard_composite.table``: w = 0 is the retain fit alone; weighing in a falling cluster score trips earlier
    (on time here) but a default-lr run whose cluster score dips rises past a tight tolerance: not usable there."""
    from guard_composite import composite, table

    judge = [7.0, 6.75, 6.6, 6.5, 6.4]  # below 97 % from step 10
    over = {"x@0.001": [{"step": 10 * i, "judge_quality": q, "retain_fit": 1.0 + 0.02 * i,
                         "cluster_default": 2.0 * (1 - 0.05 * i)} for i, q in enumerate(judge)]}
    low = {"x@0.0001": [{"step": 20 * i, "retain_fit": 1.0 + 0.005 * i, "cluster_default": c}
                        for i, c in enumerate([2.0, 1.9, 1.95])]}
    assert composite(over["x@0.001"], 1.0)[1]["composite"] == pytest.approx(1.02 / 1.9)
    rows = {(r["w"], r["tolerance"]): r for r in table(over, low, [0, 1.0], [0.03, 0.06])}
    alone, mixed = rows[(0, 0.03)], rows[(1.0, 0.06)]
    assert alone["runs"]["x@0.001"]["trip_vs_classifier"] == 1  # 1.04 > 1.03 at step 20, one check late
    assert alone["default_lr_rise"]["x@0.0001"] == pytest.approx(0.01) and alone["usable"]
    assert mixed["runs"]["x@0.001"]["trip_vs_classifier"] == 0  # 1.02 / 0.95 = 1.074 > 1.06 at step 10
    assert mixed["runs"]["x@0.001"]["spearman"] == pytest.approx(1.0)
    assert mixed["default_lr_rise"]["x@0.0001"] == pytest.approx(1.005 / 0.95 - 1, abs=1e-4) and mixed["usable"]
    assert not rows[(1.0, 0.03)]["usable"]  # the default run's 5.8 % rise would trip a 3 % guard
    assert not any(r["meets_bar"] for r in rows.values() if not r["usable"])
