"""``python -m deepseek_moe.train`` == ``deepseek-moe train``."""

import sys

from deepseek_moe.cli.main import main

if __name__ == "__main__":
    sys.exit(main(["train", *sys.argv[1:]]))
