"""benchmarks/zennas_search.py: the original's candidate lists are put in retia's order, so that one seed makes
both searches walk the same mutations. (The real ``--original`` run needs a checkout of idstcv/ZenNAS, which is
not part of retia; a stand-in checkout exercises the child runner here.)"""
from __future__ import annotations

import importlib.util
import random
import textwrap
from pathlib import Path

import pytest

from retia.spaces import zennas
from retia.spaces.zennas.search_space import get_space

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("zennas_search_bench", ROOT / "benchmarks" / "zennas_search.py")
bench = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(bench)

XXBL = get_space("XXBL")
TYPE_NAMES = [name for group in XXBL.block_groups for name in group]
BLOCKS = ["SuperConvK3BNRELU(3,32,1,1)", "SuperResK1K5K1(32,48,2,16,3)", "SuperResK3K3(48,64,1,32,1)",
          "SuperResK1K7K1(64,8,1,8,1)"]


def _ours(block: str) -> list[list[str]]:
    return XXBL.gen_search_space(zennas.parse(block), 0)


def test_retia_order_turns_set_ordered_lists_into_the_spaces_lists():
    rng = random.Random(0)
    for block in BLOCKS:
        ours = _ours(block)
        for _ in range(3):
            shuffled = [rng.sample(lst, len(lst)) for lst in ours]  # what list(set(...)) may give
            assert shuffled != ours
            assert bench.retia_order(shuffled, TYPE_NAMES) == ours


def test_common_prefix():
    assert bench.common_prefix(["a", "b", "c"], ["a", "b", "x", "c"]) == 2
    assert bench.common_prefix([], ["a"]) == 0
    assert bench.common_prefix(["a"], ["a"]) == 1


def test_original_runner_draws_from_lists_in_retias_order(tmp_path):
    """A stand-in for the original: its search-space module returns the candidate lists in a scrambled order and
    its main draws ``random.choice`` from them; through the runner, the draws are those retia's order gives."""
    block = BLOCKS[1]
    repo = tmp_path / "ZenNAS"
    (repo / "SearchSpace").mkdir(parents=True)
    (repo / "global_utils.py").write_text(textwrap.dedent("""
        import importlib.util
        def load_py_module_from_path(path):
            spec = importlib.util.spec_from_file_location("space", path)
            module = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(module)
            return module
    """))
    (repo / "SearchSpace" / "search_space_XXBL.py").write_text(textwrap.dedent(f"""
        import random
        names = {TYPE_NAMES!r}
        seach_space_block_type_list_list = [[type(n, (), {{}}) for n in names[:3]], [type(n, (), {{}}) for n in names[3:]]]
        LISTS = {_ours(block)!r}
        def gen_search_space(block_list, block_id):
            rng = random.Random(len(block_list))  # not the global stream the search draws from
            return [rng.sample(lst, len(lst)) for lst in LISTS]
    """))
    (repo / "evolution_search.py").write_text(textwrap.dedent("""
        import argparse, random
        import global_utils
        def parse_cmd_options(argv):
            p = argparse.ArgumentParser()
            p.add_argument('--search_space'); p.add_argument('--evolution_max_iter', type=int)
            return p.parse_known_args(argv[1:])[0]
        def main(args, argv):
            space = global_utils.load_py_module_from_path(args.search_space)
            picks = [random.choice([s for lst in space.gen_search_space([0] * (i + 1), 0) for s in lst])
                     for i in range(args.evolution_max_iter)]
            return picks, [float(i) for i in range(len(picks))], None
    """))
    out = bench.run_original(str(repo), iterations=5, seed=3, threads=1)
    rng = random.Random(3)
    pool = [s for lst in _ours(block) for s in lst]
    assert out["structures"] == [rng.choice(pool) for _ in range(5)]
    assert out["best_score"] == 4.0 and out["population"] == 5 and out["reorder_seconds"] > 0


def test_a_broken_original_checkout_fails_in_one_line(tmp_path):
    repo = tmp_path / "ZenNAS"
    repo.mkdir()
    (repo / "evolution_search.py").write_text("import torch_nonexistent_module\n")
    with pytest.raises(SystemExit) as info:
        bench.run_original(str(repo), iterations=2, seed=0, threads=1)
    message = str(info.value)
    assert "\n" not in message and repr(str(repo)) in message
    assert "exit status 1" in message and "No module named" in message
    assert bench.original_failure("/x", 0, "") == ("--original '/x': the original's search failed (exit status 0): no "
                                                  "error output, and no RESULT line on stdout (expected a working "
                                                  "checkout of idstcv/ZenNAS)")
