"""Train or fine-tune a Llama on your own text: `llama-min train` (see llama_min/train_cli.py or --help)."""
import sys
from llama_min.train_cli import main
if __name__ == "__main__":
    sys.exit(main(prog="train.py"))
