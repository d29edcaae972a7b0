"""The one autocast context: fp32 is a plain no-op, a lower precision really lowers the ops."""

import torch

from dkdm.training.precision import Precision, autocast, autocast_dtype


def test_fp32_runs_plain_and_lower_precisions_lower_the_ops():
    a, b = torch.randn(4, 4), torch.randn(4, 4)
    with autocast("cpu", autocast_dtype("fp32")):
        assert (a @ b).dtype == torch.float32
        assert not torch.is_autocast_enabled("cpu")
    with autocast("cpu", autocast_dtype("bf16")):
        assert (a @ b).dtype == torch.bfloat16
    with Precision("bf16", torch.device("cpu")).autocast():
        assert (a @ b).dtype == torch.bfloat16
    with Precision("fp32", torch.device("cpu")).autocast():
        assert (a @ b).dtype == torch.float32
