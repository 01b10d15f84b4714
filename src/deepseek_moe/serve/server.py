"""``serve(path)``: load a checkpoint and serve it over HTTP until interrupted (``deepseek-moe serve`` calls it).

The server listens at once and loads in a background thread, so ``GET /health`` answers 503 ("loading") until
the model is loaded and the scheduler runs, then 200. On SIGINT/SIGTERM uvicorn stops accepting connections and
requests in flight may finish for up to ``shutdown_timeout`` seconds; then the scheduler ends whatever is left
with a "shutdown" error (a 503, or a final error event and ``[DONE]`` on a stream), and the process exits.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Any

from deepseek_moe.io.locate import checkpoint_dir
from deepseek_moe.serve.scheduler import Scheduler, SchedulerConfig, describe

log = logging.getLogger("uvicorn.error")  # shown in the same stream and format as uvicorn's own lines


def default_model_name(target: str | os.PathLike[str]) -> str:
    """The checkpoint directory's name, or the run directory's for a train run (not its ``model/``)."""
    return Path(target).resolve().name


def check_servable(ckpt: Path, config: SchedulerConfig | None = None) -> None:
    """Refuse, by config.json alone, a model whose outputs would depend on the batch it is served in, or one that
    cannot serve as ``config`` asks (MTP drafting without MTP modules)."""
    from deepseek_moe.io import CheckpointError
    from deepseek_moe.io.load import read_config

    model_config = read_config(ckpt)[1]
    if config is not None and config.speculative == "mtp" and model_config.mtp_depth < 1:
        raise CheckpointError(
            f"{ckpt / 'config.json'}: --speculative mtp drafts with the model's multi-token-prediction modules, "
            "and this checkpoint has mtp_depth 0 (no MTP layer): serve one trained with model.mtp_depth >= 1, or "
            "draft with --speculative ngram")
    moe = model_config.moe
    if moe.capacity_factor is not None and moe.drop_at_inference:
        raise CheckpointError(
            f"{ckpt / 'config.json'}: drop_at_inference is true (with capacity_factor {moe.capacity_factor}): "
            "tokens over an expert's capacity would be dropped at inference, and which are dropped depends on "
            "the other requests in the batch, so a request's output would too; set drop_at_inference to false "
            "in config.json to serve this model")


def load_served_model(path: str | os.PathLike[str], *, name: str | None = None,
                      config: SchedulerConfig | None = None, device: str = "cpu",
                      dtype: str | None = None,
                      adapters: Sequence[tuple[str, str | os.PathLike[str]]] = ()) -> Any:  # -> ServedModel
    """Load ``path`` (a checkpoint or train run directory) with ``deepseek_moe.from_pretrained`` and start its
    scheduler. ``name`` defaults to the checkpoint directory's name (the run directory's for a run).
    ``adapters``: (name, directory) of LoRA adapters (PEFT's format) served beside the base model, each selected
    by requests whose ``model`` is its name."""
    from deepseek_moe.io import CheckpointError, load_pretrained
    from deepseek_moe.serve.app import ServedModel
    from deepseek_moe.serve.text import ChatTemplate, stop_token_ids

    target = Path(path)
    ckpt = checkpoint_dir(target)
    check_servable(ckpt, config)
    model = load_pretrained(ckpt, device=device, dtype=dtype)
    if model.tokenizer is None:
        raise CheckpointError(f"{ckpt}: no tokenizer.json; the server needs the checkpoint's tokenizer")
    from deepseek_moe.serve.adapters import load_adapters

    served_name = name or default_model_name(target)
    scheduler = Scheduler(model, config, adapters=load_adapters(model, adapters, reserved=(served_name,)))
    served = ServedModel(name=served_name,
                         scheduler=scheduler, tokenizer=model.tokenizer,
                         chat_template=ChatTemplate.for_checkpoint(ckpt),
                         stop_token_ids=stop_token_ids(model.config.eos_token_id, model.tokenizer,
                                                       model.config.vocab_size))
    scheduler.start()
    return served


def serve(path: str | os.PathLike[str], *, host: str = "127.0.0.1", port: int = 8000,
          served_model_name: str | None = None, config: SchedulerConfig | None = None, device: str = "cpu",
          dtype: str | None = None, threads: int | None = None, shutdown_timeout: float = 30.0,
          log_level: str = "info", max_body_bytes: int | None = None,
          adapters: Sequence[tuple[str, str | os.PathLike[str]]] = ()) -> None:
    """Serve the checkpoint at ``path`` with the OpenAI HTTP API on ``host:port`` until SIGINT/SIGTERM.
    ``max_body_bytes``: larger request bodies get a 413 (default ``protocol.MAX_BODY_BYTES``, 4 MiB).
    ``adapters``: (name, directory) of LoRA adapters served beside the base model (``load_served_model``)."""
    import torch
    import uvicorn

    from deepseek_moe.serve.app import AppState, build_app
    from deepseek_moe.serve.protocol import MAX_BODY_BYTES

    if threads is not None:
        torch.set_num_threads(threads)
    check_servable(checkpoint_dir(path), config)  # a wrong path or an unservable model fails now, not in the loader
    from deepseek_moe.serve.adapters import check_adapters

    check_adapters(adapters, reserved=(served_model_name or default_model_name(path),))
    state = AppState()

    def load() -> None:
        try:
            state.served = load_served_model(path, name=served_model_name, config=config, device=device,
                                             dtype=dtype, adapters=adapters)
            info = describe(state.served.scheduler)
            log.info("serving %s: KV cache of %d blocks x %d tokens (%d bytes/token, %d tokens)",
                     state.served.name, info["blocks"], info["block_size"], info["bytes_per_token"],
                     info["tokens"])
        except Exception as e:
            state.load_error = f"{type(e).__name__}: {e}"
            log.error("loading %s failed: %s", path, state.load_error)

    @contextlib.asynccontextmanager
    async def lifespan(app: Any) -> AsyncIterator[None]:
        yield
        if state.served is not None:
            # uvicorn has waited for the requests in flight; whatever is left now is ended cleanly.
            state.served.scheduler.shutdown(timeout=0.0)

    class Server(uvicorn.Server):
        async def startup(self, sockets: Any = None) -> None:
            await super().startup(sockets)
            if self.started:  # load only once the port is ours: a taken port fails fast, with nothing to stop
                threading.Thread(target=load, name="deepseek-moe-loader", daemon=True).start()

        async def shutdown(self, sockets: Any = None) -> None:
            # The scheduler drains (finishing what it can within shutdown_timeout, then ending the rest with a
            # "shutdown" event, which each handler turns into a clean 503 or final error event) while uvicorn
            # waits for those handlers; uvicorn's own timeout is only a backstop.
            if state.served is not None:
                threading.Thread(target=state.served.scheduler.shutdown, kwargs={"timeout": shutdown_timeout},
                                 name="deepseek-moe-drain", daemon=True).start()
            await super().shutdown(sockets)

    app = build_app(state, lifespan=lifespan, max_body_bytes=max_body_bytes or MAX_BODY_BYTES)
    server = Server(uvicorn.Config(app, host=host, port=port, log_level=log_level, access_log=False,
                                   timeout_graceful_shutdown=round(shutdown_timeout) + 5))
    server.run()
