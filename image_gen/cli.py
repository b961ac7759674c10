"""`image-gen` console script: the ImageNet one-step generator trainer on the shared drift core.

Its subcommands (train-mae, cache-latents, train, sample, demo) arrive with the image_gen trainer;
until then the script only reports that none is available.
"""

from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="image-gen", description=__doc__)
    parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    parser.parse_args(sys.argv[1:] if argv is None else argv)
    return 0
