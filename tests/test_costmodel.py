"""The cost model on constructed data whose answer is known."""

from __future__ import annotations

import math

import numpy as np
import pytest

from model.mambalitesr import preset
from search import costmodel


def archs():
    return [
        preset("student", embed_dim=c, rank=r, n_groups=g, blocks_per_group=b)
        for c, r, g, b in [
            (16, 2, 2, 2),
            (24, 4, 4, 2),
            (32, 2, 4, 2),
            (32, 8, 2, 1),
            (40, 3, 3, 2),
            (48, 6, 4, 1),
        ]
    ]


def truth(f):  # energy per image in mJ, exactly linear in the features
    return 0.3 + 2.0 * f["flops_g"] + 0.05 * f["scan_width_k"] + 0.1 * f["layers"]


def test_recovers_a_linear_law_and_predicts_an_unseen_architecture():
    points = [(costmodel.features(a), truth(costmodel.features(a))) for a in archs()]
    model = costmodel.fit(points, "energy_mj_per_image", "orin-nano")
    unseen = preset("student", embed_dim=20, rank=5, n_groups=3, blocks_per_group=1)
    expected = truth(costmodel.features(unseen))
    assert model.predict(unseen) == pytest.approx(expected, rel=0.02)
    assert model.n == 6 and model.loo_mae < 0.05 * np.mean([v for _, v in points])


def test_leave_one_out_error_sees_noise():
    rng = np.random.default_rng(0)
    points = [(costmodel.features(a), truth(costmodel.features(a)) + rng.normal(0, 0.5)) for a in archs()]
    model = costmodel.fit(points, "energy_mj_per_image", "orin-nano")
    exact = costmodel.fit(
        [(f, truth(f)) for f in (costmodel.features(a) for a in archs())], "energy_mj_per_image", "orin-nano"
    )
    assert model.loo_mae > 0.2 > exact.loo_mae


def test_too_few_points():
    f = costmodel.features(archs()[0])
    assert costmodel.fit([], "energy_mj_per_image", "d") is None
    assert costmodel.fit([(f, 1.0)], "energy_mj_per_image", "d") is None
    two = costmodel.fit([(f, 1.0), (costmodel.features(archs()[1]), 3.0)], "energy_mj_per_image", "d")
    assert two is not None and math.isnan(two.loo_mae)
    assert two.predict_features(f) == pytest.approx(1.0, abs=0.05)


def test_round_trip_through_a_dict():
    points = [(costmodel.features(a), truth(costmodel.features(a))) for a in archs()]
    model = costmodel.fit(points, "latency_ms_p50", "cpu")
    again = costmodel.CostModel.from_dict(model.to_dict())
    assert again == model and again.predict(archs()[2]) == model.predict(archs()[2])
