"""One AutoFormer trial for ``nnictl`` (HPO-style experiments): freeze the tuner's arch, score it, report.

``python -m retia.experiments.autoformer_trial`` is the ``trialCommand`` of
``experiments/configs/autoformer_search.yml``. It takes ``nni.get_next_parameter()`` (labels ``embed_dim``,
``depth``, ``mlp_ratio_i``, ``num_head_i`` from the search space exported by
``python -m retia.experiments.export_search_space``), validates it against the space, freezes it into a plain
``nn.Module`` and reports validation top-1 (%):

* with supernet weights (``--weights W`` or the environment variable ``RETIA_SUPERNET_WEIGHTS``) the subnet
  inherits the supernet's weights (``AutoformerSpace.load_subnet``) and is evaluated as is — the weight-sharing
  evaluation of the AutoFormer paper (add ``--epochs N`` to fine-tune it first);
* without weights it is built fresh (``AutoformerSpace.build_subnet``) and trained very briefly (``--epochs``,
  default 4, ``--max-train-batches``) — a cheap proxy that runs offline on a CPU.

Intermediate results: top-1 after each epoch. Final result: ``{"default": top1, "top5", "params", "flops"}``
(NNI's web UI ranks by ``default``). Outside NNI pass ``--arch '{"embed_dim": 64, ...}'`` to run one arch.
Data: the embedded digits by default, ``--datapath`` for an ImageFolder / CIFAR directory.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from typing import Any

from retia.cli import run_main
from retia.errors import RetiaError

WEIGHTS_ENV = "RETIA_SUPERNET_WEIGHTS"


def build_parser() -> argparse.ArgumentParser:
    from retia.cli import positive_int

    p = argparse.ArgumentParser(prog="python -m retia.experiments.autoformer_trial", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="micro", help="space preset when no --weights / --config (default: micro)")
    p.add_argument("--config", default=None, help="space config JSON instead of --preset")
    p.add_argument("--weights", default=os.environ.get(WEIGHTS_ENV) or None,
                   help=f"trained supernet (or subnet) weights; default: ${WEIGHTS_ENV}, else train from scratch")
    p.add_argument("--datapath", default=None, help="ImageFolder / CIFAR directory (default: embedded digits)")
    p.add_argument("--epochs", type=int, default=None,
                   help="training epochs before scoring (default: 4 without --weights, 0 with)")
    p.add_argument("--max-train-batches", type=int, default=0, help="cap on batches per epoch (0: all)")
    p.add_argument("--batch-size", type=positive_int, default=64)
    p.add_argument("--learning-rate", type=float, default=2e-3)
    p.add_argument("--weight-decay", type=float, default=0.05)
    p.add_argument("--label-smoothing", type=float, default=0.1)
    p.add_argument("--threads", type=positive_int, default=1, help="torch CPU threads per trial (default: 1)")
    p.add_argument("--device", default=None, help="cpu / cuda (default: cuda when available)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--arch", default=None, help="arch JSON (or a .json file) to score outside NNI")
    return p


def read_arch(args: argparse.Namespace) -> dict[str, Any]:
    """The tuner's parameters (``nni.get_next_parameter()``), or ``--arch`` outside NNI."""
    import nni

    params = nni.get_next_parameter()
    if params is None or params == {}:
        if args.arch is None:
            raise RetiaError("no architecture: nni.get_next_parameter() gave none (not under nnictl) and no --arch")
        text = args.arch
        if not text.lstrip().startswith("{"):
            if not os.path.isfile(text):
                raise RetiaError(f"--arch {text!r}: expected a JSON object or an existing .json file")
            with open(text) as f:
                text = f.read()
        try:
            params = json.loads(text)
        except json.JSONDecodeError as exc:
            raise RetiaError(f"--arch is not JSON ({exc})") from None
    if not isinstance(params, dict):
        raise RetiaError(f"trial parameters {params!r}: expected a dict of AutoFormer labels")
    return flatten_nested(params)


def flatten_nested(params: dict[str, Any]) -> dict[str, Any]:
    """NNI's nested-choice parameters (``{"depth": {"_name": 3, "num_head_0": 1, ...}}``) as a flat arch dict."""
    out: dict[str, Any] = {}
    for label, value in params.items():
        if isinstance(value, dict) and "_name" in value:
            out[label] = value["_name"]
            out.update(flatten_nested({k: v for k, v in value.items() if k != "_name"}))
        else:
            out[label] = value
    return out


def canonical_arch(space, arch: dict[str, Any]) -> dict[str, Any]:
    """``arch`` validated and completed by the space, each value replaced by the space's own (NNI's manager
    turns ``4.0`` into ``4`` on the way to the trial)."""
    full = space.complete_arch(arch)
    values = {label: list(mutable.values) for label, mutable in space.simplify().items()}
    return {k: values[k][values[k].index(v)] for k, v in full.items()}


def space_config(args: argparse.Namespace) -> dict[str, Any]:
    from retia.spaces.autoformer import AutoformerSpace
    from retia.weights import load_meta

    if args.weights:
        if not os.path.isfile(args.weights):
            raise RetiaError(f"--weights {args.weights!r} does not exist")
        meta = load_meta(args.weights) or {}
        if "config" in meta:
            return meta["config"]
    if args.config:
        if not os.path.isfile(args.config):
            raise RetiaError(f"--config {args.config!r} does not exist")
        with open(args.config) as f:
            return json.load(f)
    if args.weights:
        raise RetiaError(f"--weights {args.weights!r} has no JSON sidecar with the space config: pass --config")
    return AutoformerSpace.config(args.preset)


def effective_arch(arch: dict[str, Any]) -> dict[str, Any]:
    """``arch`` without the labels of layers beyond ``depth`` (they do not change the model)."""
    depth = arch["depth"]
    return {k: v for k, v in arch.items()
            if not (k.rpartition("_")[2].isdigit() and int(k.rpartition("_")[2]) >= depth)}


def train(model, loader, epochs: int, max_batches: int, lr: float, weight_decay: float, label_smoothing: float,
          device: str, on_epoch) -> None:
    """AdamW with a 10% linear warmup then cosine decay (per step); ``on_epoch(epoch)`` after each epoch."""
    import torch

    steps_per_epoch = len(loader) if max_batches <= 0 else min(len(loader), max_batches)
    total = max(1, epochs * steps_per_epoch)
    warmup = max(1, total // 10)
    from retia.evaluators.optim import adamw

    optimizer = adamw(model.parameters(), lr=lr, weight_decay=weight_decay)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: (s + 1) / warmup if s < warmup else 0.5 * (1 + math.cos(math.pi * (s - warmup) / max(1, total - warmup))))
    for epoch in range(epochs):
        model.train()
        for i, (x, y) in enumerate(loader):
            if i >= steps_per_epoch:
                break
            x, y = x.to(device), y.to(device)
            loss = torch.nn.functional.cross_entropy(model(x), y, label_smoothing=label_smoothing)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
        on_epoch(epoch)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = build_parser().parse_args(argv)
    import nni
    import torch

    from retia.data import build_datamodule
    from retia.evaluators.weight_sharing import accuracy
    from retia.profile import count_flops, count_params
    from retia.spaces.autoformer import AutoformerSpace

    start = time.perf_counter()
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    params = read_arch(args)
    config = space_config(args)
    size = config.get("img_size", 224)
    datamodule = build_datamodule(args.datapath, image_size=size, batch_size=args.batch_size, seed=args.seed)
    classes = getattr(datamodule, "num_classes", None)
    if classes is not None and classes != config.get("num_labels", 1000):
        if args.weights:
            raise RetiaError(f"--weights {args.weights!r} classify {config.get('num_labels')} classes, "
                             f"the data has {classes}")
        config = dict(config, num_labels=classes)
    with nni.mutable.frozen_context.bypass():
        space = AutoformerSpace.from_config(config)
    arch = canonical_arch(space, params)  # one-line RetiaError for an unknown label or an out-of-range value
    if args.weights:
        model = AutoformerSpace.load_subnet(arch, weights=args.weights, config=config)
    else:
        model = AutoformerSpace.build_subnet(arch, config)
    model.to(device)
    datamodule.setup("fit")
    val = list(datamodule.val_dataloader())

    epochs = args.epochs if args.epochs is not None else (0 if args.weights else 4)
    if epochs < 0:
        raise RetiaError(f"--epochs {epochs}: expected 0 or more")

    def report(epoch: int) -> None:
        top1 = accuracy(model, val, device)["top1"]
        nni.report_intermediate_result(top1)
        print(f"epoch {epoch + 1}/{epochs}: val top-1 {top1:.2f}%", flush=True)

    if epochs:
        train(model, datamodule.train_dataloader(), epochs, args.max_train_batches, args.learning_rate,
              args.weight_decay, args.label_smoothing, device, report)
    scores = accuracy(model, val, device)
    result = {
        "default": scores["top1"],
        "top5": scores["top5"],
        "params": count_params(model),
        "flops": count_flops(model.cpu(), (1, 3, size, size)),
        "seconds": round(time.perf_counter() - start, 1),
    }
    nni.report_final_result(result)
    print(json.dumps({"arch": effective_arch(arch), **result}), flush=True)
    return result


if __name__ == "__main__":
    run_main(main)
    sys.exit(0)
