"""``python -m deepseek_moe.train`` == ``deepseek-moe train``."""

import sys

from deepseek_moe.train.command import main

if __name__ == "__main__":
    sys.exit(main())
