#!/usr/bin/env python
"""NLL by position past the trained window, per RoPE scaling (the code lives in llama_min/inspect/long_context.py).

    python scripts/long_context_viz.py measure --ckpt runs/mini/final --text data/shakespeare.txt \
        --trained-window 256 --windows 96 --from-end --out runs/lc_mini.npz      # numbers (.npz + .json)
    python scripts/long_context_viz.py draw runs/lc_mini.npz --out scripts/img/long_context_mini.png

`draw` reads only the saved files. Needs matplotlib for the picture: pip install 'llama_min[viz]'.
"""

import sys

from llama_min.cli.common import run_main
from llama_min.inspect.long_context import main

if __name__ == "__main__":
    sys.exit(run_main(main))
