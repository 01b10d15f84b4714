"""``deepseek-moe serve CKPT|RUN_DIR``: an OpenAI-compatible HTTP server (completions, chat, streaming) with
continuous batching over the paged latent KV cache. Needs the ``serve`` extra: ``pip install -e ".[serve]"``."""

from __future__ import annotations

import argparse
import ipaddress
import sys

from deepseek_moe.cli.main import UsageError

LOOPBACK = ("localhost",)


def register(sub: argparse._SubParsersAction) -> None:
    from deepseek_moe.serve.protocol import MAX_BODY_BYTES
    from deepseek_moe.serve.scheduler import SchedulerConfig

    d = SchedulerConfig()
    p = sub.add_parser("serve", help="serve a checkpoint with the OpenAI HTTP API", description=__doc__)
    p.add_argument("checkpoint", metavar="CKPT|RUN_DIR",
                   help="Hugging Face checkpoint directory (config.json, safetensors, tokenizer.json) or a train "
                   "run directory (its model/ is used)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1, this machine only)")
    p.add_argument("--port", type=int, default=8000, help="default 8000")
    p.add_argument("--served-model-name", metavar="NAME",
                   help="the model name clients send (default: the checkpoint or run directory's name)")
    p.add_argument("--max-batch-size", type=int, default=d.max_batch_size, metavar="N",
                   help=f"sequences decoded together per step (default {d.max_batch_size}; 1 turns batching off)")
    p.add_argument("--max-batch-tokens", type=int, default=d.max_batch_tokens, metavar="N",
                   help=f"tokens per step, prefill chunks included (default {d.max_batch_tokens})")
    p.add_argument("--kv-cache-memory", default=str(d.kv_cache_bytes), metavar="BYTES",
                   help="KV-cache budget: bytes or like 512MiB, 2GB (default 1GiB)")
    p.add_argument("--block-size", type=int, default=d.block_size, metavar="N",
                   help=f"tokens per KV-cache block (default {d.block_size})")
    p.add_argument("--max-queue", type=int, default=d.max_queue, metavar="N",
                   help=f"waiting requests beyond which new ones get 503 + Retry-After (default {d.max_queue}; "
                   ">= 1: every request waits in the queue until the next step admits it)")
    p.add_argument("--adapter", action="append", default=[], metavar="NAME=PATH",
                   help="serve a LoRA adapter directory (PEFT's format, e.g. a fine-tune's RUN/adapter) beside the "
                   "base model, applied unmerged, for requests whose model is NAME (repeatable; a bare PATH is "
                   "named after its directory)")
    p.add_argument("--no-prefix-cache", dest="prefix_cache", action="store_false",
                   help="compute every prompt in full: by default, cache blocks of prefixes requests share (a "
                   "system prompt, the turns of a chat) are kept after use and reused")
    p.add_argument("--speculative", choices=("ngram", "mtp"), metavar="DRAFTER",
                   help="speculative decoding: 'ngram' drafts by prompt lookup, 'mtp' with the checkpoint's "
                   "multi-token-prediction modules (trained with model.mtp_depth >= 1); verified in one forward "
                   "per step (same greedy output, same sampling distribution; counts in /metrics)")
    p.add_argument("--num-draft-tokens", type=int, default=d.num_draft_tokens, metavar="K",
                   help=f"with --speculative: the most tokens drafted per sequence and step "
                   f"(default {d.num_draft_tokens})")
    p.add_argument("--max-request-bytes", default=str(MAX_BODY_BYTES), metavar="BYTES",
                   help="larger request bodies get 413: bytes or like 512KiB, 16MiB (default 4MiB)")
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ... (default cpu)")
    p.add_argument("--dtype", choices=("float32", "bfloat16", "float16"),
                   help="weights' dtype (default: the checkpoint's)")
    p.add_argument("--threads", type=int, metavar="N", help="torch intra-op threads (default: torch's choice)")
    p.add_argument("--shutdown-timeout", type=float, default=30.0, metavar="S",
                   help="on Ctrl-C/SIGTERM, seconds requests in flight may take to finish (default 30)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from deepseek_moe.serve.scheduler import SchedulerConfig

    try:
        import starlette  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError as e:
        raise UsageError(f"serve needs the serve extra ({e.name} is missing): pip install 'deepseek_moe[serve]'") from e
    if args.max_queue < 1:  # every request passes through the queue, so 0 would refuse them all
        raise UsageError(f"--max-queue ({args.max_queue}) must be >= 1: every request waits in the queue until "
                         "the next scheduler step admits it, so 0 would refuse every request")
    try:
        body_bytes = _size(args.max_request_bytes)
    except ValueError as e:
        raise UsageError(str(e).replace("max_shard_size", "--max-request-bytes")) from e
    if body_bytes < 1024:
        raise UsageError(f"--max-request-bytes ({body_bytes}) must be >= 1024: smaller bodies cannot hold a request")
    try:
        kv_bytes = _size(args.kv_cache_memory)
        config = SchedulerConfig(max_batch_size=args.max_batch_size, max_batch_tokens=args.max_batch_tokens,
                                 kv_cache_bytes=kv_bytes, block_size=args.block_size, max_queue=args.max_queue,
                                 prefix_cache=args.prefix_cache, speculative=args.speculative,
                                 num_draft_tokens=args.num_draft_tokens)
    except ValueError as e:
        raise UsageError(str(e).replace("max_shard_size", "--kv-cache-memory")) from e
    from deepseek_moe.cli.adapter_arg import adapter_specs

    adapters = adapter_specs(args.adapter)
    from deepseek_moe.serve.adapters import check_adapters
    from deepseek_moe.serve.server import default_model_name

    try:  # a wrong adapter fails now, not in the loader thread after the port is taken
        check_adapters(adapters, reserved=(args.served_model_name or default_model_name(args.checkpoint),))
    except ValueError as e:
        raise UsageError(f"--adapter: {e}") from e
    if not 0 <= args.port < 65536:
        raise UsageError(f"--port ({args.port}) must be in [0, 65535]")
    if args.threads is not None and args.threads < 1:
        raise UsageError(f"--threads ({args.threads}) must be >= 1")
    if not _is_loopback(args.host):
        print(f"warning: listening on {args.host}, reachable from other machines; the server has no "
              "authentication", file=sys.stderr)

    from deepseek_moe.serve.server import serve

    serve(args.checkpoint, host=args.host, port=args.port, served_model_name=args.served_model_name,
          config=config, device=args.device, dtype=args.dtype, threads=args.threads,
          shutdown_timeout=args.shutdown_timeout, max_body_bytes=body_bytes, adapters=adapters)
    return 0


def _size(text: str) -> int:
    from deepseek_moe.io.save import parse_size

    return parse_size(int(text) if text.isdigit() else text)


def _is_loopback(host: str) -> bool:
    if host in LOOPBACK:
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
