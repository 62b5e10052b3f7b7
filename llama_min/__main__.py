"""`python -m llama_min <command> ...`: the same program as the installed `llama-min` command."""

import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main(prog="python -m llama_min"))
