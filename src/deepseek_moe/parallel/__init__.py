"""Expert parallelism on torch.distributed: the only package that talks to it.

    check_expert_parallel(cfg, n)      the layout fits n ranks (before any process-group work)
    ctx = init_parallel()              join torchrun's group, build the (dp, ep) DeviceMesh
    model = data_parallel(model, ctx)  experts split over ctx.ep_group, the rest DDP
    parallelize_experts(model, group)  the expert split alone (tests, custom loops)
    DistributedTraining.start(...)     all a training loop needs under torchrun (the Trainer's N-process strategy)
    launch(module, argv, n)            run ``python -m module`` on n local processes through torchrun
"""

from deepseek_moe.parallel.checkpoint import (
    full_optimizer_state,
    full_state_dict,
    gathered_model,
    load_full_optimizer_state,
    load_full_state_dict,
)
from deepseek_moe.parallel.dispatcher import AllToAllDispatcher, CommStats
from deepseek_moe.parallel.experts import (
    all_reduce_sum,
    check_model,
    clip_grad_norm_,
    comm_stats,
    expert_parameters,
    parallelize_experts,
    reset_comm_stats,
    scale_expert_grads,
    unwrap,
)
from deepseek_moe.parallel.launch import LaunchFailed, launch
from deepseek_moe.parallel.plan import ExpertShard, check_expert_parallel, expert_shard
from deepseek_moe.parallel.runtime import (
    ParallelContext,
    data_parallel,
    env_world_size,
    init_parallel,
    shutdown,
)
from deepseek_moe.parallel.training import DistributedTraining, check_training_layout

__all__ = [
    "AllToAllDispatcher",
    "CommStats",
    "DistributedTraining",
    "ExpertShard",
    "LaunchFailed",
    "ParallelContext",
    "all_reduce_sum",
    "check_expert_parallel",
    "check_model",
    "check_training_layout",
    "clip_grad_norm_",
    "comm_stats",
    "data_parallel",
    "env_world_size",
    "expert_parameters",
    "expert_shard",
    "full_optimizer_state",
    "full_state_dict",
    "gathered_model",
    "init_parallel",
    "launch",
    "load_full_optimizer_state",
    "load_full_state_dict",
    "parallelize_experts",
    "reset_comm_stats",
    "scale_expert_grads",
    "shutdown",
    "unwrap",
]
