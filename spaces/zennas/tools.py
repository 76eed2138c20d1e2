"""Command-line tools for Zen-NAS networks: count them, time them, list the zoo.

``python -m retia.spaces.zennas.tools analyze --arch NAME|STRING|FILE [--resolution R] [--num-classes N]``
    parameters / FLOPs / layers as the original ``analyze`` counting (``--json`` for one JSON line).
``python -m retia.spaces.zennas.tools latency --arch ... [--batch-size 64] [--resolution 224] [--fp16]``
    inference latency (eval mode, no grad) after warm-up, per image and per batch; CUDA when there is one.
``python -m retia.spaces.zennas.tools list``
    the published ZenNets.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from typing import Any

import torch
from torch import nn

from retia.cli import positive_int, run_main
from retia.errors import RetiaError

from .model import ZenNet, analyze
from .zoo import list_models, model_info, resolve_arch

__all__ = ["main", "measure_latency"]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.inference_mode()
def measure_latency(model: nn.Module, batch_size: int = 64, resolution: int = 224, *, in_channels: int = 3,
                    device: str | torch.device | None = None, fp16: bool = False, warmup: int = 3,
                    repeats: int = 10, trim: float = 0.2) -> dict[str, Any]:
    """Time ``model`` on a random batch: ``warmup`` untimed passes, then ``repeats`` timed passes.

    Returns ``{"latency_per_image_s", "latency_per_batch_s", "std_per_batch_s", "device", "dtype", ...}``;
    the latency is the mean of the timed passes after dropping the fastest and slowest ``trim`` fraction
    (the original averaged the middle 6 of 10). ``fp16`` (half precision) is used on CUDA only; on a CPU it
    falls back to float32 and says so in ``dtype_note``. The model is moved to ``device`` and put in eval mode.
    """
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RetiaError("--device cuda: no CUDA device is available")
    note = None
    dtype = torch.float32
    if fp16:
        if device.type == "cuda":
            dtype = torch.float16
        else:
            note = "fp16 needs CUDA; measured float32 on the CPU"
    model = model.to(device=device, dtype=dtype).eval()
    x = torch.randn(batch_size, in_channels, resolution, resolution, device=device, dtype=dtype)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    for _ in range(warmup):
        model(x)
    _sync(device)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        model(x)
        _sync(device)
        times.append(time.perf_counter() - t0)
    times.sort()
    k = int(len(times) * trim)
    kept = times[k:len(times) - k] or times
    per_batch = statistics.fmean(kept)
    return {
        "latency_per_image_s": per_batch / batch_size,
        "latency_per_batch_s": per_batch,
        "std_per_batch_s": statistics.pstdev(kept),
        "images_per_s": batch_size / per_batch,
        "batch_size": batch_size,
        "resolution": resolution,
        "device": str(device) if device.type == "cpu" else torch.cuda.get_device_name(device),
        "dtype": str(dtype).replace("torch.", ""),
        "dtype_note": note,
        "warmup": warmup,
        "repeats": repeats,
        "threads": torch.get_num_threads(),
    }


def _human(n: float) -> str:
    for unit, scale in (("G", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.4g}{unit}"
    return f"{n:.4g}"


def _arch_settings(args) -> dict[str, Any]:
    arch = resolve_arch(args.arch)
    resolution = args.resolution or arch["resolution"] or 224
    num_classes = args.num_classes or arch["num_classes"] or 1000
    use_se = args.use_se or bool(arch["use_se"])
    return {**arch, "resolution": resolution, "num_classes": num_classes, "use_se": use_se}


def _cmd_analyze(args) -> None:
    a = _arch_settings(args)
    counts = analyze(a["structure"], a["resolution"], a["num_classes"], use_se=a["use_se"],
                     no_BN=args.no_BN, no_reslink=args.no_reslink)
    if args.json:
        print(json.dumps({"arch": a["name"] or a["structure"], "resolution": a["resolution"],
                          "num_classes": a["num_classes"], "use_se": a["use_se"], **counts}))
        return
    print(f"arch:        {a['name'] or a['structure']}")
    print(f"input:       3x{a['resolution']}x{a['resolution']}, {a['num_classes']} classes"
          + (", SE" if a["use_se"] else ""))
    print(f"params:      {counts['params']} ({_human(counts['params'])})")
    print(f"FLOPs:       {counts['flops']:.0f} ({_human(counts['flops'])} multiply-adds, BN included)")
    print(f"layers:      {counts['layers']}")


def _cmd_latency(args) -> None:
    a = _arch_settings(args)
    if args.threads:
        torch.set_num_threads(args.threads)
    model = ZenNet(a["structure"], a["num_classes"], use_se=a["use_se"])
    try:
        r = measure_latency(model, args.batch_size, a["resolution"], device=args.device, fp16=args.fp16,
                            warmup=args.warmup, repeats=args.repeats)
    except torch.OutOfMemoryError:
        raise RetiaError(f"out of memory at batch size {args.batch_size}, resolution {a['resolution']}: "
                         "try a smaller --batch-size") from None
    if args.json:
        print(json.dumps({"arch": a["name"] or a["structure"], **r}))
        return
    print(f"arch:        {a['name'] or a['structure']}")
    print(f"device:      {r['device']} ({r['dtype']}{', ' + r['dtype_note'] if r['dtype_note'] else ''}; "
          f"{r['threads']} threads)" if r["device"] == "cpu" else f"device:      {r['device']} ({r['dtype']})")
    print(f"input:       {r['batch_size']}x3x{r['resolution']}x{r['resolution']}, "
          f"{r['warmup']} warm-up + {r['repeats']} timed passes")
    print(f"latency:     {r['latency_per_image_s'] * 1e3:.4g} ms/image, {r['latency_per_batch_s'] * 1e3:.4g} ms/batch "
          f"(± {r['std_per_batch_s'] * 1e3:.2g} ms), {r['images_per_s']:.4g} images/s")


def _cmd_list(args) -> None:
    for name in list_models(args.pattern):
        info = model_info(name)
        print(f"{name:42s} {info['num_classes']:5d} classes  res {info['resolution']}"
              + ("  SE" if info["use_se"] else ""))


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m retia.spaces.zennas.tools", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="command", required=True)

    def arch_args(sp):
        sp.add_argument("--arch", required=True, help="a ZenNet name (see 'list'), a structure string or a file")
        sp.add_argument("--resolution", type=positive_int, default=None,
                        help="input side length (default: the ZenNet's, else 224)")
        sp.add_argument("--num-classes", type=positive_int, default=None,
                        help="classifier outputs (default: the ZenNet's, else 1000)")
        sp.add_argument("--use-se", action="store_true", help="SE gates in the residual blocks "
                        "(the published FLOPs-budget ZenNets have them)")
        sp.add_argument("--json", action="store_true", help="print one JSON line")

    a = sub.add_parser("analyze", help="parameters, FLOPs and layers")
    arch_args(a)
    a.add_argument("--no-BN", dest="no_BN", action="store_true", help="count without BatchNorm")
    a.add_argument("--no-reslink", action="store_true", help="count without residual links (as the search scores)")
    a.set_defaults(func=_cmd_analyze)

    lt = sub.add_parser("latency", help="inference latency")
    arch_args(lt)
    lt.add_argument("--batch-size", type=positive_int, default=64)
    lt.add_argument("--fp16", action="store_true", help="half precision (CUDA only)")
    lt.add_argument("--device", default=None, choices=["cpu", "cuda"], help="default: cuda when available")
    lt.add_argument("--warmup", type=positive_int, default=3)
    lt.add_argument("--repeats", type=positive_int, default=10)
    lt.add_argument("--threads", type=positive_int, default=None, help="CPU threads (torch.set_num_threads)")
    lt.set_defaults(func=_cmd_latency)

    ls = sub.add_parser("list", help="the published ZenNets")
    ls.add_argument("pattern", nargs="?", default=None, help="shell pattern, e.g. '*cifar10_*'")
    ls.set_defaults(func=_cmd_list)
    return p


def main(argv: list[str] | None = None) -> None:
    args = _parser().parse_args(argv)
    args.func(args)


if __name__ == "__main__":
    run_main(main, sys.argv[1:])
