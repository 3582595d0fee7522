"""Ray Tune sweeps over DPOConfig fields: the search space's YAML form. A sweep itself, its report and its
MLflow runs: tests/test_many_runs.py, among the session's back-to-back runs."""

import pytest

from raydpo.tune import search_space_from_dict


def test_search_space_from_yaml_form():
    space = search_space_from_dict({"beta": {"grid_search": [0.1, 0.5]}, "learning_rate": {"loguniform": [1e-6, 1e-4]},
                                    "loss_type": {"choice": ["sigmoid", ["sigmoid"]]}, "seed": 3})
    assert space["beta"] == {"grid_search": [0.1, 0.5]}
    assert 1e-6 <= space["learning_rate"].sample() <= 1e-4
    assert space["seed"] == 3
    with pytest.raises(ValueError, match="betta"):
        search_space_from_dict({"betta": {"grid_search": [0.1]}})
    with pytest.raises(ValueError, match="search_space.beta"):
        search_space_from_dict({"beta": {"grid_search": [0.1], "choice": [1]}})


# A 4-trial ASHA sweep, its report, MLflow runs and `raydpo report`: test_many_runs.test_sweep_runs_trials_and_reports
