#!/usr/bin/env python
"""Generate many images from a prompt file: the same as ``ldm batch`` (see ``--help``)."""

import sys

from ldm.cli import entry
from ldm.cli.batch import add_arguments, run

if __name__ == "__main__":
    sys.exit(entry(run, add_arguments, prog="batch.py"))
