"""A tiny served checkpoint (built in seconds, no downloads) and a real server process on a free loopback port."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import torch

from deepseek_moe import DeepSeekMoEForCausalLM, ModelConfig, MoEConfig, save_pretrained
from deepseek_moe.train.tokenizer import train_tokenizer

EOS_ID = 0  # the tokenizer's <|endoftext|>
TEXTS = ["def add(a, b):\n    return a + b\n", "The quick brown fox jumps over the lazy dog. ",
         "Serving many requests at once: continuous batching admits and retires sequences every step. ",
         "import torch\nx = torch.zeros(3)\nprint(x.sum())\n", "héllo wörld ünïcode ✓ 漢字 "] * 20


def tiny_config(vocab_size: int, max_seq_len: int = 256) -> ModelConfig:
    dim = 64
    return ModelConfig(
        vocab_size=vocab_size, dim=dim, inter_dim=128, n_layers=3, n_dense_layers=1, n_heads=2, q_lora_rank=0,
        kv_lora_rank=32, qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16, max_seq_len=max_seq_len,
        original_seq_len=max_seq_len, eos_token_id=EOS_ID,
        moe=MoEConfig(dim=dim, moe_inter_dim=32, n_routed_experts=8, n_activated_experts=2, n_shared_experts=1,
                      n_expert_groups=2, n_limited_groups=1),
    )


def build_checkpoint(path: Path, seed: int = 0, max_seq_len: int = 256) -> Path:
    tokenizer = train_tokenizer(TEXTS, 400)
    torch.manual_seed(seed)
    model = DeepSeekMoEForCausalLM(tiny_config(tokenizer.get_vocab_size(), max_seq_len))
    with torch.no_grad():  # a sharper random model: greedy choices far from ties
        model.head.weight.mul_(20.0)
    model.tokenizer = tokenizer
    save_pretrained(model, path)
    return path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextmanager
def running_server(checkpoint: Path, *extra: str, name: str = "tiny") -> Iterator[tuple[str, subprocess.Popen]]:
    """``deepseek-moe serve`` in a child process; yields (base URL, process); SIGTERM and wait on exit."""
    port = free_port()
    cmd = [sys.executable, "-m", "deepseek_moe.cli.main", "serve", str(checkpoint), "--port", str(port),
           "--served-model-name", name, "--threads", "1", *extra]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"server exited with {proc.returncode}:\n{proc.stdout.read() if proc.stdout else ''}")
            try:
                if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError("server did not become healthy in 60 s")
            time.sleep(0.1)
        yield url, proc
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
