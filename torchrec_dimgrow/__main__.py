import os
import sys

from torchrec_dimgrow.cli import main
from torchrec_dimgrow.distributed.env import exit_without_teardown

if __name__ == "__main__":
    code = main()
    if code == 0 and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        exit_without_teardown(code)  # a finished rank skips CPython's teardown (see there)
    sys.exit(code)
