"""Shared command-line plumbing: one-line errors, seeding, quiet logs."""
from __future__ import annotations

import logging
import os
import sys
import warnings
from typing import Callable

from .errors import RetiaError


def run_main(main: Callable[[list[str] | None], object], argv: list[str] | None = None) -> None:
    """Run an entry point; a :class:`RetiaError` (bad input) becomes ``error: <message>`` and exit status 2."""
    try:
        main(argv)
    except RetiaError as exc:
        print(f"error: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
    except KeyboardInterrupt:
        print("interrupted: finished trials are saved; start again with --resume to continue", file=sys.stderr)
        raise SystemExit(130) from None


def seed_everything(seed: int) -> None:
    import pytorch_lightning as pl

    pl.seed_everything(seed, workers=True, verbose=False)


def quiet() -> None:
    """Silence the third-party chatter that drowns a search's progress (NNI config echo, Lightning tips)."""
    warnings.filterwarnings("ignore", category=UserWarning)
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    os.environ.setdefault("PYTHONWARNINGS", "ignore")
    for name in ("lightning.pytorch", "pytorch_lightning", "lightning_fabric"):
        logging.getLogger(name).setLevel(logging.WARNING)


def set_threads(threads: int | None) -> None:
    """Torch intra-op threads. Small models run fastest on one thread; oversubscribed OpenMP threads on a busy
    machine make each op many times slower."""
    import torch

    if threads:
        torch.set_num_threads(threads)


def add_threads_arg(parser) -> None:
    parser.add_argument("--threads", type=positive_int, default=1,
                        help="torch CPU threads (default: %(default)s; raise it for big models on an idle machine)")


def positive_int(text: str) -> int:
    """argparse type: an int > 0."""
    import argparse

    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"{text!r}: expected a positive integer")
    return value
