import os

import torch
from hypothesis import settings

# Keep the suite's own threads from fighting over the 2 CI cores.
torch.set_num_threads(int(os.environ.get("DEEPSEEK_MOE_TEST_THREADS", "1")))

# CI draws the same examples every run (a failure there is reproducible); locally hypothesis explores.
settings.register_profile("ci", derandomize=True, print_blob=True)
if os.environ.get("CI"):
    settings.load_profile("ci")
