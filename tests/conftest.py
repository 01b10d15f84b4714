import os

import torch

# Keep the suite's own threads from fighting over the 2 CI cores.
torch.set_num_threads(int(os.environ.get("DEEPSEEK_MOE_TEST_THREADS", "1")))
