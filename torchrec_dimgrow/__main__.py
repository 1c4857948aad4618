import sys

from torchrec_dimgrow.cli import main

if __name__ == "__main__":
    sys.exit(main())
