"""The headline metric: degradation per unit runtime reduction, and ratios to PP."""

import pytest

from prunekit.evaluation.headline import degradation_per_runtime_reduction, relative_to


def test_degradation_per_runtime_reduction():
    # +10 PPL for a 25% shorter time per batch: 40 PPL per unit of runtime reduction
    assert degradation_per_runtime_reduction(40.0, 30.0, 0.75, 1.0) == pytest.approx(40.0)
    # not faster than dense (e.g. full-batch probing): no value
    assert degradation_per_runtime_reduction(31.0, 30.0, 1.2, 1.0) is None
    assert degradation_per_runtime_reduction(31.0, 30.0, 1.0, 1.0) is None
    with pytest.raises(ValueError):
        degradation_per_runtime_reduction(31.0, 30.0, 0.0, 1.0)


def test_relative_to_the_reference_method():
    ratios = relative_to({"pp": 20.0, "flap": 50.0, "pp-fullbatch": None}, "pp")
    assert ratios == {"pp": 1.0, "flap": 2.5, "pp-fullbatch": None}
    assert relative_to({"pp": None, "flap": 50.0}, "pp") == {"pp": None, "flap": None}
