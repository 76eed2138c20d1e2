"""The stack fixes applied on `import retia` (and the CPU kernel-cache setting applied on `import retia.spaces.hrnas`)."""
import importlib
import json
import pickle
import sys

import numpy as np
import pytest
import torch

from retia import compat
from retia.errors import RetiaError


def test_strategy_checkpoint_with_nni_and_numpy_state_loads_safely(tmp_path):
    from nni.nas.strategy import RegularizedEvolution
    from nni.nas.strategy.evolution import Individual
    from nni.nas.utils.serializer import TorchSerializer

    strategy = RegularizedEvolution(population_size=3, sample_size=2, seed=1)
    strategy._population.append(Individual({"embed_dim": 64}, 0.5))
    state = {"version": 1, "strategy": strategy.state_dict()}
    TorchSerializer().save(state, tmp_path / "state.ckpt")
    with pytest.raises(pickle.UnpicklingError):  # plain torch>=2.6 refuses it: the breakage being fixed
        torch.load(tmp_path / "state.ckpt.torch")
    loaded = TorchSerializer().load(tmp_path / "state.ckpt")
    restored = RegularizedEvolution(population_size=3, sample_size=2)
    restored.load_state_dict(loaded["strategy"])
    assert list(restored._population) == [Individual({"embed_dim": 64}, 0.5)]
    assert np.array_equal(restored._random_state.get_state()[1], strategy._random_state.get_state()[1])


class Evil:
    def __reduce__(self):
        return (print, ("pwned",))


def test_checkpoint_with_foreign_class_is_refused_in_one_line(tmp_path):
    path = tmp_path / "evil.torch"
    torch.save({"x": Evil()}, path)
    with pytest.raises(RetiaError, match="builtins.print"):
        compat.safe_torch_load(path)


def test_allow_list_scope():
    assert compat.is_safe_global("nni.nas.strategy.evolution.Individual")
    assert compat.is_safe_global("numpy.ndarray")
    assert not compat.is_safe_global("os.system")
    assert not compat.is_safe_global("builtins.eval")


def test_pkg_resources_shim_when_setuptools_lacks_it(monkeypatch):
    monkeypatch.setitem(sys.modules, "pkg_resources", None)  # import now raises ImportError
    compat._patch_pkg_resources()
    shim = sys.modules["pkg_resources"]
    assert shim.get_distribution("nni").version == "3.0"
    with pytest.raises(shim.ResolutionError):
        shim.get_distribution("no-such-distribution-retia")


def test_crypten_imports_after_the_registration_alias():
    pytest.importorskip("onnx", reason="crypten extra not installed")
    if importlib.util.find_spec("crypten") is None:
        pytest.skip("crypten is not installed (make install adds it)")
    import crypten

    crypten.init()
    x = crypten.cryptensor(torch.tensor([1.0, 2.0]))
    assert torch.allclose((x * 3).get_plain_text(), torch.tensor([3.0, 6.0]))


def test_sequential_engine_leaves_no_trial_state_behind(tmp_path):
    import nni
    from nni.nas.evaluator import FunctionalEvaluator
    from nni.nas.experiment import NasExperiment
    from nni.nas.experiment.config import RawModelFormatConfig, SequentialEngineConfig
    from nni.nas.nn.pytorch import ModelSpace, MutableLinear
    from nni.nas.strategy import Random

    class Space(ModelSpace):
        def __init__(self):
            super().__init__()
            self.fc = MutableLinear(1, nni.choice("width", [1, 2]))

    inside = []

    def evaluate(model):
        inside.append(nni.get_current_parameter() is not None)
        nni.report_final_result(1.0)

    exp = NasExperiment(Space(), FunctionalEvaluator(evaluate), Random(seed=0))
    exp.config.max_trial_number = 2
    exp.config.execution_engine = SequentialEngineConfig()
    exp.config.model_format = RawModelFormatConfig()
    exp.config.experiment_working_directory = str(tmp_path)
    exp.run()
    exp.stop()
    assert inside == [True, True]
    assert nni.get_current_parameter() is None


@pytest.mark.parametrize("module, preset, expected", [("retia.spaces.hrnas", None, "8192"),
                                                      ("retia.spaces.hrnas", "100", "100"),
                                                      ("retia", None, "unset")])
def test_onednn_primitive_cache_is_sized_by_hrnas_unless_the_user_set_it(module, preset, expected):
    import os
    import subprocess

    env = {k: v for k, v in os.environ.items() if k != "ONEDNN_PRIMITIVE_CACHE_CAPACITY"}
    if preset is not None:
        env["ONEDNN_PRIMITIVE_CACHE_CAPACITY"] = preset
    code = f"import os, {module}; print(os.environ.get('ONEDNN_PRIMITIVE_CACHE_CAPACITY', 'unset'))"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == expected


def test_nni_checkpoint_files_are_replaced_atomically(tmp_path, monkeypatch):
    """A search killed while NNI writes its checkpoint keeps the previous complete files (NNI itself truncated
    config.json first, and a kill there left an empty file that resume() could not read)."""
    import nni
    from nni.nas.experiment import NasExperiment
    from nni.nas.utils.serializer import TorchSerializer

    import retia  # noqa: F401  (applies the fixes)

    ser = TorchSerializer()
    ser.save({"step": 1}, tmp_path / "state.ckpt")
    assert ser.load(tmp_path / "state.ckpt") == {"step": 1}

    def killed(obj, path):
        with open(path, "wb") as f:
            f.write(b"partial")
        raise KeyboardInterrupt

    monkeypatch.setattr(torch, "save", killed)
    with pytest.raises(KeyboardInterrupt):
        ser.save({"step": 2}, tmp_path / "state.ckpt")
    monkeypatch.undo()
    assert ser.load(tmp_path / "state.ckpt") == {"step": 1}

    class Exp:  # what save_checkpoint uses of a NasExperiment
        _checkpoint_directory = tmp_path / "checkpoint"
        _engine = None

        class config:
            @staticmethod
            def json():
                return {"trial_concurrency": 1}

    NasExperiment.save_checkpoint(Exp())
    config = Exp._checkpoint_directory / "config.json"
    assert json.loads(config.read_text()) == {"trial_concurrency": 1}

    def dump_killed(obj, fp, **kw):
        fp.write("{")
        raise RuntimeError("killed")

    monkeypatch.setattr(nni, "dump", dump_killed)
    NasExperiment.save_checkpoint(Exp())  # NNI logs a failed save and goes on
    assert json.loads(config.read_text()) == {"trial_concurrency": 1}


def test_one_shot_layernorm_slices_without_the_deprecated_list_index():
    import warnings

    import torch
    from nni.nas.oneshot.pytorch.supermodule.operation import MixedLayerNorm

    import retia  # noqa: F401  (applies the fixes)

    for full, chosen in (((8,), (5,)), ((4, 6), (3, 4))):
        ln = torch.nn.LayerNorm(full)
        with torch.no_grad():
            ln.weight.copy_(torch.arange(ln.weight.numel(), dtype=torch.float32).view(full))
            ln.bias.copy_(-ln.weight)
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # NNI's own code warns "non-tuple sequence for multidimensional indexing"
            out = MixedLayerNorm._freeze_weight_impl(ln, chosen)
        index = tuple(slice(0, n) for n in chosen)
        assert out["normalized_shape"] == chosen
        assert torch.equal(out["weight"], ln.weight[index]) and torch.equal(out["bias"], ln.bias[index])
        assert out["weight"].shape == chosen
