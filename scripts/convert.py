#!/usr/bin/env python
"""Convert a checkpoint to llama_min's format or a Hugging Face folder (same flags as `llama-min convert`).

The code lives in llama_min/cli/convert.py; install the package first (pip install -e .).
"""

import sys

from llama_min.cli.convert import main

if __name__ == "__main__":
    sys.exit(main())
