"""Ray job entrypoint that promotes a search run and trains its policy fully.

    ray job submit --address http://127.0.0.1:8265 --working-dir . -- \\
        python jobs/promote.py RUN_ID [--config search_spaces/smoke.yaml]

The arguments are those of ``autopose promote``.
"""

import sys

from autopose.cli import main

if __name__ == "__main__":
    sys.exit(main(["promote", *sys.argv[1:]]))
