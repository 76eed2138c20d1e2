"""Weights IO: safetensors + sidecar, safe torch files only."""
import pytest
import torch

from retia.errors import RetiaError
from retia.weights import load_meta, load_weights, save_weights


def test_round_trip_with_sidecar(tmp_path):
    state = {"a": torch.randn(3, 4), "b": torch.arange(5)}
    path = save_weights(state, tmp_path / "w.safetensors", {"arch": {"depth": 2}})
    loaded = load_weights(path)
    assert all(torch.equal(loaded[k], v) for k, v in state.items())
    assert load_meta(path) == {"arch": {"depth": 2}}


def test_torch_files_load_with_weights_only(tmp_path):
    state = {"w": torch.ones(2)}
    torch.save({"model": state, "epoch": 3}, tmp_path / "ckpt.pth")
    assert torch.equal(load_weights(tmp_path / "ckpt.pth")["w"], torch.ones(2))


class Payload:
    def __reduce__(self):
        return (print, ("executed",))


def test_pickled_objects_are_refused(tmp_path, capsys):
    torch.save({"model": {"w": torch.ones(1)}, "x": Payload()}, tmp_path / "evil.pth")
    with pytest.raises(RetiaError, match="cannot be loaded safely"):
        load_weights(tmp_path / "evil.pth")
    assert "executed" not in capsys.readouterr().out


@pytest.mark.parametrize("name, message", [("missing.safetensors", "does not exist"), ("w.npz", "expected .safetensors")])
def test_bad_paths(tmp_path, name, message):
    if name.endswith(".npz"):
        (tmp_path / name).write_bytes(b"x")
    with pytest.raises(RetiaError, match=message):
        load_weights(tmp_path / name)


def test_corrupt_safetensors(tmp_path):
    (tmp_path / "bad.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(RetiaError, match="not a valid safetensors"):
        load_weights(tmp_path / "bad.safetensors")
