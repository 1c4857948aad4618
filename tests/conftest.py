import os

import torch

# Tests run tiny models, often 2 ranks at once on a 2-core machine: one intra-op thread each.
os.environ.setdefault("OMP_NUM_THREADS", "1")
torch.set_num_threads(1)
