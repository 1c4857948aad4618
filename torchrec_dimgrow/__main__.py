from torchrec_dimgrow.cli import main
from torchrec_dimgrow.distributed.env import exit_rank

if __name__ == "__main__":
    exit_rank(main())  # a finished rank of a torchrun launch skips CPython's teardown (see there)
