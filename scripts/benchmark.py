#!/usr/bin/env python
"""Speed of llama_min vs transformers and the memory-bandwidth ceiling (same flags as `llama-min bench`).

The code lives in llama_min/cli/bench.py; install the package first (pip install -e .).
"""

import sys

from llama_min.cli.bench import main

if __name__ == "__main__":
    sys.exit(main())
