"""The ``jepa`` console script: ``jepa train --config ... key=value``."""
from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(prog="jepa", description="openjepa: train, evaluate and export JEPA encoders")
    parser.add_argument("command", choices=["train"], help="train: pretrain (same arguments as train.py)")
    args, rest = parser.parse_known_args(argv[:1])
    if args.command == "train":
        import train  # the dispatcher may reach train.py's main, lazily

        train.main(argv[1:])


if __name__ == "__main__":
    main()
