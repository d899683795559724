#!/usr/bin/env python
"""Generate images from a prompt: the same as ``ldm txt2img`` (see ``--help``)."""

import sys

from ldm.cli import entry
from ldm.cli.txt2img import add_arguments, run

if __name__ == "__main__":
    sys.exit(entry(run, add_arguments, prog="txt2img.py"))
