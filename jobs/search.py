"""Ray job entrypoint for a policy search.

    ray job submit --address http://127.0.0.1:8265 --working-dir . -- \\
        python jobs/search.py --config search_spaces/smoke.yaml [--experiment NAME] [--resume]

Inside a Ray job ``RAY_ADDRESS`` is set: the search runs on the cluster the job was
submitted to. The arguments are those of ``autopose search``.
"""

import sys

from autopose.cli import main

if __name__ == "__main__":
    sys.exit(main(["search", *sys.argv[1:]]))
