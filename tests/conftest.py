"""Test-suite setup: CPU only, one torch thread (small models on a shared 2-core box run fastest that way)."""
import os

os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")
os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

import retia  # noqa: E402,F401  (applies the compatibility fixes)

torch.set_num_threads(1)


@pytest.fixture
def tmp_run(tmp_path):
    """A fresh directory for a run's outputs."""
    return tmp_path / "run"


@pytest.fixture(autouse=True)
def _restore_nni_trial_state():
    """Trial entry points run in-process by tests call nni.get_next_parameter() (standalone mode), which leaves
    the module-level trial state set; restore it so each test starts outside any trial."""
    import nni.trial

    saved = nni.trial._params, nni.trial._intermediate_seq
    yield
    nni.trial._params, nni.trial._intermediate_seq = saved
