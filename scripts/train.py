#!/usr/bin/env python
"""Thin wrapper: same as ``ldm train``."""

import sys

from ldm.cli import entry
from ldm.cli.train import add_arguments, run

if __name__ == "__main__":
    sys.exit(entry(run, add_arguments, prog="train.py"))
