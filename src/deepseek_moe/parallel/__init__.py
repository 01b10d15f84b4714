"""FSDP2 + expert parallelism on torch.distributed: the only package that talks to it.

    check_expert_parallel(cfg, n)        the layout fits n ranks (before any process-group work)
    ep = auto_ep(n, moe_cfgs)            the default expert-parallel size for n ranks
    ctx = init_parallel(ep)              join torchrun's group, build the ("dp_mod_ep", "ep") DeviceMesh
    shard_model(model, ctx)              experts split over "ep", everything fully_shard-ed (meta or not)
    materialize(model, ctx.device)       allocate this rank's shards, single-process init of them
    parallelize_experts(model, ctx)      the expert split alone (DTensor experts + all-to-all dispatch)
    clip_grad_norm_(model, max_norm)     the global norm over every shard
    load_pretrained_sharded(model, path) a Hugging Face checkpoint straight into this rank's shards
    save_pretrained_sharded(model, path) one streamed from the ranks (a collective; nothing gathered whole)
    DistributedTraining.start(...)       all a training loop needs under torchrun (the Trainer's N-process strategy)
    launch(module, argv, n)              run ``python -m module`` on n local processes through torchrun
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
    comm_stats,
    expert_parameters,
    parallelize_experts,
    reset_comm_stats,
)
from deepseek_moe.parallel.fsdp import clip_grad_norm_, local_shard, materialize, shard_model
from deepseek_moe.parallel.launch import LaunchFailed, launch
from deepseek_moe.parallel.plan import ExpertShard, check_expert_parallel, expert_shard
from deepseek_moe.parallel.runtime import ParallelContext, auto_ep, env_world_size, init_parallel, shutdown
from deepseek_moe.parallel.shard_io import load_pretrained_sharded, save_pretrained_sharded
from deepseek_moe.parallel.training import DistributedTraining, check_training_layout

__all__ = [
    "AllToAllDispatcher",
    "CommStats",
    "DistributedTraining",
    "ExpertShard",
    "LaunchFailed",
    "ParallelContext",
    "all_reduce_sum",
    "auto_ep",
    "check_expert_parallel",
    "check_model",
    "check_training_layout",
    "clip_grad_norm_",
    "comm_stats",
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
    "load_pretrained_sharded",
    "local_shard",
    "materialize",
    "parallelize_experts",
    "reset_comm_stats",
    "save_pretrained_sharded",
    "shard_model",
    "shutdown",
]
