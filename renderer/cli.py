"""The `consul-renderer` command line."""

from __future__ import annotations

import argparse
import sys

from renderer import __version__


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="consul-renderer")
    parser.add_argument("--version", action="version", version=f"consul-renderer {__version__}")
    parser.parse_args(argv)
    parser.print_help(sys.stderr)
    return 2
