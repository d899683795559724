#!/usr/bin/env python
"""Thin wrapper: same as ``ldm distill``."""

import sys

from ldm.cli import entry
from ldm.cli.distill import add_arguments, run

if __name__ == "__main__":
    sys.exit(entry(run, add_arguments, prog="distill.py"))
