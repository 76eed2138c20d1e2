"""Speed of one HR-NAS supernet training step, and of a shrunk subnet, on the CPU (issue 4 §5).

    python benchmarks/hrnas_step.py                          # cpu preset, batch 8, torch's default threads
    python benchmarks/hrnas_step.py --threads 1 --keep 0.5 --repeats 3 --json runs/hrnas_step.json
    python benchmarks/hrnas_step.py --forward both           # also the reference (pre-optimisation) forward
    python benchmarks/hrnas_step.py --no-tokens              # the network the original built (no transformers)
    python benchmarks/hrnas_step.py --original /tmp/HR-NAS   # also dingmyu/HR-NAS's own code on the same network
    python benchmarks/hrnas_step.py --arch runs/x/arch.json  # a searched arch (and its config's supernet)

One step = forward + cross-entropy on the classification head + backward + AdamW step, train mode, on a fixed
random batch (``--batch-size`` 8 of 3 x 64 x 64 for the ``cpu`` preset: the ImageNet layout of the original at
width x0.25, 10 classes). ``--warmup`` steps are run first and not timed; then ``--steps`` steps are timed one by
one, wall (``perf_counter``) and CPU (``process_time``: all threads of the process), and the medians are reported.

The subnet keeps the fraction ``--keep`` of every kernel branch's hidden channels and of every transformer's tokens
(the first ones, ``retia.spaces.hrnas.subnet``: deterministic); its MACs (closed form, ``count_macs``) and its step
time are printed relative to the supernet's, so "faster in proportion to its MACs" can be read off.

Every measurement runs in a fresh child process, so that its memory figures are its own: peak RSS (``ru_maxrss``,
the high-water mark) and its rise over the RSS just before the first step (the model, optimizer and batch already
built). ``--repeats`` alternates the children that many times and reports the median of their medians (the
machine may be shared: the load average is printed too). ``--forward reference`` times
``retia.spaces.hrnas.network.reference_forward`` (the straightforward module-by-module forward the fast one is
tested against: the speed before the optimisations); ``--forward both`` times both.

``--no-tokens`` removes every transformer (the network the original actually built: its ``hrnet.py`` never
passed ``use_transformer``), for a like-for-like comparison with the original's step time.

``--original DIR`` also times the original implementation (a checkout of dingmyu/HR-NAS at DIR; not part of retia,
fetch it yourself) on the same network, in its own child process with the same step, optimizer, threads and batch:
its ``models.hrnet.HighResolutionNet`` built with retia's scaled channels (the original's ``width_mult`` does
nothing, so the channels are passed already scaled, and its last channel too) and, unless ``--no-tokens``, with its
transformers switched on in every block that can hold one (``use_transformer``, which its ``hrnet.py`` never passes,
with the preset's ``max_tokens`` tokens). Its MACs are counted with ``FlopCounterMode`` and printed next to retia's,
so the two networks can be seen to match; the target is then checked against this measurement instead of the
issue's constant.

``--arch FILE`` times a searched architecture (``arch.json`` of a search's run directory, whose ``config`` gives
the supernet) instead of the uniform ``--keep`` subnet.

``--optimizer fused`` (default) is AdamW as retia's training modules build it (``retia.evaluators.optim.adamw``:
the update of all tensors in one kernel); ``loop`` is ``torch.optim.AdamW``'s CPU default, a per-tensor Python
loop (what retia used before; about a third of the supernet's step). ``--profile ROWS`` adds a
torch.profiler table of the supernet's steps (run after the timed ones), sorted by self CPU time.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

REFERENCE_SECONDS = 0.45  # the figure for the original (no transformers) on a 2-core CPU; --original measures it


def _rss_now_mb() -> float:
    """Current resident set size (Linux /proc), else the high-water mark."""
    try:
        pages = int(Path("/proc/self/statm").read_text().split()[1])
        return pages * os.sysconf("SC_PAGE_SIZE") / 2**20
    except (OSError, ValueError, IndexError):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def keep_arch(cfg, keep: float) -> dict[str, int]:
    """Every branch's hidden channels and every transformer's tokens times ``keep``, rounded half up."""
    from retia.spaces import hrnas

    return {k: int(math.floor(v * keep + 0.5)) for k, v in hrnas.full_arch(cfg).items()}


def preset_check(name: str) -> dict:
    """How the preset differs from the original's ImageNet layout (``cls_imagenet``)."""
    from retia.spaces import hrnas

    cfg, base = hrnas.preset(name), hrnas.preset("cls_imagenet")
    return {k: [base[k], cfg[k]] for k in cfg if cfg[k] != base[k]}


ORIGINAL_ACTIVATIONS = {"relu": "nn.ReLU", "relu6": "nn.ReLU6"}


def resolve_network(args: argparse.Namespace) -> tuple[dict, dict | None]:
    """(config, searched arch or None) of the run, every input checked (one-line errors before any child runs)."""
    from retia.errors import RetiaError
    from retia.spaces import hrnas

    if args.original is not None and not (args.original / "models" / "hrnet.py").is_file():
        raise RetiaError(f"--original {args.original}: expected a checkout of dingmyu/HR-NAS "
                         "(models/hrnet.py not found)")
    if args.arch is not None:
        if not args.arch.is_file():
            raise RetiaError(f"--arch {args.arch}: no such file (expected a search's arch.json)")
        cfg, searched = load_searched(args.arch)
        cfg = hrnas.make_config(**cfg)
    else:
        cfg, searched = hrnas.preset(args.preset), None
    if cfg["task"] != "classification":
        raise RetiaError(f"{'--arch' if args.arch else '--preset'}: expected a classification network "
                         f"(the step uses its head), got task {cfg['task']!r}")
    if searched is not None:
        searched = hrnas.check_arch(cfg, searched)
    if args.original is not None:
        if not args.no_tokens and cfg["token_size"] != 8:
            raise RetiaError(f"--original: the original's transformer has 8x8 tokens, the network has "
                             f"{cfg['token_size']} (use --no-tokens)")
        if cfg["active_fn"] not in ORIGINAL_ACTIVATIONS:
            raise RetiaError(f"--original: active_fn {cfg['active_fn']!r} has no counterpart in the original "
                             f"(expected {' or '.join(ORIGINAL_ACTIVATIONS)})")
    return cfg, searched


def original_network(repo: Path, cfg: dict, tokens: bool):
    """dingmyu/HR-NAS's ``HighResolutionNet`` on the network of ``cfg`` (channels scaled as retia scales them),
    with its transformers switched on when ``tokens``."""
    from retia.spaces.hrnas.network import make_divisible

    sys.path.insert(0, str(repo))
    from models import hrnet
    from models import mobilenet_base as mb

    w, r = cfg["width_mult"], cfg["round_nearest"]
    scale = lambda c: make_divisible(c * w, r)  # noqa: E731
    if tokens:
        plain_init = mb.InvertedResidualChannels.__init__

        def with_transformer(self, *a, **k):
            k["use_transformer"] = True
            mb.transformer_dict = [cfg["max_tokens"]]  # read (and popped) by a block that takes a transformer
            plain_init(self, *a, **k)

        mb.InvertedResidualChannels.__init__ = with_transformer
    act = ORIGINAL_ACTIVATIONS[cfg["active_fn"]]
    return hrnet.HighResolutionNet(
        num_classes=cfg["num_classes"], input_size=cfg["input_size"], input_stride=4,
        input_channel=[scale(c) for c in cfg["input_channel"]], last_channel=scale(cfg["last_channel"]),
        head_channels=[scale(c) for c in cfg["head_channels"]], bn_momentum=cfg["bn_momentum"],
        bn_epsilon=cfg["bn_eps"], dropout_ratio=cfg["dropout"], active_fn=act, width_mult=1.0,
        round_nearest=r, expand_ratio=cfg["expand_ratio"], kernel_sizes=list(cfg["kernel_sizes"]),
        inverted_residual_setting=[[n, list(b), [scale(c) for c in ch]] for n, b, ch in cfg["stages"]],
        task="classification")


def counted_macs(net, x) -> int:
    """Multiply-adds of one eval forward of one sample (``FlopCounterMode`` FLOPs / 2)."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    was = net.training
    net.eval()
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        net(x[:1])
    net.train(was)
    return counter.get_total_flops() // 2


def load_searched(path: Path) -> tuple[dict, dict]:
    """(config, arch) of a search's ``arch.json``."""
    from retia.errors import RetiaError

    try:
        data = json.loads(path.read_text())
        cfg, arch = data["config"], data["arch"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise RetiaError(f"--arch {path}: expected a search's arch.json with 'config' and 'arch' ({e})") from None
    if not isinstance(cfg, dict) or not isinstance(arch, dict):
        raise RetiaError(f"--arch {path}: expected 'config' and 'arch' to be JSON objects")
    return cfg, arch


def measure(args: argparse.Namespace, which: str, forward: str, cfg: dict, searched: dict | None) -> dict:
    """One child's measurement (runs in this process)."""
    import torch
    import torch.nn.functional as F

    from retia.profile import count_params
    from retia.spaces import hrnas
    from retia.spaces.hrnas import network as hnet

    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    arch = hrnas.full_arch(cfg)
    if args.no_tokens:
        arch = {k: 0 if k.endswith(".tokens") else v for k, v in arch.items()}
    if which == "original":
        net = original_network(args.original, cfg, tokens=not args.no_tokens)
    else:
        net = hrnas.HRNet(cfg, arch)
    if which == "subnet":
        target = searched if searched is not None else keep_arch(cfg, args.keep)
        arch = {k: min(v, arch[k]) for k, v in target.items()}
        net = hrnas.subnet(net, arch)
    if args.memory_format != "auto" and which != "original":
        net.channels_last = args.memory_format == "channels_last"
    net.train()
    h, w = hnet.input_hw(cfg)
    g = torch.Generator().manual_seed(args.seed)
    x = torch.randn(args.batch_size, 3, h, w, generator=g)
    y = torch.randint(0, cfg["num_classes"], (args.batch_size,), generator=g)
    if args.optimizer == "fused":
        from retia.evaluators.optim import adamw

        opt = adamw(net.parameters(), lr=1e-3, weight_decay=0.01)
    else:
        opt = torch.optim.AdamW(net.parameters(), lr=1e-3, weight_decay=0.01, foreach=False)

    def step():
        opt.zero_grad(set_to_none=True)
        loss = F.cross_entropy(net(x), y)
        loss.backward()
        opt.step()
        return loss

    ctx = hnet.reference_forward() if forward == "reference" and which != "original" else contextlib.nullcontext()
    with ctx:
        rss_before = _rss_now_mb()
        walls, cpus = [], []
        for i in range(args.warmup + args.steps):
            t0, c0 = time.perf_counter(), time.process_time()
            loss = step()
            t1, c1 = time.perf_counter(), time.process_time()
            if i >= args.warmup:
                walls.append(t1 - t0)
                cpus.append(c1 - c0)
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        table = None
        if args.profile and which == "supernet":
            from torch.profiler import ProfilerActivity, profile

            with profile(activities=[ProfilerActivity.CPU]) as prof:
                for _ in range(3):
                    step()
            table = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=args.profile,
                                              max_name_column_width=60)
    counted = counted_macs(net, x)
    return {"model": which, "forward": forward, "params": count_params(net), "counted_macs": counted,
            "macs": counted if which == "original" else hrnas.count_macs(cfg, arch),
            "wall_s": statistics.median(walls), "cpu_s": statistics.median(cpus), "wall_steps": walls,
            "cpu_steps": cpus, "peak_rss_mb": peak, "rss_before_mb": rss_before, "rss_rise_mb": peak - rss_before,
            "threads": torch.get_num_threads(), "loss": float(loss), "loadavg": os.getloadavg()[0],
            "profile": table}


def child_failure(which: str, returncode: int, stderr: str) -> str:
    """One line saying why a measurement's child failed: its exit status and the last line of its stderr (the
    exception), not the whole traceback."""
    lines = [x.strip() for x in stderr.splitlines() if x.strip()]
    why = lines[-1] if lines else "no error output, and no RESULT line on stdout"
    return f"the {which} measurement failed (exit status {returncode}): {why}"


def run_child(args: argparse.Namespace, which: str, forward: str) -> dict:
    cmd = [sys.executable, __file__, "--_child", which, "--forward", forward, "--preset", args.preset,
           "--batch-size", str(args.batch_size), "--steps", str(args.steps), "--warmup", str(args.warmup),
           "--keep", str(args.keep), "--optimizer", args.optimizer, "--memory-format", args.memory_format,
           "--seed", str(args.seed), "--profile", str(args.profile)] + (["--no-tokens"] if args.no_tokens else [])
    if args.original:
        cmd += ["--original", str(args.original)]
    if args.arch:
        cmd += ["--arch", str(args.arch)]
    if args.threads:
        cmd += ["--threads", str(args.threads)]
    out = subprocess.run(cmd, capture_output=True, text=True)
    lines = [line for line in out.stdout.splitlines() if line.startswith("RESULT ")]
    if out.returncode != 0 or not lines:
        raise SystemExit(child_failure(which, out.returncode, out.stderr))
    return json.loads(lines[-1][len("RESULT "):])


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--preset", default="cpu", help="HR-NAS preset (classification), default cpu")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--steps", type=int, default=20, help="timed steps per measurement (median reported)")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps first")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's, i.e. all cores)")
    p.add_argument("--keep", type=float, default=0.5, help="fraction of channels / tokens the subnet keeps "
                                                           "(0 = no subnet)")
    p.add_argument("--optimizer", choices=["fused", "loop"], default="fused",
                   help="AdamW fused (retia's) or its per-tensor loop")
    p.add_argument("--forward", choices=["fast", "reference", "both"], default="fast")
    p.add_argument("--memory-format", choices=["auto", "channels_last", "contiguous"], default="auto",
                   help="fast forward's memory format (auto: channels-last on the CPU)")
    p.add_argument("--no-tokens", action="store_true",
                   help="supernet without its transformers (every '.tokens' 0): the network the original built")
    p.add_argument("--repeats", type=int, default=1, help="fresh processes per measurement (median of medians)")
    p.add_argument("--profile", type=int, default=0, help="print a profiler table with this many rows")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", type=Path, default=None, help="write the figures to this file")
    p.add_argument("--original", type=Path, default=None,
                   help="a checkout of dingmyu/HR-NAS: also time its code on the same network")
    p.add_argument("--arch", type=Path, default=None,
                   help="a search's arch.json: time that arch (and its config's supernet) instead of --keep")
    p.add_argument("--_child", choices=["supernet", "subnet", "original"], default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)

    from retia.errors import RetiaError

    if args.batch_size < 1 or args.steps < 1 or args.warmup < 0 or args.repeats < 1:
        raise RetiaError("--batch-size, --steps and --repeats must be >= 1, --warmup >= 0")
    if not 0.0 <= args.keep <= 1.0:
        raise RetiaError(f"--keep {args.keep}: expected a fraction in [0, 1]")
    cfg, searched = resolve_network(args)
    if args._child:
        result = measure(args, args._child, args.forward, cfg, searched)
        print("RESULT " + json.dumps(result), flush=True)
        return result

    forwards = ["reference", "fast"] if args.forward == "both" else [args.forward]
    models = ["supernet"] + (["subnet"] if args.keep > 0 or args.arch else [])
    runs: dict[tuple[str, str], list[dict]] = {(f, m): [] for f in forwards for m in models}
    if args.original:
        runs[("original", "original")] = []
    for r in range(args.repeats):
        for f, m in runs:
            runs[(f, m)].append(run_child(args, m, "fast" if m == "original" else f))
            print(f"  run {r + 1}/{args.repeats} {f:9s} {m:8s}: wall {runs[(f, m)][-1]['wall_s']:.3f} s, "
                  f"CPU {runs[(f, m)][-1]['cpu_s']:.3f} s (load {runs[(f, m)][-1]['loadavg']:.1f})",
                  file=sys.stderr, flush=True)

    summary: dict = {"preset": args.preset, "differs_from_cls_imagenet": preset_check(args.preset),
                     "batch_size": args.batch_size, "steps": args.steps, "warmup": args.warmup,
                     "repeats": args.repeats, "optimizer": args.optimizer, "keep": args.keep,
                     "memory_format": args.memory_format, "no_tokens": args.no_tokens,
                     "reference_original_s": REFERENCE_SECONDS, "arch": str(args.arch) if args.arch else None,
                     "results": {}}
    import torch

    summary["torch"] = torch.__version__
    cfg_note = ", ".join(f"{k} {a}->{b}" for k, (a, b) in summary["differs_from_cls_imagenet"].items())
    threads = runs[(forwards[0], "supernet")][0]["threads"]
    summary["threads"] = threads
    what = f"searched arch {args.arch} and its supernet" if args.arch else \
        f"preset {args.preset} (cls_imagenet with {cfg_note})"
    print(f"HR-NAS training step: {what}"
          f"{', transformers removed' if args.no_tokens else ''}, batch {args.batch_size}, "
          f"{args.optimizer}, {threads} thread(s), median of {args.steps} steps after {args.warmup} warm-up, "
          f"{args.repeats} process(es) each")
    print(f"{'forward':9s} {'model':10s} {'MACs':>8s} {'params':>8s} {'wall s':>7s} {'CPU s':>7s} "
          f"{'peak RSS MB':>11s} {'rise MB':>8s}")
    for f in forwards + (["original"] if args.original else []):
        res = {}
        for m in (["original"] if f == "original" else models):
            rs = runs[(f, m)]
            agg = {"macs": rs[0]["macs"], "params": rs[0]["params"],
                   "wall_s": statistics.median(r["wall_s"] for r in rs),
                   "cpu_s": statistics.median(r["cpu_s"] for r in rs),
                   "peak_rss_mb": statistics.median(r["peak_rss_mb"] for r in rs),
                   "rss_rise_mb": statistics.median(r["rss_rise_mb"] for r in rs),
                   "runs": [{k: v for k, v in r.items() if k != "profile"} for r in rs]}
            res[m] = agg
            label = {"supernet": "supernet", "original": "supernet"}.get(m, "searched" if args.arch else
                                                                          f"keep {args.keep:g}")
            print(f"{f:9s} {label:10s} {agg['macs'] / 1e6:7.1f}M {agg['params'] / 1e6:7.2f}M {agg['wall_s']:7.3f} "
                  f"{agg['cpu_s']:7.3f} {agg['peak_rss_mb']:11.0f} {agg['rss_rise_mb']:8.0f}")
        if "subnet" in res:
            s, b = res["subnet"], res["supernet"]
            res["ratios"] = {"macs": s["macs"] / b["macs"], "wall": s["wall_s"] / b["wall_s"],
                             "cpu": s["cpu_s"] / b["cpu_s"]}
            print(f"{f:9s} subnet / supernet: MACs {res['ratios']['macs']:.2f}, wall {res['ratios']['wall']:.2f}, "
                  f"CPU {res['ratios']['cpu']:.2f}")
        summary["results"][f] = res
    if args.forward == "both":
        ref, fast = summary["results"]["reference"]["supernet"], summary["results"]["fast"]["supernet"]
        summary["speedup"] = {"wall": ref["wall_s"] / fast["wall_s"], "cpu": ref["cpu_s"] / fast["cpu_s"]}
        print(f"fast forward vs reference (supernet): wall x{summary['speedup']['wall']:.2f}, "
              f"CPU x{summary['speedup']['cpu']:.2f}")
    best = summary["results"][forwards[-1]]["supernet"]["wall_s"]
    if args.original:
        orig = summary["results"]["original"]["original"]
        ours = summary["results"][forwards[-1]]["supernet"]
        summary["meets_reference"] = best <= orig["wall_s"]
        summary["vs_original"] = {"wall": orig["wall_s"] / best, "cpu": orig["cpu_s"] / ours["cpu_s"],
                                  "macs": ours["macs"] / orig["macs"]}
        print(f"original's supernet step, measured ({orig['wall_s']:.3f} s, {orig['macs'] / 1e6:.1f}M MACs counted): "
              f"{'met' if summary['meets_reference'] else 'not met'} ({forwards[-1]} supernet wall {best:.3f} s, "
              f"x{summary['vs_original']['wall']:.2f} wall, x{summary['vs_original']['cpu']:.2f} CPU)")
    else:
        summary["meets_reference"] = best <= REFERENCE_SECONDS
        print(f"original's supernet step {REFERENCE_SECONDS} s (the issue's figure; --original measures it): "
              f"{'met' if summary['meets_reference'] else 'not met'} ({forwards[-1]} supernet wall {best:.3f} s)")
    if args.profile:
        for f in forwards:
            table = runs[(f, "supernet")][0]["profile"]
            if table:
                print(f"\nprofile, {f} forward, 3 supernet steps, by self CPU time:\n{table}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(summary, indent=1) + "\n")
    return summary


if __name__ == "__main__":
    from retia.cli import run_main

    run_main(main)
