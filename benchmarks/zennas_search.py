"""Speed of the Zen-NAS search: the CIFAR params-1M Zen-score search, per iteration, against the original code.

    python benchmarks/zennas_search.py --iterations 500 --seed 0 [--dedup] [--threads N]
    python benchmarks/zennas_search.py --iterations 500 --seed 0 --original /tmp/ZenNAS   # also run idstcv/ZenNAS

Runs retia's search exactly as ``experiments/zennas_search.py --config cifar_params1M_zen`` does — NNI experiment,
sequential engine, the ``ZenNASEvolution`` strategy with its per-iteration checkpoint and trials log — with the
original script's settings: batch 64, resolution 32, 100 classes, population 512, max_layers 18, params <= 1M,
the fixed initial structure, the original mutation, Zen-score. Dedup is off unless ``--dedup`` (the original has
none). Prints seconds per iteration, the best Zen-score and the peak memory (RSS high-water mark of the process).

``--original DIR`` also runs the original ``evolution_search.main`` from a checkout of idstcv/ZenNAS at DIR
(not part of retia; fetch it yourself) in a child process with the same settings, on the CPU: the only changes
are that ``nn.Module.cuda`` is a no-op (the original calls ``.cuda(gpu)`` unconditionally), a stand-in for the
removed ``torch._six`` module, and that each candidate list its ``gen_search_space`` returns is put in retia's
order. The original builds those lists with ``list(set(...))``, so their order (and with it the block that
``random.choice`` picks) follows the string hash seed; in retia's order, the same seed makes both searches walk
the *same* mutations — the same structures proposed, rejected and scored at every iteration — so the per-seed
speed-up compares equal work. The walks are checked to be identical (the populations are compared) and the
time spent re-ordering (a sort per list, ~6 ms per iteration) is subtracted from the original's time. Its torch
threads are left at the default unless ``--original-threads``.

Wall time per iteration depends on whatever else runs on the machine; CPU time per iteration (all threads of the
search process) much less, so both are printed and the speed-up is given for both.
"""
from __future__ import annotations

import argparse
import inspect
import json
import os
import resource
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

SETTINGS = {"proxy": "zen", "space": "XXBL", "initial": "cifar", "budget_params": 1e6, "budget_flops": None,
            "budget_latency": None, "max_layers": 18, "batch_size": 64, "resolution": 32, "num_classes": 100,
            "population_size": 512, "fix_initialize": True, "origin": True, "gamma": 1e-2,
            "latency_batch_size": 64, "latency_table": None, "latency_check_every": 0, "latency_device": None,
            "device": "cpu", "channels_last": True, "parallel_passes": None, "release_memory": True}

_ORIGINAL_RUNNER = textwrap.dedent("""
    import os, sys, time, random, resource, types, collections.abc
    sys.path.insert(0, {repo!r})
    import numpy as np, torch
    if {threads}:
        torch.set_num_threads({threads})
    torch.nn.Module.cuda = lambda self, device=None: self  # the original calls .cuda(gpu) even without a GPU
    six = types.ModuleType('torch._six'); six.container_abcs = collections.abc; six.string_classes = (str, bytes)
    six.int_classes = int; sys.modules['torch._six'] = six  # removed from torch, imported by the original's geffnet
    random.seed({seed}); np.random.seed({seed}); torch.manual_seed({seed})
    os.chdir({repo!r})
    import evolution_search as es
    import global_utils
    {retia_order_source}
    reorder_seconds = [0.0]
    load = global_utils.load_py_module_from_path

    def load_in_retia_order(*a, **k):  # the search-space module, its candidate lists in retia's order
        module = load(*a, **k)
        gen, names = module.gen_search_space, [t.__name__ for g in module.seach_space_block_type_list_list for t in g]

        def gen_search_space(block_list, block_id):
            lists = gen(block_list, block_id)
            t = time.perf_counter()
            lists = retia_order(lists, names)
            reorder_seconds[0] += time.perf_counter() - t
            return lists
        module.gen_search_space = gen_search_space
        return module
    global_utils.load_py_module_from_path = load_in_retia_order
    save = {save!r}
    open(os.path.join(save, 'init_plainnet.txt'), 'w').write({initial!r})
    argv = ['evolution_search.py', '--zero_shot_score', 'Zen', '--search_space', 'SearchSpace/search_space_XXBL.py',
            '--budget_model_size', '1e6', '--max_layers', '18', '--batch_size', '64', '--input_image_size', '32',
            '--plainnet_struct_txt', os.path.join(save, 'init_plainnet.txt'), '--num_classes', '100',
            '--evolution_max_iter', '{iterations}', '--population_size', '512', '--save_dir', save]
    args = es.parse_cmd_options(argv)
    t0 = time.perf_counter()
    ru0 = resource.getrusage(resource.RUSAGE_SELF); cpu0 = ru0.ru_utime + ru0.ru_stime; rss0 = ru0.ru_maxrss / 1024
    structures, scores, _ = es.main(args, argv)
    dt = time.perf_counter() - t0 - reorder_seconds[0]
    ru = resource.getrusage(resource.RUSAGE_SELF)
    import json
    open(os.path.join(save, 'population.json'), 'w').write(json.dumps(structures))
    print('RESULT', dt, max(scores), len(structures), torch.get_num_threads(), ru.ru_maxrss / 1024,
          ru.ru_utime + ru.ru_stime - cpu0 - reorder_seconds[0], rss0, reorder_seconds[0])
""")


def retia_order(lists: list[list[str]], type_names: list[str]) -> list[list[str]]:
    """Each candidate list sorted as retia's ``SearchSpace`` builds it: block type in the space's order, then
    output channels, sub-layers and bottleneck channels, each descending (``Name(in,out,stride[,btl,sub])``)."""
    rank = {name: i for i, name in enumerate(type_names)}

    def key(block: str):
        name, _, args = block.partition("(")
        v = [int(x) for x in args.rstrip(")").split(",")]
        return (rank.get(name, -1), -v[1]) + ((-v[4], -v[3]) if len(v) == 5 else ())
    return [sorted(lst, key=key) for lst in lists]


def common_prefix(a: list[str], b: list[str]) -> int:
    """How many leading entries two lists share."""
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def original_failure(repo: str, returncode: int, stderr: str) -> str:
    """One line saying why the original's child failed: its exit status and the last line of its stderr (the
    exception), not the whole traceback."""
    lines = [x.strip() for x in stderr.splitlines() if x.strip()]
    why = lines[-1] if lines else "no error output, and no RESULT line on stdout"
    return (f"--original {repo!r}: the original's search failed (exit status {returncode}): {why} "
            "(expected a working checkout of idstcv/ZenNAS)")


def run_original(repo: str, iterations: int, seed: int, threads: int) -> dict:
    from retia.spaces.zennas import INITIAL_STRUCTURES

    if not (Path(repo) / "evolution_search.py").is_file():
        raise SystemExit(f"--original {repo!r}: expected a checkout of idstcv/ZenNAS (evolution_search.py)")
    with tempfile.TemporaryDirectory() as save:
        order_source = inspect.getsource(retia_order)
        code = _ORIGINAL_RUNNER.format(repo=str(Path(repo).resolve()), threads=threads, seed=seed, save=save,
                                       initial=INITIAL_STRUCTURES["cifar"], iterations=iterations,
                                       retia_order_source=order_source)
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
        line = [x for x in out.stdout.splitlines() if x.startswith("RESULT")]
        if out.returncode != 0 or not line:
            raise SystemExit(original_failure(repo, out.returncode, out.stderr))
        structures = json.loads((Path(save) / "population.json").read_text())
    dt, best, population, nthreads, rss, cpu, rss0, reorder = line[-1].split()[1:]
    return {"seconds": float(dt), "s_per_iteration": float(dt) / iterations, "best_score": float(best),
            "population": int(population), "threads": int(nthreads), "peak_rss_mib": float(rss),
            "cpu_s_per_iteration": float(cpu) / iterations, "start_rss_mib": float(rss0),
            "reorder_seconds": float(reorder), "structures": structures}


def _cpu_seconds() -> float:
    """CPU time of this process, all threads (less sensitive than wall time to other jobs on the machine)."""
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return ru.ru_utime + ru.ru_stime


def run_retia(iterations: int, seed: int, dedup: bool, channels_last: bool, release_memory: bool = True,
              parallel: bool | None = None) -> dict:
    """retia's search; the thread count is the process's torch thread budget at the start."""
    import logging

    import torch

    from retia.experiments.zennas_search import make_experiment, make_strategy
    from retia.results import RunDir
    from retia.spaces import zennas

    logging.getLogger("nni").setLevel(logging.WARNING)
    threads = torch.get_num_threads()  # the scorer may split it between its two passes
    settings = dict(SETTINGS, initial=zennas.INITIAL_STRUCTURES["cifar"], max_iterations=iterations, seed=seed,
                    dedup=dedup, channels_last=channels_last, parallel_passes=parallel,
                    release_memory=release_memory)
    with tempfile.TemporaryDirectory() as tmp:
        run = RunDir(Path(tmp) / "run")
        strategy = make_strategy(settings, run)
        experiment = make_experiment(settings, strategy, Path(tmp) / "nni")
        rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        start, cpu0 = time.perf_counter(), _cpu_seconds()
        experiment.run()
        seconds, cpu = time.perf_counter() - start, _cpu_seconds() - cpu0
        experiment.stop()
    best = strategy.best()
    return {"seconds": seconds, "s_per_iteration": seconds / iterations, "cpu_s_per_iteration": cpu / iterations,
            "best_score": best["score"],
            "best_structure": best["structure"], "counts": strategy.counts, "threads": threads,
            "structures": [r["structure"] for r in strategy.population],
            "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "start_rss_mib": rss0}


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--iterations", type=int, default=500)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=0,
                   help="torch threads for retia's search (default 0: torch's default, all cores, as the original)")
    p.add_argument("--dedup", action="store_true", help="never score a structure twice (the Adlik fork)")
    p.add_argument("--no-channels-last", dest="channels_last", action="store_false")
    p.add_argument("--intra-op", dest="parallel", action="store_false", default=None,
                   help="with --threads >= 2: split each operation over the threads instead of running the two "
                        "Zen-score passes side by side")
    p.add_argument("--no-memory-release", dest="release_memory", action="store_false",
                   help="do not give freed heap memory back to the OS after each candidate (glibc malloc_trim)")
    p.add_argument("--original", default=None, help="path of an idstcv/ZenNAS checkout to run for comparison")
    p.add_argument("--original-threads", type=int, default=0, help="torch threads of the original (0: default)")
    p.add_argument("--json", default=None, help="also write the results to this JSON file")
    args = p.parse_args(argv)
    import warnings

    warnings.filterwarnings("ignore")
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    results = {"iterations": args.iterations, "seed": args.seed}
    if args.original:
        o = run_original(args.original, args.iterations, args.seed, args.original_threads)
        results["original"] = o
        print(f"original (idstcv/ZenNAS, {o['threads']} threads): {o['s_per_iteration']:.4f} s/iteration "
              f"({o['cpu_s_per_iteration']:.4f} CPU-s), best Zen-score {o['best_score']:.4f}, peak RSS {o['peak_rss_mib']:.0f} MiB "
              f"(+{o['peak_rss_mib'] - o['start_rss_mib']:.0f} over the {o['start_rss_mib']:.0f} MiB after imports)")
    r = run_retia(args.iterations, args.seed, args.dedup, args.channels_last, args.release_memory, args.parallel)
    results["retia"] = r
    c = r["counts"]
    print(f"retia ({r['threads']} thread{'s' if r['threads'] > 1 else ''}, dedup {'on' if args.dedup else 'off'}): "
          f"{r['s_per_iteration']:.4f} s/iteration ({r['cpu_s_per_iteration']:.4f} CPU-s), best Zen-score {r['best_score']:.4f}, "
          f"peak RSS {r['peak_rss_mib']:.0f} MiB (+{r['peak_rss_mib'] - r['start_rss_mib']:.0f} over the "
          f"{r['start_rss_mib']:.0f} MiB after imports)  (scored {c['evaluated']}, reused {c['reused']}, rejected "
          f"{sum(v for k, v in c.items() if k.startswith('rejected_'))} of {args.iterations} iterations)")
    if args.original:
        o = results["original"]
        print(f"speed-up: {o['s_per_iteration'] / r['s_per_iteration']:.2f}x wall, "
              f"{o['cpu_s_per_iteration'] / r['cpu_s_per_iteration']:.2f}x CPU time")
        same = common_prefix(o["structures"], r["structures"])
        results["same_walk"] = same == len(o["structures"]) == len(r["structures"])
        print(f"same walk: {'yes' if results['same_walk'] else 'NO'} (the first {same} structures scored are "
              f"identical; original {len(o['structures'])}, retia {len(r['structures'])})")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    return results


if __name__ == "__main__":
    main()
