"""Serving: continuous batching over the paged latent KV cache (``scheduler``, no HTTP) and an OpenAI-compatible
HTTP server over it (``app``, ``server``; these need the ``serve`` extra: starlette and uvicorn)."""

from deepseek_moe.serve.metrics import ServeMetrics
from deepseek_moe.serve.scheduler import (
    FinishEvent,
    QueueFullError,
    Request,
    SamplingParams,
    Scheduler,
    SchedulerConfig,
    TokenEvent,
)
from deepseek_moe.serve.server import load_served_model, serve

__all__ = ["FinishEvent", "QueueFullError", "Request", "SamplingParams", "Scheduler", "SchedulerConfig",
           "ServeMetrics", "TokenEvent", "load_served_model", "serve"]
