"""Names of the dtypes settings may hold (`float32`, `bfloat16`, `float16`) and their torch dtypes."""

import torch

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
