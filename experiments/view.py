"""Serve the NNI web UI of a stopped experiment — including NAS experiments run from retia's Python scripts.

``python -m retia.experiments.view <id> --port P`` makes the stored experiment loadable by NNI
(:func:`retia.experiments.nni_records.make_viewable`: a view-compatible profile for training-service NAS
experiments, an absolute manifest entry) and starts NNI's manager in read-only view mode
(``nni.experiment.Experiment.view``) on port ``P``: the web UI then lists the experiment's trials, and
``nnictl experiment export <id> --type csv|json --filename F`` exports them. The manager runs detached, like
``nnictl view``; stop it with ``nnictl stop <id>`` (or pass ``--foreground`` and press Ctrl-C).

After this, plain ``nnictl view <id> --port P`` works for the same experiment too. Sequential-engine searches
are viewable when they were recorded with :class:`~retia.experiments.nni_records.NnictlRecord` (retia's search
scripts attach one); an unrecorded one is a one-line error.
"""
from __future__ import annotations

import argparse
import logging

from retia.cli import run_main
from retia.errors import RetiaError


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m retia.experiments.view", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("id", help="experiment id (see: nnictl experiment list --all)")
    p.add_argument("--port", type=int, default=8080, help="web UI port (default: %(default)s)")
    p.add_argument("--experiment-dir", default=None,
                   help="NNI working directory holding <id>/ (default: the manifest's logDir for <id>)")
    p.add_argument("--foreground", action="store_true", help="block until Ctrl-C, then stop the web UI")
    return p


def main(argv: list[str] | None = None) -> str:
    args = build_parser().parse_args(argv)
    if not 0 < args.port < 65536:
        raise RetiaError(f"--port {args.port}: expected 1..65535")
    logging.getLogger("nni").setLevel(logging.INFO)
    from nni.experiment import Experiment
    from nni.experiment.config import ExperimentConfig
    from nni.tools.nnictl.config_utils import Config
    from nni.tools.nnictl.nnictl_utils import update_experiment

    from .nni_records import experiment_dir, make_viewable, manifest_entry

    update_experiment()  # marks experiments whose manager died as STOPPED, as nnictl does
    if args.experiment_dir is None:
        entry = manifest_entry(args.id)
        if entry is not None and entry.get("status") != "STOPPED":
            raise RetiaError(f"experiment {args.id!r} is {entry.get('status')} (port {entry.get('port')}): its "
                             f"web UI is already served; view only stopped experiments")
    make_viewable(args.id, args.experiment_dir)
    exp_dir = experiment_dir(args.id, args.experiment_dir)
    config = ExperimentConfig(**Config(args.id, str(exp_dir.parent)).get_config())
    experiment = Experiment(config, id=args.id)
    try:
        experiment.view(args.port, non_blocking=not args.foreground)
    except RuntimeError as exc:  # port in use, manager failed to start
        raise RetiaError(f"experiment {args.id!r}: {exc}") from None
    url = f"http://127.0.0.1:{args.port}"
    if not args.foreground:
        print(f"web UI of {args.id}: {url}  (stop it with: nnictl stop {args.id})")
    return url


if __name__ == "__main__":
    run_main(main)
