"""retia.config: includes, defaults, env variables, dotted and command-line overrides, one-line errors; the shipped
HR-NAS configs all load and validate against experiments/hrnas_search.py's schema."""
from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import pytest

from retia.config import load_config, parse_overrides, to_dict
from retia.errors import RetiaError

ROOT = Path(__file__).resolve().parents[1]
HRNAS_CONFIGS = ROOT / "experiments" / "configs" / "hrnas"
sys.path.insert(0, str(ROOT / "experiments"))


@dataclass
class Train:
    epochs: int = 8
    lr: float = 0.01
    optimizer: str = "adamw"


@dataclass
class Schema:
    train: Train = field(default_factory=Train)
    path: Optional[str] = None
    size: Any = None
    name: str = "x"


def write(tmp_path: Path, name: str, text: str) -> Path:
    p = tmp_path / name
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(text)
    return p


def test_defaults_come_from_the_schema(tmp_path):
    cfg = load_config(write(tmp_path, "a.yml", "train: {lr: 0.5}\n"), schema=Schema)
    assert to_dict(cfg) == {"train": {"epochs": 8, "lr": 0.5, "optimizer": "adamw"}, "path": None, "size": None,
                            "name": "x"}


def test_include_and_override_precedence(tmp_path):
    # schema default < grandparent < parent < the file's nested keys < its dotted keys < command line
    write(tmp_path, "base/grand.yml", "train: {epochs: 1, lr: 0.1, optimizer: sgd}\nname: grand\n")
    write(tmp_path, "base/parent.yml", "include: grand.yml\ntrain: {epochs: 2}\npath: parent\n")  # relative to itself
    child = write(tmp_path, "exp/child.yml",
                  "include: [../base/parent.yml]\ntrain.lr: 0.3\ntrain: {lr: 0.2, epochs: 3}\n")
    cfg = load_config(child, schema=Schema)
    assert cfg.train.epochs == 3          # the file's nested key beats the include
    assert cfg.train.lr == 0.3            # the dotted key beats the nested one, whatever the order in the file
    assert cfg.train.optimizer == "sgd"   # partial override: the rest of `train` comes from the grandparent
    assert cfg.path == "parent" and cfg.name == "grand"
    cfg = load_config(child, ["--train.lr", "1e-3", "train.epochs=4", "--name=cli"], schema=Schema)
    assert (cfg.train.lr, cfg.train.epochs, cfg.name, cfg.train.optimizer) == (0.001, 4, "cli", "sgd")
    # a later include beats an earlier one
    write(tmp_path, "exp/other.yml", "train: {optimizer: adam}\n")
    two = write(tmp_path, "exp/two.yml", "include: [../base/parent.yml, other.yml]\n")
    assert load_config(two, schema=Schema).train.optimizer == "adam"


def test_include_tag_for_one_value(tmp_path):
    write(tmp_path, "train.yml", "epochs: 5\nlr: 0.25\n")
    cfg = load_config(write(tmp_path, "a.yml", "train: !include train.yml\n"), schema=Schema)
    assert (cfg.train.epochs, cfg.train.lr) == (5, 0.25)


def test_env_variables_with_and_without_default(tmp_path, monkeypatch):
    monkeypatch.setenv("RETIA_TEST_ROOT", "/srv/data")
    monkeypatch.setenv("RETIA_TEST_EPOCHS", "12")
    monkeypatch.delenv("RETIA_TEST_UNSET", raising=False)
    text = ("path: ${RETIA_TEST_ROOT}/imagenet\n"
            "name: ${RETIA_TEST_UNSET:-fallback}\n"
            "size: ${oc.env:RETIA_TEST_UNSET,64}\n"
            "train: {epochs: '${oc.env:RETIA_TEST_EPOCHS}', optimizer: '${oc.env:RETIA_TEST_UNSET,adamw2}'}\n")
    cfg = load_config(write(tmp_path, "env.yml", text), schema=Schema)
    assert cfg.path == "/srv/data/imagenet"
    assert cfg.name == "fallback"
    assert cfg.train.epochs == 12 and isinstance(cfg.train.epochs, int)  # converted to the schema's type
    assert cfg.train.optimizer == "adamw2"
    assert cfg.size == "64"

    for text, var in (("path: ${RETIA_TEST_UNSET}/x\n", "RETIA_TEST_UNSET"),
                      ("path: ${oc.env:RETIA_TEST_UNSET}\n", "RETIA_TEST_UNSET")):
        with pytest.raises(RetiaError) as err:
            load_config(write(tmp_path, "bad_env.yml", text), schema=Schema)
        msg = str(err.value)
        assert "\n" not in msg and var in msg and "path" in msg and "not set" in msg and "default" in msg


def test_dotted_overrides_in_file_and_command_line(tmp_path):
    p = write(tmp_path, "d.yml", "train.epochs: 3\n'train.lr': 0.5\n")
    cfg = load_config(p, schema=Schema)
    assert (cfg.train.epochs, cfg.train.lr, cfg.train.optimizer) == (3, 0.5, "adamw")
    assert parse_overrides(["--train.epochs", "2", "--size=[64, 128]", "path=null", "--train.lr", "-1e-3"]) == [
        ("train.epochs", 2), ("size", [64, 128]), ("path", None), ("train.lr", -0.001)]
    assert parse_overrides(["--learning-rate", "0.1"], aliases={"learning_rate": "train.lr"}) == [("train.lr", 0.1)]
    cfg = load_config(p, ["--size", "[64, 128]"], schema=Schema)
    assert list(cfg.size) == [64, 128]


@pytest.mark.parametrize("text, overrides, words", [
    ("train: {epoch: 3}\n", [], ["unknown key 'train.epoch'", "epochs, lr, optimizer", "d.yml"]),
    ("bogus: 1\n", [], ["unknown key 'bogus'", "train, path, size, name"]),
    ("train.epoch: 3\n", [], ["unknown key 'train.epoch'"]),
    ("", ["--train.foo", "1"], ["command line", "unknown key 'train.foo'"]),
    ("", ["--train.epochs", "many"], ["command line", "train.epochs", "'many'", "Integer"]),
    ("", ["train=3"], ["command line", "train", "expected a mapping"]),
    ("", ["--train.epochs"], ["--train.epochs", "expected a value"]),
    ("", ["oops"], ["'oops'", "expected an override"]),
])
def test_errors_name_the_key_and_what_was_expected(tmp_path, text, overrides, words):
    with pytest.raises(RetiaError) as err:
        load_config(write(tmp_path, "d.yml", text), overrides, schema=Schema)
    msg = str(err.value)
    assert "\n" not in msg
    for w in words:
        assert w in msg, (w, msg)


def test_file_errors_are_one_line(tmp_path):
    cases = [
        (write(tmp_path, "inc.yml", "include: missing/base.yml\n"), ["inc.yml", "missing/base.yml", "does not exist"]),
        (write(tmp_path, "tag.yml", "train: !include nope.yml\n"), ["tag.yml", "nope.yml", "does not exist"]),
        (write(tmp_path, "syntax.yml", "train:\n  epochs: 3\n lr: [1, 2\n"), ["syntax.yml", "YAML syntax error",
                                                                            "line"]),
        (write(tmp_path, "list.yml", "- 1\n- 2\n"), ["list.yml", "expected a mapping"]),
        (write(tmp_path, "cyc_a.yml", "include: cyc_b.yml\n"), ["include cycle", "cyc_a.yml -> cyc_b.yml -> cyc_a.yml"]),
        (tmp_path / "absent.yml", ["absent.yml", "does not exist"]),
    ]
    write(tmp_path, "cyc_b.yml", "include: cyc_a.yml\n")
    for path, words in cases:
        with pytest.raises(RetiaError) as err:
            load_config(path, schema=Schema)
        msg = str(err.value)
        assert "\n" not in msg
        for w in words:
            assert w in msg, (w, msg)


# ---------------------------------------------------------------------------------------------------------------
# the shipped HR-NAS configs and the entry point
# ---------------------------------------------------------------------------------------------------------------
SHIPPED = ["cls_imagenet", "seg_cityscapes", "seg_ade20k", "keypoint_coco", "cls_cpu", "seg_cpu", "keypoint_cpu"]


def test_every_config_is_shipped():
    assert sorted(p.stem for p in HRNAS_CONFIGS.glob("*.yml")) == sorted(SHIPPED)


@pytest.mark.parametrize("name", SHIPPED)
def test_shipped_configs_load_validate_and_build(name, monkeypatch):
    import hrnas_search

    from retia.spaces import hrnas

    monkeypatch.delenv("RETIA_DATA", raising=False)
    cfg = hrnas_search.parse_config(["--config", str(HRNAS_CONFIGS / f"{name}.yml")])
    task = cfg.task.value
    assert task == {"cls": "classification", "seg": "segmentation", "keypoint": "keypoint"}[name.split("_")[0]]
    overrides = {k: v for k, v in to_dict(cfg)["model"].items() if k != "preset" and v is not None}
    if task != "classification":
        overrides["task"] = task
    net_cfg = hrnas.preset(cfg.model.preset, **overrides)  # the network config validates too
    assert net_cfg["task"] == task
    if name.endswith("_cpu"):
        assert cfg.data.path is None and cfg.train.accelerator == "cpu" and cfg.threads == 1
    else:
        assert cfg.data.path.startswith("./data/")  # ${RETIA_DATA:-./data}
    if hrnas_search.TASKS[task].available():  # classification, segmentation; keypoint once its modules exist
        hrnas_search.check_config(cfg)
    else:
        with pytest.raises(RetiaError, match=f"^task '{task}' is not available yet"):
            hrnas_search.check_config(cfg)


def test_shipped_configs_mirror_the_original():
    import hrnas_search

    def load(name):
        return hrnas_search.parse_config(["--config", str(HRNAS_CONFIGS / f"{name}.yml")])

    # values of dingmyu/HR-NAS configs/*.yml
    cls, city, ade, coco = (load(n) for n in ("cls_imagenet", "seg_cityscapes", "seg_ade20k", "keypoint_coco"))
    assert (cls.train.epochs, cls.train.learning_rate, cls.search.rho, cls.search.epoch_warmup) == (350, 0.016, 1.8e-4, 25)
    assert (city.train.epochs, city.train.learning_rate, city.search.rho, city.data.batch_size) == (430, 0.04, 1.4e-4, 32)
    assert (ade.train.epochs, ade.search.interval, ade.model.last_channel, ade.data.batch_size) == (200, 25, 180, 64)
    assert ade.search.rho == city.search.rho and ade.model.preset == "seg_ade20k"  # the rest comes from the include
    assert (coco.train.epochs, coco.train.learning_rate, coco.search.rho) == (210, 1e-3, 1e-6)
    for c in (cls, city, ade, coco):
        assert (c.search.threshold, c.search.min_delta_macs) == (1e-3, 1e6)


def test_cls_cpu_is_the_no_argument_run_and_flags_still_work():
    import hrnas_search

    cpu = hrnas_search.parse_config(["--config", str(HRNAS_CONFIGS / "cls_cpu.yml")])
    assert cpu == hrnas_search.parse_config([])
    # the old flags as overrides after --config, and as before without it
    a = hrnas_search.parse_config(["--config", str(HRNAS_CONFIGS / "cls_cpu.yml"), "--epochs", "2", "--no-tokens",
                                   "--train.learning-rate", "3e-3"])
    b = hrnas_search.parse_config(["--epochs", "2", "--no-tokens", "--learning-rate", "3e-3"])
    assert a == b and a.train.epochs == 2 and a.search.tokens is False and a.train.learning_rate == 3e-3


def test_entry_point_errors_are_one_line(capsys):
    import hrnas_search

    from retia.cli import run_main

    cases = [
        (["--config", str(HRNAS_CONFIGS / "seg_cpu.yml"), "model.input_size=[32,64]"],
         "error: model.input_size [32, 64]: the embedded synthetic shapes are square"),
        (["--config", str(HRNAS_CONFIGS / "cls_cpu.yml"), "--train.epoch", "2"], "unknown key 'train.epoch'"),
        (["--config", str(HRNAS_CONFIGS / "cls_cpu.yml"), "task=detection"], "task"),
        (["--config", str(HRNAS_CONFIGS / "cls_cpu.yml"), "train.optimizer=rmsprop"],
         "train.optimizer 'rmsprop' is not available yet"),
        (["--config", "nowhere.yml"], "'nowhere.yml': file does not exist"),
    ]
    if not hrnas_search.TASKS["keypoint"].available():
        cases.append((["--config", str(HRNAS_CONFIGS / "keypoint_cpu.yml")], "error: task 'keypoint' is not available yet"))
    for argv, words in cases:
        with pytest.raises(SystemExit) as ex:
            run_main(hrnas_search.main, argv)
        assert ex.value.code == 2
        err = capsys.readouterr().err.strip()
        assert err.count("\n") == 0 and err.startswith("error: ") and words in err, (argv, err)
