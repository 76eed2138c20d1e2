"""DDP training of a frozen HR-NAS subnet on the CPU (gloo), run by tests/test_fake_data_lmdb.py in a subprocess:
Lightning's DDP launcher starts the other ranks by running this script again. Not a test module itself.

    python tests/ddp_classification.py --data PATH --out DIR [--devices 2] [--epochs 2]

``--data`` is anything ``retia.data.build_datamodule`` reads (here an LMDB file). Each rank writes
``DIR/rank<r>.json``: world size, the sample indices its sampler gave it in epoch 0, training batches per epoch,
validation top-1, the training losses, and a SHA-256 of its final weights (plus one of the initial weights).
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
from pathlib import Path

os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")

import pytorch_lightning as pl  # noqa: E402
import torch  # noqa: E402

import retia  # noqa: E402,F401  (compat fixes)


def weights_sha(net: torch.nn.Module) -> str:
    h = hashlib.sha256()
    for name, tensor in sorted(net.state_dict().items()):
        h.update(name.encode())
        h.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


class LossLog(pl.Callback):
    def __init__(self):
        self.losses = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.losses.append(float(outputs["loss"]))


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--data", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--devices", type=int, default=2)
    p.add_argument("--epochs", type=int, default=2)
    a = p.parse_args()
    torch.set_num_threads(1)
    pl.seed_everything(0, workers=True, verbose=False)
    from retia.data import build_datamodule
    from retia.evaluators.classification import classification_evaluator
    from retia.spaces import hrnas

    dm = build_datamodule(a.data, image_size=32, batch_size=20)
    space = hrnas.HRNASSpace("tiny", num_classes=dm.num_classes)
    arch = {k: v // 2 for k, v in hrnas.full_arch(space.config).items()}  # a frozen subnet: half of every unit
    net = space.freeze(arch)
    initial = weights_sha(net)
    losses = LossLog()
    evaluator = classification_evaluator(
        dm, num_classes=dm.num_classes, max_epochs=a.epochs, log_dir=Path(a.out) / "logs", callbacks=[losses],
        accelerator="cpu", devices=a.devices, strategy="ddp", enable_progress_bar=False, learning_rate=5e-3,
        weight_decay=0.01, warmup_epochs=0, label_smoothing=0.0, mixup=0.0, cutmix=0.0, report_to_nni=False)
    evaluator.evaluate(net)
    trainer = evaluator.trainer
    sampler = trainer.train_dataloader.sampler
    sampler.set_epoch(0)
    record = {"rank": trainer.global_rank, "world_size": trainer.world_size, "sampler": type(sampler).__name__,
              "indices": [int(i) for i in sampler], "batches": len(trainer.train_dataloader),
              "dataset": len(dm.train_set), "val_top1": float(trainer.callback_metrics["val_top1"]),
              "losses": losses.losses, "initial_sha": initial, "final_sha": weights_sha(evaluator.module.model)}
    Path(a.out, f"rank{trainer.global_rank}.json").write_text(json.dumps(record))


if __name__ == "__main__":
    sys.exit(main())
