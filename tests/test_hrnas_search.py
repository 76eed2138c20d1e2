"""experiments/hrnas_search.py per task (segmentation end to end, classification unchanged), its config errors, and
experiments/hrnas_retrain.py (arch loading, errors, a one-epoch retrain)."""
from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest
import torch

from retia.errors import RetiaError

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "experiments" / "configs" / "hrnas"
sys.path.insert(0, str(ROOT / "experiments"))

import hrnas_retrain  # noqa: E402
import hrnas_search  # noqa: E402

torch.set_num_threads(1)

# a few seconds: 32x32 inputs, 2 epochs of 2 batches of 8; threshold 0.99 removes units after so few steps
SEG_FAST = ["--config", str(CONFIGS / "seg_cpu.yml"), "--train.epochs", "2", "--train.limit_train_batches", "2",
            "--model.input_size", "32", "--data.batch_size", "8", "--search.threshold", "0.99",
            "--search.interval", "1", "--search.bn_recalibration_batches", "2"]


def _reload(out: Path):
    """The saved searched / retrained network, rebuilt from its sidecar."""
    from retia.spaces.hrnas import HRNet
    from retia.weights import load_meta, load_weights

    path = next(p for p in (out / "searched.safetensors", out / "retrained.safetensors") if p.exists())
    meta = load_meta(path)
    net = HRNet(meta["config"], meta["arch"])
    net.load_state_dict(load_weights(path))
    return net.eval(), meta


@pytest.mark.slow
def test_segmentation_search_end_to_end(tmp_path):
    from retia.profile import count_flops
    from retia.spaces.hrnas import count_macs

    out = tmp_path / "seg"
    summary = hrnas_search.main(SEG_FAST + ["--ema-decay", "0.9", "--output", str(out)])
    for name in ("arch.json", "best_model.json", "tokens.json", "searched.safetensors", "searched.json",
                 "trials.jsonl", "trials.csv", "trials.json", "macs.png", "miou.png", "config.yaml"):
        assert (out / name).is_file(), name
    assert not (out / "accuracy.png").exists()
    cfg, arch = summary["config"], summary["arch"]
    assert cfg["task"] == "segmentation" and cfg["num_classes"] == 4 and cfg["input_size"] == 32
    # MACs bookkeeping: closed form of the searched arch == FlopCounterMode on the saved network < supernet
    net, meta = _reload(out)
    assert meta["arch"] == arch and meta["kind"] == hrnas_search.SUBNET_KIND
    assert summary["macs"] == count_macs(cfg, arch) == count_flops(net, (1, 3, 32, 32))
    assert summary["macs"] < summary["supernet_macs"] == count_macs(cfg)
    # mIoU: a real number in [0, 100] %, measured on the shrunk (EMA, recalibrated) network that was saved
    miou = summary["miou"]
    assert isinstance(miou, float) and not math.isnan(miou) and 0.0 <= miou <= 100.0
    c = hrnas_search.parse_config(SEG_FAST)
    _, _, datamodule, _ = hrnas_search.build_task(c, build_space=False)
    assert hrnas_search._miou(net, datamodule) * 100 == pytest.approx(miou, abs=1e-9)
    assert summary["ema_decay"] == 0.9 and summary["bn_recalibration_batches"] == 2
    # one trials row per epoch with the task's metric
    rows = [json.loads(line) for line in (out / "trials.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [-1, 0, 1] and all("miou" in r and "top1" not in r for r in rows)
    assert rows[-1]["macs"] == summary["macs"] and rows[-1]["shrunk"]
    assert 0 <= rows[-1]["miou"] <= 100 and rows[-1]["miou"] == pytest.approx(summary["miou_before_last_shrink"])
    assert json.loads((out / "arch.json").read_text())["metric"] == "miou"


@pytest.mark.slow
def test_classification_search_keeps_its_files_and_columns(tmp_path):
    from retia.spaces.hrnas import count_macs

    out = tmp_path / "cls"
    summary = hrnas_search.main(["--epochs", "1", "--limit-train-batches", "2", "--threshold", "0.99", "--warmup", "0",
                                 "--epoch-warmup", "0",
                                 "--bn-recalibration-batches", "0", "--output", str(out)])
    assert (out / "accuracy.png").is_file() and not (out / "miou.png").exists()
    assert {"top1", "top1_before_last_shrink"} <= set(summary) and 0 <= summary["top1"] <= 100
    rows = [json.loads(line) for line in (out / "trials.jsonl").read_text().splitlines()]
    assert all("top1" in r for r in rows) and summary["bn_recalibration_batches"] == 0
    net, _ = _reload(out)
    assert summary["macs"] == count_macs(summary["config"], summary["arch"]) < summary["supernet_macs"]
    c = hrnas_search.parse_config(["--output", str(out)])
    _, _, datamodule, _ = hrnas_search.build_task(c, build_space=False)
    assert 100 * hrnas_search._top1(net, datamodule) == pytest.approx(summary["top1"])


@pytest.mark.parametrize("argv, words", [
    (["--config", str(CONFIGS / "seg_cpu.yml"), "--model.input_size", "[32, 64]"],
     "model.input_size [32, 64]: the embedded synthetic shapes are square"),
    (["--ema-decay", "1.5"], "train.ema_decay 1.5 (--ema-decay): expected 0 (off) or a number in (0, 1)"),
    (["--bn-recalibration-batches", "-1"], "search.bn_recalibration_batches -1: expected >= 0"),
    (["--config", str(CONFIGS / "cls_cpu.yml"), "model.preset=seg_cityscapes"],
     "task 'classification' but model.preset 'seg_cityscapes' is a segmentation network"),
    (["--config", str(CONFIGS / "seg_cpu.yml"), "data.path=/nonexistent/cityscapes"], "/nonexistent/cityscapes"),
])
def test_search_config_errors_are_one_line(argv, words, capsys, tmp_path):
    from retia.cli import run_main

    with pytest.raises(SystemExit) as ex:
        run_main(hrnas_search.main, argv + ["--output", str(tmp_path / "never")])
    assert ex.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and err.startswith("error: ") and words in err, err
    assert not (tmp_path / "never").exists()


def test_task_table_and_keypoint_availability():
    assert {n: (s.metric, s.monitor, s.plot) for n, s in hrnas_search.TASKS.items()} == {
        "classification": ("top1", "val_top1", "accuracy.png"), "segmentation": ("miou", "val_miou", "miou.png"),
        "keypoint": ("ap", "val_ap", "ap.png")}
    c = hrnas_search.parse_config(["--config", str(CONFIGS / "keypoint_cpu.yml")])
    if hrnas_search.TASKS["keypoint"].available():
        hrnas_search.check_config(c)
    else:
        with pytest.raises(RetiaError, match="^task 'keypoint' is not available yet "
                                             r"\(available: classification, segmentation\)$"):
            hrnas_search.check_config(c)


# ---------------------------------------------------------------------------------------------------------------
# retrain
# ---------------------------------------------------------------------------------------------------------------
def _cfg():
    from retia.spaces import hrnas

    return hrnas.preset("tiny")


def _half_arch(cfg):
    from retia.spaces import hrnas

    return {k: v // 2 for k, v in hrnas.full_arch(cfg).items()}


def test_retrain_loads_arch_json_plain_dict_and_best_model(tmp_path):
    from retia.spaces import hrnas

    cfg, arch = _cfg(), _half_arch(_cfg())
    (tmp_path / "arch.json").write_text(json.dumps({"arch": arch, "config": cfg, "macs": 1}))
    (tmp_path / "plain.json").write_text(json.dumps(arch))
    assert hrnas_retrain.load_arch(cfg, tmp_path / "arch.json") == arch
    assert hrnas_retrain.load_arch(cfg, tmp_path / "plain.json") == arch
    bm = tmp_path / "bm"
    bm.mkdir()
    (bm / "best_model.json").write_text(json.dumps(hrnas.to_best_model(cfg, arch)))
    full_tokens = dict(arch, **{k: cfg["max_tokens"] for k in arch if k.endswith(".tokens")})
    assert hrnas_retrain.load_arch(cfg, best_model=bm / "best_model.json") == full_tokens  # no tokens.json
    (bm / "tokens.json").write_text(json.dumps(hrnas.tokens_list(cfg, arch)))
    assert hrnas_retrain.load_arch(cfg, best_model=bm / "best_model.json") == arch  # the one beside it


def test_retrain_input_errors_are_one_line(tmp_path, capsys):
    from retia.cli import run_main

    cfg, arch = _cfg(), _half_arch(_cfg())
    bad = dict(arch)
    bad[next(iter(bad))] = 999
    (tmp_path / "bad.json").write_text(json.dumps(bad))
    (tmp_path / "wide.json").write_text(json.dumps({"arch": arch, "config": dict(cfg, width_mult=1.0)}))
    (tmp_path / "broken.json").write_text("{not json")
    run = tmp_path / "run"
    run.mkdir()
    (run / "arch.json").write_text(json.dumps({"arch": arch, "config": cfg}))
    cases = [
        (["--run", str(tmp_path / "nowhere")], "the directory does not exist; expected a search run directory"),
        (["--run", str(run)], "no config.yaml; expected a search run directory"),
        ([], "expected an arch: --run DIR, --arch arch.json or --best-model best_model.json"),
        (["--arch", str(tmp_path / "missing.json")], "arch file"),
        (["--arch", str(tmp_path / "broken.json")], "not JSON"),
        (["--arch", str(tmp_path / "bad.json")], "=999: expected an int in [0, "),
        (["--arch", str(tmp_path / "wide.json")], "searched with network width_mult=1.0, the config gives 0.5"),
        (["--arch", str(tmp_path / "bad.json"), "--best-model", str(tmp_path / "bad.json")],
         "--arch and --best-model: expected one of them"),
        (["--best-model", str(tmp_path / "bad.json")], "best_model"),
    ]
    for argv, words in cases:
        with pytest.raises(SystemExit) as ex:
            run_main(hrnas_retrain.main, argv + ["--output", str(tmp_path / "out")])
        assert ex.value.code == 2
        err = capsys.readouterr().err.strip()
        assert err.count("\n") == 0 and err.startswith("error: ") and words in err, (argv, err)
    assert "does not fit the config" in _err_of(["--arch", str(tmp_path / "bad.json")], tmp_path, capsys)


def _err_of(argv, tmp_path, capsys):
    from retia.cli import run_main

    with pytest.raises(SystemExit):
        run_main(hrnas_retrain.main, argv + ["--output", str(tmp_path / "out")])
    return capsys.readouterr().err


@pytest.mark.slow
def test_retrain_a_search_run_end_to_end(tmp_path):
    """A search run directory (config.yaml + arch.json as the search writes them) retrained from scratch for one
    epoch: fresh weights, files written, the metric measured on the saved network."""
    from retia.config import to_yaml
    from retia.profile import count_flops
    from retia.spaces.hrnas import count_macs

    run = tmp_path / "run"
    run.mkdir()
    c = hrnas_search.parse_config(["--output", str(run), "--limit-train-batches", "2"])
    (run / "config.yaml").write_text(to_yaml(c))
    cfg, arch = _cfg(), _half_arch(_cfg())
    (run / "arch.json").write_text(json.dumps({"arch": arch, "config": cfg}))
    summary = hrnas_retrain.main(["--run", str(run), "--epochs", "1"])
    out = run / "retrain"
    for name in ("retrained.safetensors", "retrained.json", "retrain.json", "trials.jsonl", "trials.csv",
                 "accuracy.png", "config.yaml"):
        assert (out / name).is_file(), name
    assert summary["arch"] == arch and summary["epochs"] == 1 and summary["source"] == {"arch": str(run / "arch.json")}
    net, meta = _reload(out)
    assert meta["kind"] == hrnas_retrain.RETRAINED_KIND
    assert summary["macs"] == count_macs(cfg, arch) == count_flops(net, (1, 3, 32, 32))
    rows = [json.loads(line) for line in (out / "trials.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [0] and 0 <= rows[0]["top1"] <= 100 and rows[0]["train_loss"] > 0
    _, _, datamodule, _ = hrnas_search.build_task(c, build_space=False)
    assert 100 * hrnas_search._top1(net, datamodule) == pytest.approx(summary["top1"])
    assert summary["top1"] == pytest.approx(rows[0]["top1"])  # no EMA: the last validation is the final network


def _write_tree(root: Path, dataset: str) -> Path:
    """A small Cityscapes / ADE20K folder tree (random 48x96 images, striped labels) in the real layout."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)

    def png(path, array):
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(array).save(path)

    ids = [7, 8, 11, 26, 0] if dataset == "cityscapes" else [1, 2, 150, 0, 3]
    label = np.repeat(np.array(ids, dtype=np.uint8), 20)[:96][None].repeat(48, 0)
    for split, n in (("train", 4), ("val", 2)):
        for i in range(n):
            image = rng.integers(0, 256, (48, 96, 3), dtype=np.uint8)
            if dataset == "cityscapes":
                stem = f"city_{i:06d}_000019"
                png(root / "leftImg8bit" / split / "city" / f"{stem}_leftImg8bit.png", image)
                png(root / "gtFine" / split / "city" / f"{stem}_gtFine_labelIds.png", label)
            else:
                sp = {"train": "training", "val": "validation"}[split]
                png(root / "images" / sp / f"ADE_{i:08d}.jpg", image)
                png(root / "annotations" / sp / f"ADE_{i:08d}.png", label)
    return root


@pytest.mark.slow
@pytest.mark.parametrize("dataset, config, classes", [("cityscapes", "seg_cityscapes.yml", 19),
                                                      ("ade20k", "seg_ade20k.yml", 150)])
def test_segmentation_search_on_a_dataset_folder(dataset, config, classes, tmp_path, monkeypatch):
    """The full-size configs with data.path = a folder in the dataset's layout (scaled down to `tiny`, one epoch):
    the classes come from the data, validation runs on the full-size images, the metric is mIoU."""
    root = _write_tree(tmp_path / dataset, dataset)
    monkeypatch.setenv("RETIA_DATA", str(tmp_path / "unused"))
    out = tmp_path / "run"
    summary = hrnas_search.main([
        "--config", str(CONFIGS / config), f"data.path={root}", "model.preset=tiny", "model.input_size=[32,64]",
        "model.last_channel=null", "data.batch_size=2", "train.epochs=1", "train.accelerator=cpu", "threads=1",
        "search.threshold=0.99", "search.bn_recalibration_batches=2", "train.ema_decay=0", "--output", str(out)])
    assert summary["config"]["num_classes"] == classes and summary["config"]["input_size"] == [32, 64]
    assert 0.0 <= summary["miou"] <= 100.0 and (out / "miou.png").is_file()
    assert summary["macs"] < summary["supernet_macs"]
