#!/usr/bin/env python
"""Train from scratch or fine-tune a checkpoint on your own text (same flags as `llama-min train`).

The code lives in llama_min/cli/train.py; install the package first (pip install -e .).
"""

import sys

from llama_min.cli.train import main

if __name__ == "__main__":
    sys.exit(main(prog="train.py"))
