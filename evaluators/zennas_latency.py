"""Latency budgets for Zen-NAS searches: measured on this device, cached per block, summed as a lookup table.

The original search measures every candidate that passes the other budgets: it builds the whole network, moves
it to the GPU, runs 3 warm-up batches and one timed one (fp16, batch 64) — the dominant cost of its
latency-constrained searches. A candidate differs from its parent in one or two blocks (and the input channels of
the block after them), so here latency is a **lookup table**:

* a block's latency is measured once per configuration — key: the block's token (type, channels, stride,
  bottleneck, sub-layers), its input resolution, the batch size, the device and the precision — by building
  that block alone (with its residual links, as deployed) and timing it in eval mode;
* a network's latency is estimated as the sum of its blocks' latencies plus the classifier head's;
* the table persists as JSON (``path``), so later searches on the same machine reuse it.

Measurements use :func:`retia.spaces.zennas.tools.measure_latency`: warm-up passes, then timed passes with device
synchronisation, trimmed mean; CUDA (fp16 unless ``fp16=False``) when available, else the CPU in float32 with the
current ``torch.get_num_threads()``. Values are seconds **per image** (per batch / batch size), the unit of the
original's ``--budget_latency``.

The estimate leaves out what a block sum cannot see (launch/dispatch overhead between blocks, cache effects
across block boundaries), so :meth:`LatencyTable.validate` compares it with whole-network measurements and
reports the error; ``docs/zennas_search.md`` gives the figures measured on this project's CPU.
"""
from __future__ import annotations

import json
import os
import statistics
import threading
from pathlib import Path
from typing import Any, Iterable

import torch
from torch import nn

from retia.errors import RetiaError
from retia.spaces import zennas

__all__ = ["LatencyTable"]


class _Head(nn.Module):
    """Global average pooling + linear classifier (the ZenNet head)."""

    def __init__(self, channels: int, num_classes: int):
        super().__init__()
        self.linear = nn.Linear(channels, num_classes)

    def forward(self, x):
        return self.linear(torch.flatten(torch.nn.functional.adaptive_avg_pool2d(x, 1), 1))


class LatencyTable:
    """Per-block latency lookup table for one device, precision and batch size (see the module docstring).

    ``device`` (default: CUDA when available, else CPU), ``batch_size`` (the original uses 64), ``fp16`` (default:
    on CUDA), ``warmup`` / ``repeats`` (per measurement), ``path`` (a JSON file to load and extend).
    """

    def __init__(self, device: str | torch.device | None = None, batch_size: int = 64, fp16: bool | None = None,
                 warmup: int = 3, repeats: int = 10, path: str | os.PathLike | None = None):
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise RetiaError(f"latency batch_size must be a positive integer, got {batch_size!r}")
        if not isinstance(repeats, int) or repeats < 1 or not isinstance(warmup, int) or warmup < 0:
            raise RetiaError(f"latency warmup/repeats must be integers >= 0 / >= 1, got {warmup!r}/{repeats!r}")
        self.device = torch.device(device if device is not None else ("cuda" if torch.cuda.is_available() else "cpu"))
        if self.device.type == "cuda" and not torch.cuda.is_available():
            raise RetiaError("latency device cuda: no CUDA device is available")
        self.fp16 = (self.device.type == "cuda") if fp16 is None else bool(fp16) and self.device.type == "cuda"
        self.batch_size, self.warmup, self.repeats = batch_size, warmup, repeats
        self.path = Path(path) if path is not None else None
        self._table: dict[str, float] = {}
        self._lock = threading.Lock()
        self.measured = 0  # block measurements made by this object (cache misses)
        self.hits = 0
        if self.path is not None and self.path.exists():
            try:
                data = json.loads(self.path.read_text())
            except json.JSONDecodeError as err:
                raise RetiaError(f"latency table {str(self.path)!r} is not JSON ({err})") from None
            self._table.update({k: float(v) for k, v in data.get("entries", {}).items()})

    # ---- keys and context ---------------------------------------------------------------------------------
    @property
    def context(self) -> str:
        """What a measurement depends on besides the block: device, precision, batch size, CPU threads."""
        if self.device.type == "cuda":
            name = torch.cuda.get_device_name(self.device).replace(" ", "_")
        else:
            name = f"cpu{torch.get_num_threads()}t"
        return f"{name}|{'fp16' if self.fp16 else 'fp32'}|b{self.batch_size}"

    def key(self, block: str, resolution: int) -> str:
        return f"{self.context}|r{resolution}|{block}"

    def __len__(self) -> int:
        return len(self._table)

    def save(self) -> None:
        if self.path is None:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(self.path.suffix + ".tmp")
        with self._lock:
            entries = dict(self._table)
        tmp.write_text(json.dumps({"unit": "seconds per image", "entries": entries}, indent=1, sort_keys=True))
        tmp.replace(self.path)

    # ---- measuring ----------------------------------------------------------------------------------------
    def _time(self, module: nn.Module, resolution: int, in_channels: int) -> float:
        from retia.spaces.zennas.tools import measure_latency

        r = measure_latency(module, self.batch_size, resolution, in_channels=in_channels, device=self.device,
                            fp16=self.fp16, warmup=self.warmup, repeats=self.repeats)
        return float(r["latency_per_image_s"])

    def _lookup(self, key: str, make) -> float:
        with self._lock:
            value = self._table.get(key)
        if value is not None:
            self.hits += 1
            return value
        value = make()
        with self._lock:
            self._table[key] = value
        self.measured += 1
        return value

    def block_latency(self, block: str | zennas.BlockSpec, resolution: int) -> float:
        """Seconds per image of one block (a token such as ``SuperResK3K3(32,64,2,32,1)``) at ``resolution``."""
        spec = zennas.parse_block(block) if isinstance(block, str) else block
        token = spec.to_string()
        return self._lookup(self.key(token, resolution),
                            lambda: self._time(spec.build(), resolution, spec.in_channels))

    def head_latency(self, channels: int, resolution: int, num_classes: int) -> float:
        return self._lookup(self.key(f"Head({channels},{num_classes})", resolution),
                            lambda: self._time(_Head(channels, num_classes), resolution, channels))

    def estimate(self, structure: str, resolution: int, num_classes: int) -> float:
        """Estimated seconds per image of ``build(structure, num_classes)``: the sum of its blocks' and its head's
        table entries (measuring the missing ones now)."""
        specs = zennas.check_channels(structure)
        total, res = 0.0, resolution
        for spec in specs:
            total += self.block_latency(spec, res)
            res = spec.out_resolution(res)
        total += self.head_latency(specs[-1].out_channels, res, num_classes)
        return total

    def measure(self, structure: str, resolution: int, num_classes: int) -> float:
        """Measured seconds per image of the whole network (not cached)."""
        return self._time(zennas.build(structure, num_classes), resolution, zennas.parse(structure)[0].in_channels)

    def validate(self, structures: Iterable[str], resolution: int, num_classes: int) -> dict[str, Any]:
        """Estimate vs whole-network measurement for ``structures``: per network, the ratio estimate/measured, and
        overall the median and worst ``|ratio - 1|`` and the Spearman rank correlation."""
        rows = []
        for s in structures:
            est = self.estimate(s, resolution, num_classes)
            meas = self.measure(s, resolution, num_classes)
            rows.append({"structure": s, "estimate_s": est, "measured_s": meas, "ratio": est / meas})
        errors = [abs(r["ratio"] - 1) for r in rows]
        out: dict[str, Any] = {"networks": rows, "context": self.context,
                               "median_abs_error": statistics.median(errors) if errors else None,
                               "max_abs_error": max(errors) if errors else None}
        if len(rows) >= 2:
            from scipy.stats import spearmanr

            out["spearman"] = float(spearmanr([r["estimate_s"] for r in rows], [r["measured_s"] for r in rows])[0])
        return out


# ---- command line: how good is the estimate on this machine? -------------------------------------------------
def sample_networks(n: int, seed: int = 0, space: str = "XXBL", initial: str = "cifar", steps: int = 4,
                    max_params: float | None = 1e6, resolution: int = 32, num_classes: int = 100) -> list[str]:
    """``n`` networks the way a search meets them: chains of ``steps`` mutations from the initial structure,
    within ``max_params`` (None: any size), all different."""
    import random

    rng = random.Random(seed)
    start = zennas.INITIAL_STRUCTURES.get(initial, initial)
    nets: list[str] = []
    for _ in range(50 * n):
        s = start
        for _ in range(steps):
            s = zennas.mutate(s, space, rng, num_replaces=2)
        ok = max_params is None or zennas.analyze(s, resolution, num_classes)["params"] <= max_params
        if ok and s not in nets:
            nets.append(s)
        if len(nets) == n:
            return nets
    raise RetiaError(f"found only {len(nets)} of {n} distinct networks within {max_params} parameters")


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """``python -m retia.evaluators.zennas_latency`` — validate the lookup table against whole-network timing."""
    import argparse

    from retia.cli import add_threads_arg, positive_int, set_threads

    p = argparse.ArgumentParser(description="Compare Zen-NAS lookup-table latency estimates with whole-network "
                                            "measurements on this device.")
    p.add_argument("--networks", type=positive_int, default=12, help="networks sampled by mutation (default 12)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--space", default="XXBL")
    p.add_argument("--initial", default="cifar", help="cifar, imagenet_flops, imagenet_latency or a string")
    p.add_argument("--resolution", type=positive_int, default=32)
    p.add_argument("--num-classes", type=positive_int, default=100)
    p.add_argument("--max-params", type=float, default=1e6)
    p.add_argument("--batch-size", type=positive_int, default=64)
    p.add_argument("--device", default=None, help="default: cuda (fp16) when available, else cpu")
    p.add_argument("--repeats", type=positive_int, default=10)
    p.add_argument("--table", default=None, help="JSON lookup table to reuse and extend")
    p.add_argument("--json", default=None, help="also write the report to this file")
    add_threads_arg(p)
    args = p.parse_args(argv)
    set_threads(args.threads)
    zennas.get_space(args.space)
    nets = sample_networks(args.networks, args.seed, args.space, args.initial, max_params=args.max_params,
                           resolution=args.resolution, num_classes=args.num_classes)
    table = LatencyTable(device=args.device, batch_size=args.batch_size, repeats=args.repeats, path=args.table)
    report = table.validate(nets, args.resolution, args.num_classes)
    table.save()
    for row in report["networks"]:
        print(f"estimate {row['estimate_s'] * 1e3:8.4f} ms  measured {row['measured_s'] * 1e3:8.4f} ms  "
              f"ratio {row['ratio']:.3f}")
    print(f"{report['context']}: median |estimate/measured - 1| = {report['median_abs_error']:.1%}, "
          f"worst {report['max_abs_error']:.1%}, Spearman {report.get('spearman', float('nan')):.3f} "
          f"over {len(nets)} networks")
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1))
    return report


if __name__ == "__main__":
    from retia.cli import run_main

    run_main(main)
