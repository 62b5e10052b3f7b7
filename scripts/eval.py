#!/usr/bin/env python
"""Perplexity of a checkpoint on a text file, llama.cpp's method (same flags as `llama-min eval`).

The command lives in llama_min/cli/eval.py, the computation in llama_min/decoding/perplexity.py;
install the package first (pip install -e .).
"""

import sys

from llama_min.cli.eval import main

if __name__ == "__main__":
    sys.exit(main())
