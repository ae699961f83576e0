"""Ray job entrypoint for a full training.

    ray job submit --address http://127.0.0.1:8265 --working-dir . -- \\
        python jobs/train.py --policy policy.json --config search_spaces/smoke.yaml

The arguments are those of ``autopose train``.
"""

import sys

from autopose.cli import main

if __name__ == "__main__":
    sys.exit(main(["train", *sys.argv[1:]]))
