"""The namespace install: every folder with an __init__.py is a listed package of `retia`."""
import configparser
import importlib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FOLDERS = {"core": "retia", "spaces": "retia.spaces", "evaluators": "retia.evaluators",
           "strategies": "retia.strategies", "experiments": "retia.experiments", "convert": "retia.convert"}


def _declared():
    cfg = configparser.ConfigParser()
    cfg.read(ROOT / "setup.cfg")
    return cfg, set(cfg["options"]["packages"].split())


def test_every_package_folder_is_declared_and_mapped():
    cfg, declared = _declared()
    mapping = dict(line.split(" = ") for line in cfg["options"]["package_dir"].strip().splitlines())
    assert {mapping[name] for name in FOLDERS.values()} == set(FOLDERS)
    for folder, package in FOLDERS.items():
        for init in (ROOT / folder).rglob("__init__.py"):
            rel = init.parent.relative_to(ROOT / folder).parts
            name = ".".join((package,) + rel)
            assert name in declared, f"{name} ({init.parent}) is missing from setup.cfg packages"


def test_declared_packages_import_from_their_folders():
    _, declared = _declared()
    for name in sorted(declared):
        module = importlib.import_module(name)
        by_package = {v: k for k, v in FOLDERS.items()}
        folder = by_package.get(".".join(name.split(".")[:2]), "core")
        assert Path(module.__file__).resolve().is_relative_to(ROOT / folder), (name, module.__file__)


def test_no_top_level_folder_named_retia():
    # a ./retia folder would shadow the editable mapping of the subpackages when run from the repo root
    assert not (ROOT / "retia").exists()
