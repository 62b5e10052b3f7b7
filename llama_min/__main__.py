"""`python -m llama_min <command> ...`: the same program as the installed `llama-min` command."""

from .cli import main, run_as_program

if __name__ == "__main__":
    run_as_program(lambda: main(prog="python -m llama_min"))
