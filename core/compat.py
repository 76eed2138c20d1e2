"""Fixes for the known breakages of NNI 3.0 (archived) on the current torch / setuptools stack.

Applied once when :mod:`retia` is imported. Each fix is small, targeted and says why it exists.
"""
from __future__ import annotations

import importlib
import importlib.metadata
import os
import sys
import types
import warnings
from pathlib import Path

_applied = False

# Classes a NAS strategy checkpoint may hold besides tensors: NNI's own objects (evolution individuals,
# mutable labels), numpy random states, and plain containers. Nothing else is unpickled.
SAFE_GLOBAL_PREFIXES = ("nni.", "numpy.dtypes.")
SAFE_GLOBALS = {
    "builtins.set", "builtins.frozenset", "builtins.slice", "builtins.complex",
    "collections.OrderedDict", "collections.deque", "collections.defaultdict",
    "numpy._core.multiarray._reconstruct", "numpy.core.multiarray._reconstruct",
    "numpy._core.multiarray.scalar", "numpy.core.multiarray.scalar",
    "numpy.ndarray", "numpy.dtype",
}


def is_safe_global(name: str) -> bool:
    """True when ``name`` (``module.qualname``) is on the strategy-checkpoint allow-list."""
    return name in SAFE_GLOBALS or name.startswith(SAFE_GLOBAL_PREFIXES)


def _import_global(name: str):
    module, _, attr = name.rpartition(".")
    obj = importlib.import_module(module)
    for part in attr.split("."):
        obj = getattr(obj, part)
    return obj


def _numpy_dtype_classes() -> list:
    # numpy arrays rebuild their dtype through classes (numpy.dtypes.UInt32DType, ...) that torch's scan misses
    import numpy

    return [c for c in vars(numpy.dtypes).values() if isinstance(c, type) and issubclass(c, numpy.dtype)]


def safe_torch_load(path: str | Path, map_location=None):
    """``torch.load(weights_only=True)`` that also admits the allow-listed NNI / numpy globals of ``path``."""
    import torch

    from .errors import RetiaError

    names = torch.serialization.get_unsafe_globals_in_checkpoint(str(path))
    refused = sorted(n for n in names if not is_safe_global(n))
    if refused:
        raise RetiaError(f"checkpoint {path} holds classes outside retia's allow-list: {', '.join(refused)}")
    allowed = [_import_global(n) for n in names] + _numpy_dtype_classes()
    with torch.serialization.safe_globals(allowed):
        return torch.load(str(path), map_location=map_location, weights_only=True)


def _patch_strategy_checkpoints() -> None:
    # torch>=2.6 loads with weights_only=True, which rejects NNI's strategy state (exp.resume() breaks).
    from nni.nas.utils import serializer

    def load(self, path):
        return safe_torch_load(serializer._find_path_with_prefix(path, self.suffix), self._map_location)

    serializer.TorchSerializer.load = load


def _patch_atomic_checkpoints() -> None:
    # NNI writes its experiment checkpoint in place (config.json opened with "w", then state.ckpt): a search killed
    # during the write left an empty config.json that exp.resume() cannot read. Write each file under a temporary
    # name and rename it into place, so a kill keeps the previous complete checkpoint.
    import nni
    from nni.nas.experiment import experiment as nas_experiment
    from nni.nas.utils import serializer

    def atomic_write(final: Path, write) -> None:
        tmp = final.with_name(final.name + ".tmp")
        write(tmp)
        os.replace(tmp, final)

    def save(self, checkpoint, path):
        import torch

        atomic_write(Path(str(path) + self.suffix), lambda tmp: torch.save(checkpoint, str(tmp)))

    def dump_config(exp, tmp: Path) -> None:
        with tmp.open("w", encoding="utf-8") as f:
            nni.dump(exp.config.json(), fp=f, indent=2)

    def save_checkpoint(self) -> None:
        try:
            directory = self._checkpoint_directory
            directory.mkdir(parents=True, exist_ok=True)
            atomic_write(directory / "config.json", lambda tmp: dump_config(self, tmp))
            if self._engine is not None:
                serializer.get_default_serializer().save(self.state_dict(), directory / "state.ckpt")
            nas_experiment._logger.info("Checkpoint saved to %s.", directory)
        except Exception:
            nas_experiment._logger.exception("Error occurred when saving checkpoint.")

    serializer.TorchSerializer.save = save
    nas_experiment.NasExperiment.save_checkpoint = save_checkpoint


def _patch_pkg_resources() -> None:
    # nnictl and NNI's trial tools `import pkg_resources`, which setuptools>=82 removed: shim what they use.
    warnings.filterwarnings("ignore", message="pkg_resources is deprecated", category=UserWarning)
    try:
        import pkg_resources  # noqa: F401
        return
    except ImportError:
        pass
    shim = types.ModuleType("pkg_resources")

    class ResolutionError(Exception):
        pass

    class _Distribution:
        def __init__(self, name: str):
            try:
                self.version = importlib.metadata.version(name)
            except importlib.metadata.PackageNotFoundError as exc:
                raise ResolutionError(name) from exc
            self.project_name = name

    shim.ResolutionError = ResolutionError
    shim.DistributionNotFound = ResolutionError
    shim.get_distribution = _Distribution
    sys.modules["pkg_resources"] = shim


def _patch_crypten_import() -> None:
    # crypten 0.4.1 imports torch.onnx._internal.registration, which moved under torchscript_exporter in torch 2.9.
    try:
        import torch.onnx._internal as internal
    except ImportError:
        return
    if "torch.onnx._internal.registration" in sys.modules or hasattr(internal, "registration"):
        return
    try:
        moved = importlib.import_module("torch.onnx._internal.torchscript_exporter.registration")
    except ImportError:
        return
    sys.modules["torch.onnx._internal.registration"] = moved
    internal.registration = moved


class _DropMessages:
    """A logging filter dropping records whose message starts with one of ``prefixes``."""

    def __init__(self, *prefixes: str):
        self.prefixes = prefixes

    def filter(self, record) -> bool:
        return not str(record.msg).startswith(self.prefixes)


def _patch_tuner_resume_replay() -> None:
    # On resume NNI manager replays trials to the tuner (ImportData, AddCustomizedTrialJob), which NAS's channel rejects
    # ("Unknown command type", ts-engine exp.resume() dies); NAS strategies restore them from their own checkpoint.
    from nni.runtime.tuner_command_channel.channel import TunerCommandChannel
    from nni.runtime.tuner_command_channel.command_type import CommandType

    receive, replay = TunerCommandChannel._receive, (CommandType.ImportData, CommandType.AddCustomizedTrialJob)

    def _receive(self):
        while True:
            command_type, data = receive(self)
            if command_type not in replay:
                return command_type, data

    TunerCommandChannel._receive = _receive


def _quiet_nni_warnings() -> None:
    # NNI walks torch.nn and warns for every non-Module class newer torch added there (Buffer, ...): noise only.
    warnings.filterwarnings("ignore", message=r".*is found to be not a nn\.Module.*", category=RuntimeWarning)
    # NNI re-validates the config at every checkpoint and warns each time that sequential runs ignore it;
    # retia checkpoints one-shot weights itself (safetensors), so NNI's "no checkpoint callback" is noise too.
    import logging

    logging.getLogger("nni.nas.experiment.config.experiment").addFilter(
        _DropMessages("`training_service` will be ignored"))
    logging.getLogger("nni.nas.oneshot.pytorch.strategy").addFilter(
        _DropMessages("Checkpoint callback is found to be None"))


def _patch_sequential_trial_state() -> None:
    # NNI's sequential engine restores the trial channel after each model but leaves nni.trial._params set, so
    # code run later in the same process believes it is inside a trial (reports go astray, mock_runtime refuses).
    import nni.trial
    from nni.nas.execution.sequential import SequentialExecutionEngine

    run_single = SequentialExecutionEngine._run_single_model

    def _run_single_model(self, model):
        saved = nni.trial._params, nni.trial._intermediate_seq
        try:
            return run_single(self, model)
        finally:
            nni.trial._params, nni.trial._intermediate_seq = saved

    SequentialExecutionEngine._run_single_model = _run_single_model


def _patch_layernorm_slicing() -> None:
    # NNI's one-shot MixedLayerNorm slices its weight with a *list* of slices (weight[[slice(0, n)]]), which torch
    # has deprecated ("will be interpreted as tensor index"; it warns in every AutoFormer one-shot run): the same
    # slicing with a tuple, which means the same today and keeps meaning it.
    from nni.nas.oneshot.pytorch.supermodule.operation import MixedLayerNorm

    def _freeze_weight_impl(self, normalized_shape, **kwargs):
        if isinstance(normalized_shape, dict):
            normalized_shape = self.normalized_shape
        if isinstance(normalized_shape, int):
            normalized_shape = (normalized_shape,)
        if isinstance(self.normalized_shape, int):
            normalized_shape = (self.normalized_shape,)
        index = tuple(slice(0, min(i, j)) for i, j in zip(normalized_shape, self.normalized_shape))
        weight = self.weight[index] if self.weight is not None else None
        bias = self.bias[index] if self.bias is not None else None
        return {"weight": weight, "bias": bias, "normalized_shape": normalized_shape}

    MixedLayerNorm._freeze_weight_impl = _freeze_weight_impl


def apply() -> None:
    """Apply every fix once; safe to call again."""
    global _applied
    if _applied:
        return
    _quiet_nni_warnings()
    _patch_pkg_resources()
    _patch_crypten_import()
    _patch_strategy_checkpoints()
    _patch_atomic_checkpoints()
    _patch_sequential_trial_state()
    _patch_tuner_resume_replay()
    _patch_layernorm_slicing()
    _applied = True
