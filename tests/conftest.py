import os

# 2-thread OpenMP stalls on a busy 2-core machine; one thread is faster here (see DESIGN.md).
os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch  # noqa: E402

torch.set_num_threads(1)
