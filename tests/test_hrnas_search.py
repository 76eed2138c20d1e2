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
    # the Lightning / DDP keys
    (["--devices", "0"], "train.devices 0 (--devices): expected an int >= 1 (processes) or 'auto' with "
                         "train.accelerator 'cpu'"),
    (["--config", str(CONFIGS / "cls_cpu.yml"), "train.devices=[0, 1]"], "train.devices [0, 1] (--devices): expected "
                                                                          "an int >= 1 (processes)"),
    (["--accelerator", "gpu", "--devices", "0,0"], "train.devices [0, 0] (--devices): expected an int >= 1, -1 (all), "
                                                   "'auto' or a list of distinct device indices"),
    (["--config", str(CONFIGS / "cls_cpu.yml"), "train.accelerator=gpu", "train.devices=true"],
     "train.devices True (--devices): expected"),
    (["--strategy", "ddp_spawn"], "train.strategy 'ddp_spawn' (--strategy): expected one of auto, ddp, "
                                  "ddp_find_unused_parameters_false, ddp_find_unused_parameters_true"),
    (["--config", str(CONFIGS / "cls_cpu.yml"), "train.strategy=fsdp"], "train.strategy 'fsdp' (--strategy)"),
    (["--num-nodes", "0"], "train.num_nodes 0 (--num-nodes): expected an int >= 1"),
    (["--config", str(CONFIGS / "cls_cpu.yml"), "train.num_nodes=two"], "train.num_nodes"),
    (["--sync-batchnorm"], "train.sync_batchnorm true with train.accelerator 'cpu': SyncBatchNorm runs on GPUs only"),
    (["--config", str(CONFIGS / "cls_cpu.yml"), "--sync-batchnorm"],
     "train.sync_batchnorm true with train.accelerator"),
    (["--precision", "fp8"], "train.precision 'fp8' (--precision): expected null (32-bit) or one of 64, 32, 16,"),
    (["--num-workers", "-1"], "data.num_workers -1 (--num-workers): expected an int >= 0"),
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


@pytest.mark.slow
def test_keypoint_search_shrinks_with_its_config(tmp_path, monkeypatch):
    """keypoint_cpu.yml's penalty really removes units (it used to remove none: ρ 5e-3 swamped the heatmap loss's
    ~1e-6 gradients on the BN scales and lr 5e-3 x 256 steps could not bring a scale from 1 to 0). Cut to ~50 s:
    32x24 inputs and 24 of the 32 batches per epoch at 4/3 of the config's rate (the same lr x steps a scale can
    travel), the config's ρ, threshold, interval and 8 epochs. Measured: 9.50M -> 6.10M MACs; the old lr 5e-3 and
    ρ 5e-3 cut the same way keep all 9.50M (16 batches at twice the rate: 8.40M, too few steps)."""
    if not hrnas_search.TASKS["keypoint"].available():
        pytest.skip("the keypoint task needs retia.data.keypoints / retia.evaluators.keypoints (pycocotools)")
    from retia.profile import count_flops
    from retia.spaces.hrnas import count_macs

    monkeypatch.setenv("RETIA_CACHE", str(tmp_path / "cache"))  # the synthetic people, written once
    config = CONFIGS / "keypoint_cpu.yml"
    lr = hrnas_search.parse_config(["--config", str(config)]).train.learning_rate
    argv = ["--config", str(config), "--model.input_size", "[32, 24]", "--train.limit_train_batches", "24",
            "--train.learning_rate", str(lr * 4 / 3), "--search.bn_recalibration_batches", "2"]
    out = tmp_path / "kp"
    summary = hrnas_search.main(argv + ["--output", str(out)])
    for name in ("arch.json", "best_model.json", "searched.safetensors", "trials.jsonl", "macs.png", "ap.png"):
        assert (out / name).is_file(), name
    assert not (out / "accuracy.png").exists() and not (out / "miou.png").exists()
    cfg, arch = summary["config"], summary["arch"]
    assert cfg["task"] == "keypoint" and cfg["num_classes"] == 17 and cfg["input_size"] == [32, 24]
    # units removed (a clear share), not all of them; closed form == FlopCounterMode on the saved network
    net, meta = _reload(out)
    assert meta["arch"] == arch and summary["macs"] == count_macs(cfg, arch) == count_flops(net, (1, 3, 32, 24))
    assert 0.2 * summary["supernet_macs"] < summary["macs"] < 0.8 * summary["supernet_macs"], summary["macs"]
    rows = [json.loads(line) for line in (out / "trials.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == list(range(-1, 8)) and all("ap" in r for r in rows)
    assert rows[-1]["shrunk"] and rows[-1]["macs"] == summary["macs"]
    # the AP of the searched network is a fresh COCOeval of the saved weights
    c = hrnas_search.parse_config(argv)
    _, _, datamodule, _ = hrnas_search.build_task(c, build_space=False)
    assert 100 * hrnas_search._keypoint_ap(net, datamodule) == pytest.approx(summary["ap"], abs=1e-9)


def test_ddp_keys_parse_and_reach_the_lightning_trainer(tmp_path):
    """train.devices / strategy / num_nodes / precision and data.num_workers from the flags and from a config (old
    flags as aliases, the bare --sync-batchnorm switch), and each task's evaluator builds its Trainer with them;
    num_nodes / sync_batchnorm go through the three evaluator helpers."""
    from pytorch_lightning.plugins.layer_sync import TorchSyncBatchNorm
    from pytorch_lightning.strategies import DDPStrategy, SingleDeviceStrategy

    from retia.evaluators.classification import classification_evaluator
    from retia.evaluators.segmentation import segmentation_evaluator

    default = hrnas_search.parse_config([])
    assert (default.train.devices, default.train.strategy, default.train.num_nodes, default.train.sync_batchnorm,
            default.train.precision, default.data.num_workers) == (1, "auto", 1, False, None, 0)
    flags = hrnas_search.parse_config(["--devices", "2", "--strategy", "ddp", "--num-nodes", "3", "--num-workers", "2",
                                       "--precision", "bf16-mixed"])
    hrnas_search.check_config(flags)
    assert hrnas_search._trainer_kwargs(flags) == {
        "accelerator": "cpu", "devices": 2, "strategy": "ddp", "num_nodes": 3, "sync_batchnorm": False,
        "precision": "bf16-mixed", "limit_train_batches": None}
    assert flags.data.num_workers == 2
    c = hrnas_search.parse_config(["--config", str(CONFIGS / "cls_cpu.yml"), "--devices", "2", "--sync-batchnorm",
                                   "train.accelerator=gpu", "train.strategy=ddp", "--num-workers=3",
                                   "train.precision=16-mixed"])
    hrnas_search.check_config(c)
    assert (c.train.devices, c.train.sync_batchnorm, c.data.num_workers, c.train.precision) == (2, True, 3, "16-mixed")
    assert hrnas_search.parse_config(["--config", str(CONFIGS / "cls_cpu.yml"),
                                      "--sync-batchnorm", "false"]).train.sync_batchnorm is False
    gpus = hrnas_search.parse_config(["--accelerator", "gpu", "--devices", "0,1"])
    hrnas_search.check_config(gpus)
    assert hrnas_search._trainer_kwargs(gpus)["devices"] == [0, 1]

    c = hrnas_search.parse_config(["--devices", "2", "--strategy", "ddp", "--num-workers", "1"])
    spec, cfg, dm, _ = hrnas_search.build_task(c, build_space=False)
    assert dm.num_workers == 1
    trainer = spec.evaluator(c, dm, cfg, tmp_path / "logs").trainer  # built, not run: nothing is launched
    assert isinstance(trainer.strategy, DDPStrategy) and trainer.num_devices == 2 and trainer.num_nodes == 1
    assert trainer.strategy._layer_sync is None
    one = hrnas_search.parse_config([])
    assert isinstance(spec.evaluator(one, dm, cfg, tmp_path / "logs").trainer.strategy, SingleDeviceStrategy)
    for make, kwargs in ((classification_evaluator, {"num_classes": 10}), (segmentation_evaluator, {"num_classes": 4})):
        ev = make(dm, max_epochs=1, log_dir=tmp_path / "logs", accelerator="cpu", devices=2, strategy="ddp",
                  num_nodes=2, sync_batchnorm=True, **kwargs)
        assert ev.trainer.num_nodes == 2 and isinstance(ev.trainer.strategy._layer_sync, TorchSyncBatchNorm)
    try:
        from retia.evaluators.keypoints import keypoint_evaluator
    except ImportError:  # the keypoint extra is not installed
        return
    ev = keypoint_evaluator(dm, max_epochs=1, log_dir=tmp_path / "logs", num_joints=17, accelerator="cpu", devices=2,
                            strategy="ddp", num_nodes=2, sync_batchnorm=True)
    assert ev.trainer.num_nodes == 2 and isinstance(ev.trainer.strategy._layer_sync, TorchSyncBatchNorm)


@pytest.mark.slow
def test_shrinking_search_under_ddp_on_two_cpu_processes(tmp_path):
    """experiments/hrnas_search.py with train.devices=2 train.strategy=ddp on the CPU (gloo; Lightning's launcher
    re-runs tests/ddp_hrnas_search.py for rank 1), 3 epochs of 2 steps, a shrink after every epoch (threshold 0.99),
    EMA and BN recalibration on: both ranks shrink to the same arch, their parameters are bit-identical at the end of
    every epoch — also after training through a rebuilt DDP wrapper — and their final networks (buffers included)
    too; after each shrink DDP wraps exactly the new parameters; the MACs went down and equal the closed form;
    the saved weights are the ranks' final ones; only rank 0 wrote files under the output directory."""
    import hashlib
    import os
    import subprocess

    from retia.spaces.hrnas import count_macs
    from retia.weights import load_weights

    out, ranks_dir = tmp_path / "run", tmp_path / "ranks"
    scratch = tmp_path / "tmp"  # the ranks' temporary folders
    scratch.mkdir()
    env = dict(os.environ, OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="", PYTHONWARNINGS="ignore", TMPDIR=str(scratch))
    for name in ("MASTER_PORT", "MASTER_ADDR", "RANK", "LOCAL_RANK", "NODE_RANK", "WORLD_SIZE", "SLURM_PROCID",
                 "SLURM_NTASKS", "SLURM_JOB_ID"):
        env.pop(name, None)
    cmd = [sys.executable, str(ROOT / "tests" / "ddp_hrnas_search.py"), "--ranks", str(ranks_dir),
           "--config", str(CONFIGS / "cls_cpu.yml"), "train.devices=2", "train.strategy=ddp", "train.accelerator=cpu",
           "train.epochs=3", "train.limit_train_batches=2", "train.warmup=0", "search.epoch_warmup=0",
           "search.threshold=0.99", "search.interval=1", "train.ema_decay=0.9", "search.bn_recalibration_batches=2",
           "threads=1", "--output", str(out)]
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=400, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    r0, r1 = (json.loads((ranks_dir / f"rank{r}.json").read_text()) for r in (0, 1))
    assert (r0["rank"], r1["rank"], r0["world_size"], r1["world_size"]) == (0, 1, 2, 2)
    assert r0["wrapper"] == r1["wrapper"] == "DistributedDataParallel"
    # same parameters on both ranks at the end of every epoch (before its shrink), changed by training
    assert [e["epoch"] for e in r0["epochs"]] == [e["epoch"] for e in r1["epochs"]] == [0, 1, 2]
    assert r0["initial_sha"] == r1["initial_sha"]
    for e0, e1 in zip(r0["epochs"], r1["epochs"]):
        assert e0["arch"] == e1["arch"] and e0["params_sha"] == e1["params_sha"] != r0["initial_sha"], e0["epoch"]
    # a shrink before the last epoch, so the ranks trained an epoch through the rebuilt wrapper (checked above)
    assert [s["epoch"] for s in r0["shrinks"]] == [s["epoch"] for s in r1["shrinks"]] and r0["shrinks"][0]["epoch"] < 2
    first = r0["shrinks"][0]["epoch"]
    assert r0["epochs"][first + 1]["arch"] == r0["shrinks"][0]["arch"]  # the next epoch trained the shrunk network
    for s0, s1 in zip(r0["shrinks"], r1["shrinks"]):
        assert s0["arch"] == s1["arch"]
        for s in (s0, s1):  # the DDP wrapper after a shrink: new, around the module, exactly the new parameters
            assert s["ddp"] and s["new_wrapper"] and s["wraps_module"] and s["wrapped_are_module_params"]
            assert s["reducer_params"] and s["net_params_wrapped"] and not s["old_params_wrapped"]
            assert s["wrapped_numel"] == s["net_numel"]
    # the final networks: one arch, bit-identical state (parameters and buffers), fewer MACs = the closed form
    f0, f1 = r0["final"], r1["final"]
    assert f0["arch"] == f1["arch"] and f0["state_sha"] == f1["state_sha"] and f0["params_sha"] == f1["params_sha"]
    assert f0["recalibrated"] == f1["recalibrated"] == 2
    summary = json.loads((out / "arch.json").read_text())
    cfg = summary["config"]
    assert summary["arch"] == f0["arch"] == r1["summary"]["arch"]
    assert summary["macs"] == f0["macs"] == count_macs(cfg, f0["arch"]) < summary["supernet_macs"] == count_macs(cfg)
    assert r0["shrinks"][0]["macs"] < summary["supernet_macs"]
    assert 0 <= summary["top1"] <= 100 and r1["summary"]["top1"] is None  # measured once, by rank 0
    h = hashlib.sha256()  # the saved weights are the ranks' final network
    for name, tensor in sorted(load_weights(out / "searched.safetensors").items()):
        h.update(name.encode())
        h.update(tensor.contiguous().numpy().tobytes())
    assert h.hexdigest() == f0["state_sha"]
    # files: rank 0 wrote the run, rank 1 nothing under the output directory; one row per epoch, written once
    assert r1["writes"] == []
    assert {"config.yaml", "trials.jsonl", "arch.json", "best_model.json", "tokens.json", "searched.json",
            "macs.png", "accuracy.png"} <= set(r0["writes"])
    rows = [json.loads(line) for line in (out / "trials.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [-1, 0, 1, 2] and rows[-1]["macs"] == summary["macs"]
    assert len([p for p in (out / "nni").iterdir() if p.is_dir()]) == 1  # rank 0's NNI experiment only
    # rank 1 kept NNI's bookkeeping in a scratch folder, and removed it
    assert r0["scratch"] == [] and len(r1["scratch"]) == 1 and r1["scratch"][0].startswith(str(scratch))
    assert not list(scratch.glob("retia-hrnas-nni-*"))


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
        (["--arch", str(tmp_path / "bad.json"), "--train.devices", "2"],
         "train.devices 2, train.num_nodes 1: hrnas_retrain.py runs in one process; expected 1 and 1"),
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
