"""The HR-NAS progressive-shrinking search under DDP on the CPU (gloo), run by tests/test_hrnas_search.py in a
subprocess: this script runs ``experiments/hrnas_search.py``'s ``main`` with its other arguments (which ask for
``train.devices=2 train.strategy=ddp``), and Lightning's DDP launcher starts rank 1 by running this script again.
Not a test module itself.

    python tests/ddp_hrnas_search.py --ranks DIR <hrnas_search.py arguments, with --output OUT>

The callback's hooks are wrapped (not changed) to record, per rank, into ``DIR/rank<r>.json``: rank and world size;
a SHA-256 of the network's parameters when fit starts and at the end of every training epoch (before that epoch's
shrink); after every shrink, what Lightning's DDP wrapper holds (a new wrapper around the Lightning module whose
parameters, and those its reducer registered, are exactly the module's: the new network's, none of the old one's);
the final network's arch, MACs and SHA-256 of its whole state dict; main's summary; and every file or folder this
process created, wrote, renamed or removed under OUT (a Python audit hook: ``open`` for writing, ``os.mkdir``,
``os.rename``, ``os.replace``, ``os.remove``), and the ``retia-hrnas-nni-*`` scratch folders it created.
"""
from __future__ import annotations

import hashlib
import json
import os
import sys
from pathlib import Path

os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "experiments"))

import torch  # noqa: E402
from torch.nn.parallel import DistributedDataParallel  # noqa: E402

import retia  # noqa: E402,F401  (compat fixes)
from retia.spaces.hrnas import count_macs  # noqa: E402
from retia.strategies import hrnas_shrinking as hs  # noqa: E402

import hrnas_search  # noqa: E402


def tensors_sha(named) -> str:
    """SHA-256 over ``(name, tensor)`` pairs in name order (names and raw bytes)."""
    h = hashlib.sha256()
    for name, tensor in sorted(named, key=lambda item: item[0]):
        h.update(name.encode())
        h.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def params_sha(net: torch.nn.Module) -> str:
    return tensors_sha(net.named_parameters())


def state_sha(net: torch.nn.Module) -> str:
    return tensors_sha(net.state_dict().items())


def watch_writes(out: Path, writes: list[str], scratch: list[str]) -> None:
    """Record (relative to ``out``) every path under ``out`` this process opens for writing, creates, renames or
    removes; and in ``scratch`` the folders named ``retia-hrnas-nni-*`` it creates (NNI's scratch on ranks > 0)."""
    root = str(out.resolve())
    flags_writing = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC

    def audit(event, args):
        if event == "open":
            path, mode, flags = args
            writing = (any(c in mode for c in "wax+") if isinstance(mode, str)
                       else isinstance(flags, int) and bool(flags & flags_writing))
            paths = [path] if writing else []
        elif event == "os.mkdir" and os.path.basename(os.fsdecode(args[0])).startswith("retia-hrnas-nni-"):
            scratch.append(os.fsdecode(args[0]))
            return
        elif event in ("os.mkdir", "os.remove"):
            paths = [args[0]]
        elif event in ("os.rename", "os.replace"):
            paths = [args[0], args[1]]
        else:
            return
        for path in paths:
            if isinstance(path, (str, bytes, os.PathLike)):
                p = os.path.abspath(os.fsdecode(path))
                if p == root or p.startswith(root + os.sep):
                    writes.append(os.path.relpath(p, root))

    sys.addaudithook(audit)


def main() -> None:
    argv = sys.argv[1:]
    i = argv.index("--ranks")
    ranks = Path(argv[i + 1])
    argv = argv[:i] + argv[i + 2:]
    out = Path(argv[argv.index("--output") + 1])
    record: dict = {"epochs": [], "shrinks": [], "writes": [], "scratch": []}
    watch_writes(out, record["writes"], record["scratch"])

    on_fit_start = hs.ProgressiveShrinking.on_fit_start
    on_train_epoch_end = hs.ProgressiveShrinking.on_train_epoch_end
    apply_shrink = hs.ProgressiveShrinking.apply_shrink
    on_train_end = hs.ProgressiveShrinking.on_train_end

    def fit_start(self, trainer, pl_module):
        on_fit_start(self, trainer, pl_module)
        record.update(rank=trainer.global_rank, world_size=trainer.world_size,
                      wrapper=type(trainer.strategy.model).__name__, initial_sha=params_sha(pl_module.model))

    def epoch_end(self, trainer, pl_module):
        net = pl_module.model
        record["epochs"].append({"epoch": trainer.current_epoch, "arch": dict(net.arch), "params_sha": params_sha(net)})
        on_train_epoch_end(self, trainer, pl_module)

    def shrink(self, trainer, pl_module, force=False):
        old_params = {id(p) for p in pl_module.model.parameters()}
        old_wrapper = trainer.strategy.model
        shrunk = apply_shrink(self, trainer, pl_module, force)
        if shrunk:
            wrapper, net = trainer.strategy.model, pl_module.model
            wrapped = {id(p) for p in wrapper.parameters()}
            module = {id(p) for p in pl_module.parameters()}
            reducer = {id(p) for p in getattr(wrapper, "_module_parameters", [])}
            record["shrinks"].append({
                "epoch": trainer.current_epoch, "arch": dict(net.arch), "macs": count_macs(net.config, net.arch),
                "ddp": isinstance(wrapper, DistributedDataParallel), "new_wrapper": wrapper is not old_wrapper,
                "wraps_module": getattr(wrapper, "module", None) is pl_module,
                "wrapped_are_module_params": wrapped == module,
                "reducer_params": reducer == {id(p) for p in pl_module.parameters() if p.requires_grad},
                "net_params_wrapped": {id(p) for p in net.parameters()} <= wrapped,
                "old_params_wrapped": bool(old_params & wrapped),
                "wrapped_numel": sum(p.numel() for p in wrapper.parameters()),
                "net_numel": sum(p.numel() for p in net.parameters())})
        return shrunk

    def train_end(self, trainer, pl_module):
        on_train_end(self, trainer, pl_module)
        net = pl_module.model
        record["final"] = {"arch": dict(net.arch), "macs": count_macs(net.config, net.arch),
                           "params_sha": params_sha(net), "state_sha": state_sha(net),
                           "recalibrated": self.recalibrated}

    hs.ProgressiveShrinking.on_fit_start = fit_start
    hs.ProgressiveShrinking.on_train_epoch_end = epoch_end
    hs.ProgressiveShrinking.apply_shrink = shrink
    hs.ProgressiveShrinking.on_train_end = train_end

    summary = hrnas_search.main(argv)
    record["summary"] = {k: v for k, v in summary.items() if k != "config"}
    ranks.mkdir(parents=True, exist_ok=True)
    (ranks / f"rank{record['rank']}.json").write_text(json.dumps(record))


if __name__ == "__main__":
    sys.exit(main())
