"""End-to-end serving benchmark: dense vs sparse decoders side by side (same as ``esparse bench``).

    python bench/e2e.py --shape llama-7b            # random LLaMA-7B-shaped 2:4 weights on the GPU
    python bench/e2e.py /path/to/ft_folder          # an exported 2:4 model
"""

import sys

from esparse.cli import main

if __name__ == "__main__":
    sys.exit(main(["bench", *sys.argv[1:]]))
