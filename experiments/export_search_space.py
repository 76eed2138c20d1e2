"""Export a retia model space as an NNI (HPO-style) search space file, for ``nnictl create``.

``python -m retia.experiments.export_search_space --space autoformer --preset micro -o space.json`` writes the
space's ``simplify()`` — one entry per NNI mutable label — in NNI's legacy search-space format::

    {"embed_dim": {"_type": "choice", "_value": [48, 64, 96]}, "depth": {"_type": "choice", "_value": [2, 3, 4]},
     "num_head_0": {...}, "mlp_ratio_0": {...}, ...}

NNI tuners sample every label independently, so a trial also receives labels of layers beyond ``depth``; those
do not change the frozen model (the trial entry point fills and ignores them the same way as
``AutoformerSpace.complete_arch``); ``--nested`` writes NNI's nested layout instead, where each ``depth`` choice
holds only the labels of its layers (see :func:`nest_by_depth`). ``--weights`` exports the space of a trained supernet (its JSON sidecar holds
the config), so the search space always matches the weights the trials will load.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any, Callable

from retia.cli import run_main
from retia.errors import RetiaError


def search_space_of(space: Any) -> dict[str, dict[str, Any]]:
    """``{label: {"_type": "choice", "_value": [...]}}`` for every mutable of ``space.simplify()``.

    Uses NNI's own ``Mutable.as_legacy_dict()`` (the conversion ``NasExperiment`` uses for its web UI). A mutable
    NNI cannot express in the HPO format (e.g. a mutable expression) is a one-line :class:`RetiaError`.
    """
    out: dict[str, dict[str, Any]] = {}
    for label, mutable in space.simplify().items():
        try:
            entry = mutable.as_legacy_dict()
        except NotImplementedError:
            raise RetiaError(f"space label {label!r} ({type(mutable).__name__}) has no NNI search-space form; "
                             f"expected categorical choices") from None
        out[label] = {"_type": entry["_type"], "_value": [_plain(v) for v in entry["_value"]]}
    return out


def _layer(label: str) -> int | None:
    head, _, tail = label.rpartition("_")
    return int(tail) if head and tail.isdigit() else None


def nest_by_depth(space: dict[str, dict[str, Any]], depth_label: str = "depth") -> dict[str, dict[str, Any]]:
    """A depth-conditional (NNI "nested") search space: each ``depth`` choice carries only the per-layer labels
    (``*_i``, ``i < depth``) of the layers that exist at that depth.

    Trials then receive ``{"depth": {"_name": 3, "num_head_0": ..., ...}, ...}`` (the trial entry point flattens
    it); tuners that support nested spaces (Evolution, TPE, Random, Anneal) never spend a trial on a label of a
    layer that is not there.
    """
    if depth_label not in space:
        raise RetiaError(f"nested layout: the space has no {depth_label!r} label to nest per-layer labels under")
    layered = {k: v for k, v in space.items() if _layer(k) is not None}
    out = {k: v for k, v in space.items() if k != depth_label and _layer(k) is None}
    out[depth_label] = {"_type": "choice", "_value": [
        {"_name": d, **{k: v for k, v in layered.items() if _layer(k) < d}} for d in space[depth_label]["_value"]]}
    return out


def _plain(value: Any) -> Any:
    # numpy scalars and tuples from configs -> JSON types (floats stay floats: mlp_ratio 2.0 != 2 for the arch)
    if hasattr(value, "item"):
        value = value.item()
    return list(value) if isinstance(value, tuple) else value


def _autoformer(args: argparse.Namespace):
    from retia.spaces.autoformer import AutoformerSpace
    from retia.weights import load_meta

    if args.weights:
        meta = load_meta(args.weights) or {}
        if "config" not in meta:
            raise RetiaError(f"--weights {args.weights!r} has no JSON sidecar with the space config")
        return AutoformerSpace.from_config(meta["config"])
    if args.config:
        return AutoformerSpace.from_config(_read_json(args.config, "--config"))
    return AutoformerSpace.from_preset(args.preset)


SPACES: dict[str, Callable[[argparse.Namespace], Any]] = {"autoformer": _autoformer}


def _read_json(path: str, flag: str) -> Any:
    p = Path(path)
    if not p.is_file():
        raise RetiaError(f"{flag} {path!r} does not exist")
    try:
        return json.loads(p.read_text())
    except json.JSONDecodeError as exc:
        raise RetiaError(f"{flag} {path!r} is not JSON ({exc})") from None


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m retia.experiments.export_search_space",
                                description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--space", default="autoformer", choices=sorted(SPACES), help="model space (default: %(default)s)")
    p.add_argument("--preset", default="micro", help="space preset (AutoFormer: micro, tiny, small, base)")
    p.add_argument("--config", default=None, help="space config JSON instead of --preset")
    p.add_argument("--weights", default=None, help="a trained supernet file: export the space of its sidecar config")
    p.add_argument("--nested", action="store_true",
                   help="depth-conditional layout: per-layer labels only under the depths that have that layer")
    p.add_argument("-o", "--output", default="-", help="output JSON file (default: stdout)")
    return p


def main(argv: list[str] | None = None) -> dict:
    args = build_parser().parse_args(argv)
    space = search_space_of(SPACES[args.space](args))
    if args.nested:
        space = nest_by_depth(space)
    text = "{\n" + ",\n".join(f"  {json.dumps(k)}: {json.dumps(v)}" for k, v in space.items()) + "\n}\n"
    if args.output == "-":
        sys.stdout.write(text)
    else:
        out = Path(args.output)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(text)
        print(f"wrote {out}: {len(space)} labels ({', '.join(space)})", file=sys.stderr)
    return space


if __name__ == "__main__":
    run_main(main)
