"""Zen-NAS search: the structure-string NNI space, the fast scorer, the evolution strategy (budgets, dedup,
initialisation, both mutations, the exact original loop), latency tables, checkpoints and resume, parallel trials."""
import json
import os
import random
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

import nni
from retia.errors import RetiaError
from retia.evaluators import zero_shot
from retia.evaluators.zennas_latency import LatencyTable
from retia.evaluators.zennas_scoring import (FAILED_SCORE, ZenNASScorer, candidate_seed, chain_plan, fast_zen_score,
                                             score_structure)
from retia.experiments import zennas_search
from retia.spaces import zennas
from retia.spaces.zennas_nni import StructureString, ZenNASModelSpace
from retia.strategies.zennas_evolution import TrialLog, ZenNASEvolution

ROOT = Path(__file__).resolve().parents[1]
SEARCH = [sys.executable, str(ROOT / "experiments" / "zennas_search.py")]
INIT = zennas.INITIAL_STRUCTURES["cifar"]
# small and fast: batch 4 at 16x16 keeps a candidate's score to a few milliseconds
FAST = {"batch_size": 4, "resolution": 16}
MID = zennas.structure_of("zennet_cifar10_model_size05M_res32")


def settings(**kw):
    s = dict(zennas_search.DEFAULTS, initial=INIT, population_size=6, max_iterations=40, device="cpu", **FAST)
    s.update(kw)
    return s


def run_search(tmp_path, run=None, hooks=(), strategy=None, **kw):
    """A search through NasExperiment on the sequential engine; returns the strategy."""
    from retia.results import RunDir

    resume = kw.pop("resume", False)
    s = settings(**kw)
    rundir = RunDir(tmp_path / "run", resume=resume) if run is None else run
    strategy = strategy or zennas_search.make_strategy(s, rundir, resume=resume, hooks=hooks, fsync=False)
    experiment = zennas_search.make_experiment(s, strategy, tmp_path / "nni")
    try:
        experiment.run()
    finally:
        experiment.stop()
    return strategy


def trials(path):
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def strip(records):
    """Records without their timing."""
    return [{k: v for k, v in r.items() if k not in ("seconds", "finished")} for r in records]


# ---- the space -------------------------------------------------------------------------------------------------


def test_space_has_one_structure_mutable_and_freezes_to_a_zennet():
    space = ZenNASModelSpace("XXBL", INIT, num_classes=10)
    simplified = space.simplify()
    assert list(simplified) == ["structure"] and isinstance(simplified["structure"], StructureString)
    net = space.freeze({"structure": MID})
    assert isinstance(net, zennas.ZenNet) and net.structure == MID and net.head.out_features == 10
    assert space.contains({"structure": MID})
    assert not space.contains({"structure": "SuperConvK3BNRELU(3,8,1,1)SuperResK3K3(16,16,1,8,1)"})  # channels
    assert not space.contains({"structure": 5}) and not space.contains({})
    s = simplified["structure"].random(random_state=np.random.RandomState(0))
    assert space.contains({"structure": s}) and s.startswith("SuperConvK3BNRELU(3,32,2,1)")
    # the training-service format: the space travels by its constructor arguments
    from nni.nas.space import SimplifiedModelSpace

    frozen = SimplifiedModelSpace.from_model(space, None).freeze({"structure": MID})
    again = nni.load(nni.dump(frozen))
    assert again.executable_model().structure == MID


def test_bad_space_arguments_are_one_line_errors():
    with pytest.raises(RetiaError, match="unknown search space 'XYZ'"):
        ZenNASModelSpace("XYZ")
    with pytest.raises(RetiaError, match="bad structure"):
        StructureString(initial="nonsense")


# ---- scoring ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("structure", [INIT, MID])
def test_fast_zen_score_is_the_zen_score(structure):
    model = zennas.build(structure, 100, no_reslink=True)
    ref = zero_shot.zen_score(model, 16, 4, seed=3, repeat=2)
    assert fast_zen_score(structure, 16, 4, repeat=2, seed=3, channels_last=False) == ref  # bit for bit
    assert fast_zen_score(structure, 16, 4, repeat=2, seed=3) == pytest.approx(ref, abs=0.1)  # float32 rounding
    assert fast_zen_score(structure, 16, 4, repeat=2, seed=3, parallel=True) == pytest.approx(ref, abs=0.1)
    assert fast_zen_score(structure, 16, 4, seed=3) != fast_zen_score(structure, 16, 4, seed=4)


def test_structures_the_chain_cannot_model_fall_back_to_the_module():
    # an SE block is not a conv/BN/ReLU chain: the scorer builds the module and gives zen_score's value
    s = "SuperConvK3BNRELU(3,8,1,1)Sequential(ConvKX(8,8,3,1)SE(8))SuperConvK1BNRELU(8,16,1,1)"
    assert chain_plan(s) is None
    ref = zero_shot.zen_score(zennas.build(s, 100, no_reslink=True), 16, 4, seed=1)
    assert fast_zen_score(s, 16, 4, seed=1, channels_last=False) == ref


def test_freed_memory_is_trimmed_once_resident_memory_grew_by_the_kept_amount(monkeypatch):
    import retia.evaluators.zennas_scoring as zs

    trims, rss = [], [100 << 20]

    class FakeLibc:
        def malloc_trim(self, pad):
            trims.append(pad)
            return 1

    monkeypatch.setattr(zs, "_libc", FakeLibc())
    monkeypatch.setattr(zs, "_rss_after_trim", None)
    monkeypatch.setattr(zs, "resident_bytes", lambda: rss[0])
    assert zs.release_freed_memory(64 << 20) is True and trims == [0]  # first call: trims, takes the baseline
    rss[0] = 150 << 20
    assert zs.release_freed_memory(64 << 20) is False and trims == [0]  # grew 50 MiB, 64 may
    rss[0] = 170 << 20
    assert zs.release_freed_memory(64 << 20) is True and len(trims) == 2  # grew 70 MiB: trim, new baseline
    assert zs.release_freed_memory(64 << 20) is False and len(trims) == 2
    assert zs.release_freed_memory() is True and len(trims) == 3  # keep_bytes=0: always


def test_trial_log_syncs_to_disk_only_when_asked(tmp_path, monkeypatch):
    from retia.strategies.zennas_evolution import TrialLog

    synced = []
    monkeypatch.setattr(os, "fsync", lambda fd: synced.append(fd))
    TrialLog(tmp_path / "a.jsonl").append({"trial": 1})
    assert synced == []
    TrialLog(tmp_path / "b.jsonl", fsync=True).append({"trial": 1})
    assert len(synced) == 1
    assert (tmp_path / "a.jsonl").read_text() == '{"trial": 1}\n'  # flushed without a sync


def test_resident_bytes_reads_proc():
    import retia.evaluators.zennas_scoring as zs

    if not os.path.exists("/proc/self/statm"):
        pytest.skip("needs /proc (Linux)")
    before = zs.resident_bytes()
    block = bytearray(64 << 20)  # touched: resident
    assert zs.resident_bytes() - before >= 60 << 20
    del block


def test_every_proxy_scores_a_structure_and_failures_are_the_original_value(monkeypatch):
    seed = candidate_seed(INIT, 0)
    assert candidate_seed(INIT, 0) == seed != candidate_seed(INIT, 1) and candidate_seed(INIT, None) is None
    counts = zennas.analyze(INIT, 16, 100, no_reslink=True)
    assert score_structure(INIT, "flops", seed=0, **FAST) == counts["flops"]
    assert score_structure(INIT, "Params", seed=0, **FAST) == counts["params"]
    assert score_structure(INIT, "random", seed=0, **FAST) == np.random.RandomState(seed).randn()
    assert score_structure(INIT, "zen", seed=0, **FAST) == pytest.approx(
        zero_shot.zen_score(zennas.build(INIT, 100, no_reslink=True), 16, 4, seed=seed), abs=0.1)
    for proxy in ("gradnorm", "naswot", "synflow", "te_nas"):
        value = score_structure(INIT, proxy, seed=0, **FAST)
        assert np.isfinite(value) and value == score_structure(INIT, proxy, seed=0, **FAST)  # reproducible

    def boom(*a, **k):
        raise RuntimeError("out of memory")

    monkeypatch.setattr("retia.evaluators.zennas_scoring.fast_zen_score", boom)
    assert score_structure(INIT, "zen", seed=0, **FAST) == FAILED_SCORE
    with pytest.raises(RetiaError, match="unknown zero-shot proxy 'zenn'"):
        ZenNASScorer("zenn")


def test_scorer_reports_to_nni_and_reads_the_sample():
    scorer = ZenNASScorer("zen", seed=0, **FAST)
    payload = nni.load(nni.dump(scorer))  # serialisable for trial processes
    assert payload.trace_kwargs == scorer.trace_kwargs
    assert scorer(zennas.build(INIT, 100)) == scorer(INIT) == score_structure(INIT, "zen", seed=0, device="cpu",
                                                                               **FAST)
    with pytest.raises(RetiaError, match="structure string"):
        scorer._execute(type("M", (), {"sample": {"other": 1}})())


# ---- the strategy --------------------------------------------------------------------------------------------


def reference_loop(s, iterations):
    """The original evolution loop written out directly (idstcv's evolution_search.main, Adlik's dedup), scoring
    with score_structure: the strategy must reproduce it record for record."""
    rng = random.Random(s["seed"])
    population, seen, out = [], set(), []
    for it in range(iterations):
        if len(population) <= 10:
            child = zennas.split(zennas.mutate(INIT, "XXBL", rng, num_replaces=1))
        else:
            parent = population[rng.randint(0, len(population) - 1)]
            child = zennas.split(zennas.mutate(parent["structure"], "XXBL", rng, num_replaces=2))
        if child in seen:
            continue
        if zennas.num_layers(child) > s["max_layers"]:
            continue
        counts = zennas.analyze(child, s["resolution"], s["num_classes"])
        if counts["params"] > s["budget_params"]:
            continue
        score = score_structure(child, "zen", resolution=s["resolution"], batch_size=s["batch_size"], seed=s["seed"],
                                device="cpu")
        seen.add(child)
        rec = {"iteration": it, "structure": child, "score": score, "params": counts["params"]}
        population.append(rec)
        while len(population) > s["population_size"]:
            worst = [p["score"] for p in population]
            del population[worst.index(min(worst))]
        out.append(rec)
    return out, population


def test_strategy_is_the_original_loop_and_respects_every_budget(tmp_path):
    s = settings(max_iterations=60, budget_params=0.15e6, max_layers=8, population_size=12, seed=3)
    strategy = run_search(tmp_path, **{k: v for k, v in s.items() if k != "initial"})
    records = trials(tmp_path / "run" / "trials.jsonl")
    expected, population = reference_loop(s, 60)
    assert [(r["iteration"], r["structure"], r["params"]) for r in records] == \
           [(r["iteration"], r["structure"], r["params"]) for r in expected]
    assert [r["score"] for r in records] == pytest.approx([r["score"] for r in expected], abs=1e-4)
    assert [r["structure"] for r in strategy.population] == [r["structure"] for r in population]
    for r in records:  # every scored candidate within every budget, counted like the original
        counts = zennas.analyze(r["structure"], 16, 100)
        assert r["params"] == counts["params"] <= 0.15e6 and r["flops"] == counts["flops"]
        assert r["layers"] == zennas.num_layers(r["structure"]) <= 8
    assert len({r["structure"] for r in records}) == len(records)  # dedup
    c = strategy.counts
    assert c["rejected_params"] > 0 and c["rejected_layers"] > 0
    assert c["evaluated"] + sum(v for k, v in c.items() if k.startswith("rejected_")) == 60 == strategy.iteration
    assert strategy.best()["score"] == max(r["score"] for r in records)


def test_flops_and_latency_budgets(tmp_path):
    class FakeTable:  # deterministic latencies: the budget logic, not the clock, is under test
        path = None

        def estimate(self, structure, resolution, num_classes):
            return zennas.analyze(structure, resolution, num_classes)["flops"] * 1e-12

    s = dict(max_iterations=40, budget_flops=4e6, budget_latency=3.5e-6, seed=1)
    strategy = zennas_search.make_strategy(settings(**s), None)
    strategy.latency_table = FakeTable()
    run_search(tmp_path, strategy=strategy, **s)
    assert strategy.counts["evaluated"] > 3
    assert strategy.counts["rejected_flops"] + strategy.counts["rejected_latency"] > 0
    for r in strategy.population:
        assert r["flops"] <= 4e6 and r["latency"] == pytest.approx(r["flops"] * 1e-12) and r["latency"] <= 3.5e-6


def test_random_initialisation_and_both_mutations(tmp_path, monkeypatch):
    calls = []
    real = zennas.mutate

    def spy(structure, space="XXBL", rng=None, **kw):
        calls.append((kw.get("num_replaces"), kw.get("method")))
        return real(structure, space, rng, **kw)

    monkeypatch.setattr(zennas, "mutate", spy)
    run_search(tmp_path / "a", fix_initialize=False, origin=False, max_iterations=40, seed=2, population_size=20,
               budget_params=5e6)
    first = [r for r in trials(tmp_path / "a" / "run" / "trials.jsonl") if r["iteration"] < 11]
    assert first and all(r["structure"].startswith("SuperConvK3BNRELU(3,32,2,1)") and
                         6 <= len(zennas.parse(r["structure"])) <= 10 for r in first)  # Adlik's random networks
    assert set(calls) == {(2, "adlik")}  # no mutation of the initial structure; the fork's mutation afterwards
    calls.clear()
    run_search(tmp_path / "b", fix_initialize=True, origin=True, max_iterations=40, seed=2, population_size=20)
    assert (1, "original") in calls and (2, "original") in calls and all(m == "original" for _, m in calls)
    n_first = [n for n, _ in calls].index(2)
    assert all(n == 1 for n, _ in calls[:n_first])


def test_dedup_and_without_dedup_a_repeated_structure_reuses_its_score(tmp_path):
    deduped = run_search(tmp_path / "dedup", dedup=True, max_iterations=60, seed=0)
    records = trials(tmp_path / "dedup" / "run" / "trials.jsonl")
    assert deduped.counts["rejected_duplicate"] > 0 and len({r["structure"] for r in records}) == len(records)
    strategy = run_search(tmp_path, dedup=False, max_iterations=60, seed=0)
    records = trials(tmp_path / "run" / "trials.jsonl")
    reused = [r for r in records if r.get("reused")]
    assert reused and strategy.counts["reused"] == len(reused)
    first = {}
    for r in records:
        first.setdefault(r["structure"], r["score"])
        assert r["score"] == first[r["structure"]]


def test_resume_continues_exactly(tmp_path):
    whole = run_search(tmp_path / "whole", max_iterations=50, seed=5)
    run_search(tmp_path / "part", max_iterations=20, seed=5)
    state = json.loads((tmp_path / "part" / "run" / "search_state.json").read_text())
    assert state["iteration"] == 20
    from retia.results import RunDir

    run_search(tmp_path / "part", run=RunDir(tmp_path / "part" / "run", resume=True), max_iterations=50, seed=5,
               resume=True)
    a, b = trials(tmp_path / "whole" / "run" / "trials.jsonl"), trials(tmp_path / "part" / "run" / "trials.jsonl")
    assert strip(a) == strip(b) and whole.iteration == 50
    # a changed setting is refused in one line
    with pytest.raises(RetiaError, match="budget_params=1000000.0, this search has budget_params=500000.0"):
        run_search(tmp_path / "part", run=RunDir(tmp_path / "part" / "run", resume=True), max_iterations=60,
                   seed=5, resume=True, budget_params=5e5)


def test_resume_takes_a_finished_result_from_the_log_and_drops_a_torn_line(tmp_path, monkeypatch):
    run_search(tmp_path, max_iterations=30, seed=7)
    run = tmp_path / "run"
    state = json.loads((run / "search_state.json").read_text())
    records = trials(run / "trials.jsonl")
    last = records[-1]
    # as if the process died after logging the last result but before rewriting the state
    state["trials"] -= 1
    state["population"] = [i for i in state["population"] if i != len(records) - 1]
    state["pending"] = [{k: last[k] for k in ("iteration", "structure", "params", "flops", "layers")}]
    state["counts"]["evaluated"] -= 1
    (run / "search_state.json").write_text(json.dumps(state))
    with (run / "trials.jsonl").open("a") as f:
        f.write('{"trial": 99, "struc')  # torn by the kill
    scored = []
    monkeypatch.setattr("retia.evaluators.zennas_scoring.fast_zen_score",
                        lambda *a, **k: scored.append(a[0]) or 0.0)
    from retia.results import RunDir

    strategy = run_search(tmp_path, run=RunDir(run, resume=True), max_iterations=30, seed=7, resume=True)
    assert scored == []  # nothing scored again
    assert strip(trials(run / "trials.jsonl")) == strip(records)
    assert strategy.counts["evaluated"] == len(records)


def test_trial_log_and_bad_settings():
    with pytest.raises(RetiaError, match="population_size must be a positive integer"):
        ZenNASEvolution(population_size=0)
    with pytest.raises(RetiaError, match="budget_params must be a positive number"):
        ZenNASEvolution(budget_params=-1)
    with pytest.raises(RetiaError, match="resume needs state_path"):
        ZenNASEvolution(resume=True)


# ---- latency tables --------------------------------------------------------------------------------------------


def test_latency_table_caches_per_block_and_persists(tmp_path):
    torch.set_num_threads(1)
    table = LatencyTable(device="cpu", batch_size=2, warmup=1, repeats=3, path=tmp_path / "lut.json")
    est = table.estimate(INIT, 16, 10)
    n_blocks = len(zennas.parse(INIT))
    assert table.measured == n_blocks + 1 and est > 0  # each block and the head, once
    assert table.estimate(INIT, 16, 10) == est and table.measured == n_blocks + 1  # all cached now
    assert table.key("SuperResK3K3(8,16,1,8,1)", 16) == f"cpu1t|fp32|b2|r16|SuperResK3K3(8,16,1,8,1)"
    table.estimate(INIT, 32, 10)  # another resolution: other keys
    assert table.measured == 2 * (n_blocks + 1)
    table.save()
    again = LatencyTable(device="cpu", batch_size=2, warmup=1, repeats=3, path=tmp_path / "lut.json")
    assert again.estimate(INIT, 16, 10) == est and again.measured == 0
    assert len(LatencyTable(device="cpu", batch_size=4, path=tmp_path / "lut.json")) == len(again)
    with pytest.raises(RetiaError, match="latency batch_size must be a positive integer"):
        LatencyTable(batch_size=0)


def test_latency_validation_compares_the_block_sum_with_the_whole_network(monkeypatch):
    """validate() with a deterministic stand-in for the clock: a module "takes" 1 ns per multiply-add plus 5 us of
    dispatch overhead, so the estimate (sum over blocks and head, one overhead each) and the measurement (one
    overhead) are known by hand."""
    from retia.profile import count_flops

    overhead = 5e-6

    def fake_time(self, module, resolution, in_channels):
        return count_flops(module, (1, in_channels, resolution, resolution)) * 1e-9 + overhead

    monkeypatch.setattr(LatencyTable, "_time", fake_time)
    nets = [INIT, "SuperConvK3BNRELU(3,16,1,1)SuperResK3K3(16,32,2,16,1)SuperConvK1BNRELU(32,64,1,1)"]
    table = LatencyTable(device="cpu", batch_size=8)
    report = table.validate(nets, 32, 10)
    for net, row in zip(nets, report["networks"]):
        flops = count_flops(zennas.build(net, 10), (1, 3, 32, 32)) * 1e-9
        blocks = len(zennas.parse(net))
        assert row["measured_s"] == pytest.approx(flops + overhead)
        assert row["estimate_s"] == pytest.approx(flops + (blocks + 1) * overhead)
        assert row["ratio"] == pytest.approx(row["estimate_s"] / row["measured_s"])
    errors = [abs(r["ratio"] - 1) for r in report["networks"]]
    assert report["max_abs_error"] == pytest.approx(max(errors))
    assert report["spearman"] == pytest.approx(1.0)
    assert table.measured == len(table)  # each block configuration measured once


# ---- entry point, configs, kill + resume, parallel trials ---------------------------------------------------


ORIGINAL_SCRIPTS = {  # name: (proxy, params, flops, latency, max_layers, batch, resolution, classes, space)
    "cifar_params1M_zen": ("zen", 1e6, None, None, 18, 64, 32, 100, "XXBL"),
    "cifar_params1M_gradnorm": ("gradnorm", 1e6, None, None, 18, 64, 32, 100, "XXBL"),
    "cifar_params1M_naswot": ("naswot", 1e6, None, None, 18, 8, 32, 100, "XXBL"),
    "cifar_params1M_synflow": ("synflow", 1e6, None, None, 18, 64, 32, 100, "XXBL"),
    "cifar_params1M_te_nas": ("te_nas", 1e6, None, None, 18, 64, 32, 100, "XXBL"),
    "cifar_params1M_flops": ("flops", 1e6, None, None, 18, 64, 32, 100, "XXBL"),
    "cifar_params1M_params": ("params", 1e6, None, None, 18, 64, 32, 100, "XXBL"),
    "cifar_params1M_random": ("random", 1e6, None, None, 18, 64, 32, 100, "XXBL"),
    "cifar_params2M_zen": ("zen", 2e6, None, None, 20, 64, 32, 100, "XXBL"),
    "imagenet_flops400M": ("zen", None, 400e6, None, 14, 64, 224, 1000, "IDW"),
    "imagenet_flops600M": ("zen", None, 600e6, None, 14, 64, 224, 1000, "IDW"),
    "imagenet_flops800M": ("zen", None, 800e6, None, 16, 64, 224, 1000, "IDW"),
    "imagenet_latency01ms": ("zen", None, None, 1e-4, 10, 64, 224, 1000, "XXBL"),
    "imagenet_latency02ms": ("zen", None, None, 2e-4, 13, 64, 224, 1000, "XXBL"),
    "imagenet_latency03ms": ("zen", None, None, 3e-4, 16, 64, 224, 1000, "XXBL"),
    "imagenet_latency05ms": ("zen", None, None, 5e-4, 20, 64, 224, 1000, "XXBL"),
    "imagenet_latency08ms": ("zen", None, None, 8e-4, 25, 64, 224, 1000, "XXBL"),
    "imagenet_latency12ms": ("zen", None, None, 12e-4, 30, 64, 224, 1000, "XXBL"),
}


def test_named_configs_hold_the_original_scripts_settings():
    assert zennas_search.list_configs() == sorted(ORIGINAL_SCRIPTS)
    for name, (proxy, params, flops, lat, layers, batch, res, classes, space) in ORIGINAL_SCRIPTS.items():
        args = zennas_search.build_parser().parse_args(["--config", name])
        s = zennas_search.resolve_settings(args)
        assert (s["proxy"], s["budget_params"], s["budget_flops"], s["budget_latency"], s["max_layers"],
                s["batch_size"], s["resolution"], s["num_classes"], s["space"]) == \
               (proxy, params, flops, lat, layers, batch, res, classes, space), name
        assert (s["population_size"], s["max_iterations"], s["fix_initialize"], s["origin"]) == (512, 480000, True,
                                                                                                  True)
        key = "cifar" if res == 32 else "imagenet_flops" if space == "IDW" else "imagenet_latency"
        assert s["initial"] == zennas.INITIAL_STRUCTURES[key]
    # flags override the config
    args = zennas_search.build_parser().parse_args(["--config", "cifar_params1M_zen", "--budget-params", "500k",
                                                    "--iterations", "7", "--adlik-mutation"])
    s = zennas_search.resolve_settings(args)
    assert (s["budget_params"], s["max_iterations"], s["origin"], s["max_layers"]) == (5e5, 7, False, 18)


@pytest.mark.parametrize("argv, message", [
    (["--config", "cifar_params3M_zen"], "no such named config"),
    (["--proxy", "zenn"], "unknown zero-shot proxy 'zenn'"),
    (["--initial", "foo"], "--initial 'foo': not a known initial structure"),
    (["--space", "ABC"], "unknown search space 'ABC'"),
    (["--resume"], "holds no earlier run"),
    (["--port", "70000"], "--port 70000"),
])
def test_bad_input_is_one_line(argv, message, tmp_path):
    with pytest.raises(RetiaError, match=message.replace("(", r"\(")):
        zennas_search.main(argv + ["--output", str(tmp_path / "r")])


def test_bad_input_exits_2_with_one_line(tmp_path):
    out = subprocess.run(SEARCH + ["--config", "nope", "--output", str(tmp_path / "r")], capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 2
    assert out.stderr.strip().splitlines()[-1].startswith("error: --config 'nope': no such named config")


SMALL = ["--iterations", "45", "--population-size", "8", "--batch-size", "4", "--resolution", "16",
         "--budget-params", "200k", "--seed", "4"]


@pytest.mark.slow
def test_killed_search_resumes_losing_and_repeating_nothing(tmp_path):
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    whole = tmp_path / "whole"
    out = subprocess.run(SEARCH + ["--output", str(whole)] + SMALL, capture_output=True, text=True, env=env,
                         timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    reference = trials(whole / "trials.jsonl")

    run = tmp_path / "run"
    proc = subprocess.Popen(SEARCH + ["--output", str(run)] + SMALL, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, env=env, start_new_session=True)
    deadline = time.time() + 240
    while (not (run / "trials.jsonl").exists() or len(trials(run / "trials.jsonl")) < 8) and proc.poll() is None \
            and time.time() < deadline:
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)  # no clean shutdown at all
    proc.wait()
    before = trials(run / "trials.jsonl")
    assert 8 <= len(before) < len(reference)
    out = subprocess.run(SEARCH + ["--output", str(run), "--resume"], capture_output=True, text=True, env=env,
                         timeout=300)  # --resume alone: the saved settings
    assert out.returncode == 0, out.stderr[-2000:]
    after = trials(run / "trials.jsonl")
    assert strip(after[:len(before)]) == strip(before)  # kept as they were
    assert strip(after) == strip(reference)  # the same search as without the kill: nothing lost or repeated
    assert [t["trial"] for t in after] == list(range(1, len(after) + 1))
    best = json.loads((run / "best.json").read_text())
    assert best["score"] == max(t["score"] for t in after)
    assert (run / "best_structure.txt").read_text().strip() == best["structure"]
    for name in ("trials.csv", "trials.json", "search.json", "score_vs_iteration.png", "score_vs_params.png"):
        assert (run / name).stat().st_size > 0, name
    assert "best zen score" in out.stdout


@pytest.mark.slow
def test_candidates_score_in_parallel_nni_trials(tmp_path):
    """--concurrency 2: NNI's training-service engine runs the candidates in trial processes, two at a time; the
    scores equal scoring the same structures in this process."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    run = tmp_path / "run"
    env = dict(os.environ, HOME=str(tmp_path))  # NNI's experiment manifest stays private to the test
    out = subprocess.run(SEARCH + ["--output", str(run), "--iterations", "6", "--population-size", "4",
                                   "--batch-size", "4", "--resolution", "16", "--concurrency", "2", "--port",
                                   str(port), "--seed", "0", "--device", "cpu"],
                         capture_output=True, text=True, env=env, timeout=500)
    assert out.returncode == 0, out.stderr[-3000:]
    records = trials(run / "trials.jsonl")
    assert len(records) >= 3 and len({r["structure"] for r in records}) == len(records)
    for r in records:
        assert r["score"] == pytest.approx(score_structure(r["structure"], "zen", resolution=16, batch_size=4, seed=0,
                                                           device="cpu"), abs=1e-3)
    spans = [(r["finished"] - r["seconds"], r["finished"]) for r in records]
    assert any(a0 < b1 and b0 < a1 for i, (a0, a1) in enumerate(spans) for (b0, b1) in spans[i + 1:]), spans
