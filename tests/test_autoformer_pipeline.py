"""End to end: train a micro supernet, search, get killed, resume; re-evaluate the exported best subnet."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SEARCH = [sys.executable, str(ROOT / "experiments" / "autoformer_search.py")]
SMALL = ["--epochs", "1", "--batch-size", "128", "--evolution-population-size", "4", "--evolution-sample-size", "2"]


def _trials(run):
    path = run / "trials.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


@pytest.mark.slow
def test_search_killed_then_resumed_loses_and_repeats_nothing(tmp_path):
    run = tmp_path / "run"
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    proc = subprocess.Popen(SEARCH + ["--output", str(run), "--evolution-cycles", "10"] + SMALL,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env, start_new_session=True)
    deadline = time.time() + 300
    while len(_trials(run)) < 3 and proc.poll() is None and time.time() < deadline:
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGKILL)  # no clean shutdown at all
    proc.wait()
    before = _trials(run)
    assert 3 <= len(before) < 10
    supernet = json.loads((run / "run.json").read_text())["supernet"]
    stamp = Path(supernet).stat().st_mtime_ns

    out = subprocess.run(SEARCH + ["--output", str(run), "--resume", "--evolution-cycles", "10"] + SMALL,
                         capture_output=True, text=True, env=env, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    after = _trials(run)
    assert after[:len(before)] == before  # finished trials kept as they were
    assert len(after) == 10
    assert len({json.dumps(t["arch"], sort_keys=True) for t in after}) == 10  # none evaluated twice
    assert [t["trial"] for t in after] == list(range(1, 11))
    assert "training the" not in out.stdout and Path(supernet).stat().st_mtime_ns == stamp  # supernet reused

    best = json.loads((run / "best.json").read_text())
    assert best["top1"] == max(t["top1"] for t in after)
    for name in ("trials.csv", "trials.json", "best_subnet.safetensors", "best_subnet.json", "pareto.png",
                 "progress.png"):
        assert (run / name).stat().st_size > 0, name
    assert "best top-1" in out.stdout

    # the exported subnet is a plain module with copied weights: re-evaluating it gives the search's number
    from retia.experiments import autoformer_evaluate

    result = autoformer_evaluate.main(["--weights", str(run / "best_subnet.safetensors"), "--device", "cpu"])
    assert result["top1"] == pytest.approx(best["top1"], abs=1e-9)
    assert result["params"] == best["params"] and result["flops"] == best["flops"]


@pytest.mark.slow
def test_params_limits_hold_for_every_trial(tmp_path):
    from retia.experiments import autoformer_search

    top = autoformer_search.main(["--output", str(tmp_path / "r"), "--evolution-cycles", "6",
                                  "--min-params", "200k", "--max-params", "0.3M", "--device", "cpu"] + SMALL)
    trials = _trials(tmp_path / "r")
    assert len(trials) == 6 and all(200_000 <= t["params"] <= 300_000 for t in trials)
    assert 200_000 <= top["params"] <= 300_000


@pytest.mark.parametrize("argv, message", [
    (["--evolution-sample-size", "9", "--evolution-population-size", "4"], "sample size 9"),
    (["--resume", "--output", "/nonexistent/retia-run"], "no earlier run"),
    (["--datapath", "/nonexistent/data"], "does not exist"),
    (["--min-params", "1M", "--max-params", "10k"], "min 1e+06 > max 10000"),
    (["--weights", "/nonexistent/super.safetensors"], "does not exist"),
])
def test_bad_input_is_one_line_and_exit_2(argv, message, tmp_path, capsys):
    """In process, through the scripts' own ``run_main`` (the script's exit path is checked once below)."""
    from retia.cli import run_main
    from retia.experiments import autoformer_search

    if "--output" not in argv:
        argv = argv + ["--output", str(tmp_path / "r")]
    with pytest.raises(SystemExit) as exc:
        run_main(autoformer_search.main, argv + ["--epochs", "1"])
    assert exc.value.code == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last.startswith("error: ") and message in last
    assert not (tmp_path / "r").exists() or not any((tmp_path / "r").glob("trials*"))


def test_bad_input_from_the_script_is_one_line_and_exit_2(tmp_path):
    out = subprocess.run(SEARCH + ["--min-params", "1M", "--max-params", "10k", "--output", str(tmp_path / "r"),
                                   "--epochs", "1"], capture_output=True, text=True, timeout=300)
    assert out.returncode == 2
    last = out.stderr.strip().splitlines()[-1]
    assert last.startswith("error: ") and "min 1e+06 > max 10000" in last, out.stderr[-1500:]


@pytest.mark.slow
def test_port_mode_scores_inherited_subnets_in_trial_processes(tmp_path):
    """--port: NNI's manager runs each trial as a subprocess that loads its subnet from the supernet file; the
    scores equal slicing that file in this process."""
    import socket

    import torch

    from retia.data import DigitsDataModule
    from retia.evaluators.weight_sharing import accuracy
    from retia.spaces.autoformer import SUPERNET_KIND, AutoformerSpace
    from retia.weights import save_weights

    torch.manual_seed(0)
    config = AutoformerSpace.config("micro")
    weights = save_weights(AutoformerSpace.build_supernet(config).state_dict(), tmp_path / "super.safetensors",
                           {"kind": SUPERNET_KIND, "config": config})
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    run = tmp_path / "run"
    env = dict(os.environ, HOME=str(tmp_path))  # NNI's experiment manifest stays private to the test
    out = subprocess.run(SEARCH + ["--weights", str(weights), "--output", str(run), "--evolution-cycles", "2",
                                   "--port", str(port), "--device", "cpu"] + SMALL,
                         capture_output=True, text=True, env=env, timeout=500)
    assert out.returncode == 0, out.stderr[-2000:]
    trials = _trials(run)
    assert len(trials) == 2
    dm = DigitsDataModule(image_size=32)
    dm.setup()
    for t in trials:
        model = AutoformerSpace.load_subnet(t["arch"], weights=str(weights))
        assert accuracy(model, dm.val_dataloader())["top1"] == pytest.approx(t["top1"], abs=1e-9)
