#!/usr/bin/env python
"""Thin wrapper: same as ``ldm convert``."""

import sys

from ldm.cli import entry
from ldm.cli.convert import add_arguments, run

if __name__ == "__main__":
    sys.exit(entry(run, add_arguments, prog="convert.py"))
