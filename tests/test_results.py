"""Run-directory files, Pareto front, plots."""
import csv
import itertools
import json
import random

import pytest

from retia.errors import RetiaError
from retia.results import RunDir, arch_key, pareto_front


def brute_force_front(points):
    def dominated(i):
        return any(points[j][0] <= points[i][0] and points[j][1] >= points[i][1] and points[j] != points[i]
                   for j in range(len(points)))
    return {i for i in range(len(points)) if not dominated(i)}


def test_pareto_front_matches_brute_force():
    rng = random.Random(0)
    for _ in range(50):
        points = [(rng.randint(0, 20), rng.randint(0, 20)) for _ in range(rng.randint(1, 30))]
        front = pareto_front(points)
        # ties: the brute force keeps duplicates of a front point; the front keeps one of them
        assert {points[i] for i in front} == {points[i] for i in brute_force_front(points)}
        assert [points[i][0] for i in front] == sorted(points[i][0] for i in front)


def test_pareto_front_hand_example():
    assert pareto_front([(1, 0.5), (2, 0.4), (2, 0.7), (3, 0.7), (0.5, 0.1)]) == [4, 0, 2]
    assert pareto_front([(1, 5), (2, 3)], maximize_y=False) == [0, 1]


def test_trials_are_appended_and_tabulated(tmp_path):
    run = RunDir(tmp_path / "r")
    for i in range(3):
        run.log_trial({"trial": i + 1, "arch": {"depth": i}, "params": 10 * i, "top1": 50.0 + i})
    assert [t["trial"] for t in run.trials()] == [1, 2, 3]
    assert json.loads((run.path / "trials.json").read_text())[2]["arch"] == {"depth": 2}
    rows = list(csv.DictReader((run.path / "trials.csv").open()))
    assert rows[1]["top1"] == "51.0" and json.loads(rows[1]["arch"]) == {"depth": 1}
    assert run.best("top1")["trial"] == 3
    # resuming keeps the trials, a new run starts empty
    assert len(RunDir(tmp_path / "r", resume=True).trials()) == 3
    assert RunDir(tmp_path / "r").trials() == []


def test_resume_of_an_empty_directory_is_an_error(tmp_path):
    with pytest.raises(RetiaError, match="no earlier run"):
        RunDir(tmp_path / "nothing", resume=True)


def test_plots_are_png_files(tmp_path):
    run = RunDir(tmp_path)
    for i, (p, a) in enumerate(itertools.product([1e5, 2e5], [80.0, 90.0])):
        run.log_trial({"trial": i, "arch": {}, "params": p + i, "top1": a - i})
    for path in (run.plot_pareto("params", "top1", x_scale=1e6), run.plot_progress("top1")):
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_arch_key_ignores_order():
    assert arch_key({"a": 1, "b": 2.0}) == arch_key({"b": 2.0, "a": 1})
