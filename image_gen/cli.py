"""`image-gen` console script (ImageNet one-step generator trainer; see the image_gen issue)."""

from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="image-gen", description=__doc__)
    parser.add_subparsers(dest="command", required=True)
    parser.parse_args(sys.argv[1:] if argv is None else argv)
    return 0
