#!/usr/bin/env python
"""Complete a prompt, or chat, with any supported checkpoint (same flags as `llama-min generate`).

The code lives in llama_min/cli/generate.py; install the package first (pip install -e .).
"""

import sys

from llama_min.cli.generate import main

if __name__ == "__main__":
    sys.exit(main())
