"""The DKDM method: the objective, the dynamic iterative batch pool and the loop joining them.

``DKDMObjective`` (paper eq. 19-21) compares a teacher's and a student's outputs;
``DynamicPool`` (section 3.3) is the stream of teacher-generated noisy samples;
``DistillLoop`` runs one teacher call per step for both, on the shared ``Trainer``.
"""

from dkdm.distill.objective import DKDMObjective, ObjectiveError, check_compatible
from dkdm.distill.pool import (
    VARIANTS,
    DynamicPool,
    PoolMemoryError,
    available_memory,
    estimate_pool_bytes,
    pool_size,
    teacher_fingerprint,
)

__all__ = [
    "VARIANTS",
    "DKDMObjective",
    "DistillLoop",
    "DynamicPool",
    "ObjectiveError",
    "PoolMemoryError",
    "available_memory",
    "check_compatible",
    "estimate_pool_bytes",
    "pool_size",
    "teacher_fingerprint",
    "teacher_id",
]


def __getattr__(name: str):
    # The loop pulls in the trainer (DDP, optimizers); import it only when asked for.
    if name in ("DistillLoop", "teacher_id"):
        from dkdm.distill import loop

        return getattr(loop, name)
    raise AttributeError(name)
