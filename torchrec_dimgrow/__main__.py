import logging
import os
import sys

from torchrec_dimgrow.cli import main


def _leave(code: int) -> None:
    """Exit a rank of a successful multi-process run without interpreter finalization.

    By the time ``main`` returns, the ranks have met at a barrier, left the process group and
    written and flushed every output (TensorBoard writers are closed explicitly). What is left
    is CPython's teardown, where PyTorch's C++ threads (gloo, the autograd engine) can race the
    GIL's destruction and abort the process ("terminate called without an active exception",
    pytorch/pytorch#190489): a finished search then exits -6 and torchrun reports it failed.
    Seen twice in the 2-rank torchrun test on a loaded 2-core machine (rank 1 aborting after
    its last epoch); six reruns on the same machine did not reproduce it. Failed runs exit
    normally: torchrun stops the other ranks as soon as one exits non-zero, so a fast exit
    there would cut off the peers' own error lines.
    """
    sys.stdout.flush()
    sys.stderr.flush()
    logging.shutdown()
    os._exit(code)


if __name__ == "__main__":
    code = main()
    if code == 0 and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        _leave(code)
    sys.exit(code)
