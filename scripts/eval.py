#!/usr/bin/env python
"""Perplexity of a checkpoint on a text file, llama.cpp's method (see llama_min/perplexity.py).

Example: python scripts/eval.py --data shakespeare.txt --ctx 512 --json
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from llama_min.perplexity import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
