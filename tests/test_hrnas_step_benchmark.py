"""benchmarks/hrnas_step.py: a searched arch.json is timed against its config's supernet, both MACs figures (the
closed form and torch's FlopCounterMode) agree, and its bad inputs are one-line errors. (The ``--original`` run
needs a checkout of dingmyu/HR-NAS, which is not part of retia; its input check and a broken stand-in checkout are
tested here.)"""
from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import pytest

from retia.errors import RetiaError

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("hrnas_step", ROOT / "benchmarks" / "hrnas_step.py")
hrnas_step = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(hrnas_step)


def _searched_arch_json(tmp_path: Path) -> Path:
    """An arch.json as a search writes it: the tiny preset with whole kernel branches and transformers removed."""
    from retia.spaces import hrnas

    cfg = hrnas.preset("tiny")
    arch = hrnas.full_arch(cfg)
    for i, key in enumerate(sorted(arch)):
        if key.endswith(".tokens") or (key.endswith(".k7") and i % 2):
            arch[key] = 0
        elif key.endswith(".k5"):
            arch[key] //= 2
    path = tmp_path / "arch.json"
    path.write_text(json.dumps({"arch": arch, "config": cfg}))
    return path


def test_searched_arch_is_timed_against_its_supernet(tmp_path):
    from retia.spaces import hrnas

    path = _searched_arch_json(tmp_path)
    out = tmp_path / "step.json"
    summary = hrnas_step.main(["--arch", str(path), "--steps", "1", "--warmup", "0", "--threads", "1",
                               "--json", str(out)])
    res = summary["results"]["fast"]
    data = json.loads(path.read_text())
    assert res["subnet"]["macs"] == hrnas.count_macs(data["config"], data["arch"])
    assert res["supernet"]["macs"] == hrnas.count_macs(data["config"])
    for which in ("supernet", "subnet"):
        run = res[which]["runs"][0]
        assert run["counted_macs"] == run["macs"]  # FlopCounterMode on the built network == closed form
        assert run["wall_s"] > 0 and math.isfinite(run["loss"])
    assert res["ratios"]["macs"] == pytest.approx(res["subnet"]["macs"] / res["supernet"]["macs"])
    assert 0 < res["ratios"]["macs"] < 1
    assert json.loads(out.read_text())["arch"] == str(path)


@pytest.mark.parametrize("argv, words", [
    (["--original", "{tmp}"], ["--original", "dingmyu/HR-NAS", "models/hrnet.py"]),
    (["--arch", "{tmp}/missing.json"], ["--arch", "missing.json", "arch.json"]),
    (["--keep", "1.5"], ["--keep 1.5", "fraction"]),
])
def test_bad_inputs_are_one_line_errors(argv, words, tmp_path):
    argv = [a.replace("{tmp}", str(tmp_path)) for a in argv]
    with pytest.raises(RetiaError) as err:
        hrnas_step.main(argv)
    assert "\n" not in str(err.value)
    for w in words:
        assert w in str(err.value)


def _write(tmp_path: Path, data) -> str:
    path = tmp_path / "arch.json"
    path.write_text(json.dumps(data))
    return str(path)


@pytest.mark.parametrize("make, extra, words", [
    (lambda cfg, arch: {"s0_b0_0.k3": 4}, [], ["expected a search's arch.json with 'config' and 'arch'"]),
    (lambda cfg, arch: {"config": cfg, "arch": [1, 2]}, [], ["'config' and 'arch' to be JSON objects"]),
    (lambda cfg, arch: {"config": cfg, "arch": {**arch, "nope.k3": 1}}, [], ["unknown key 'nope.k3'"]),
    (lambda cfg, arch: {"config": {**cfg, "task": "segmentation"}, "arch": arch}, [],
     ["expected a classification network", "'segmentation'"]),
    (lambda cfg, arch: {"config": cfg, "arch": arch}, ["--original", "{repo}"], ["8x8 tokens", "has 4", "--no-tokens"]),
    (lambda cfg, arch: {"config": {**cfg, "active_fn": "hswish"}, "arch": arch}, ["--original", "{repo}", "--no-tokens"],
     ["active_fn 'hswish'", "relu or relu6"]),
])
def test_bad_arch_files_fail_before_any_measurement(make, extra, words, tmp_path):
    from retia.spaces import hrnas

    cfg = hrnas.preset("tiny")  # token_size 4
    repo = tmp_path / "HR-NAS"
    (repo / "models").mkdir(parents=True)
    (repo / "models" / "hrnet.py").write_text("")
    argv = ["--arch", _write(tmp_path, make(cfg, hrnas.full_arch(cfg)))] + [a.replace("{repo}", str(repo))
                                                                            for a in extra]
    with pytest.raises(RetiaError) as err:
        hrnas_step.main(argv)
    assert "\n" not in str(err.value)
    for w in words:
        assert w in str(err.value)


def test_a_broken_original_checkout_fails_in_one_line(tmp_path):
    import argparse

    repo = tmp_path / "HR-NAS"
    (repo / "models").mkdir(parents=True)
    (repo / "models" / "__init__.py").write_text("")
    (repo / "models" / "hrnet.py").write_text("raise ImportError('this checkout needs torch 1.4')\n")
    args = argparse.Namespace(preset="tiny", batch_size=2, steps=1, warmup=0, keep=0.5, optimizer="fused",
                              memory_format="auto", seed=0, profile=0, no_tokens=True, original=repo, arch=None,
                              threads=1)
    with pytest.raises(SystemExit) as info:
        hrnas_step.run_child(args, "original", "fast")
    message = str(info.value)
    assert "\n" not in message
    assert message == ("the original measurement failed (exit status 1): ImportError: this checkout needs torch 1.4")
