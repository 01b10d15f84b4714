"""What does a sharded (DCP, format 3) training checkpoint cost against the whole-model safetensors files of
format 2, for the default `deepseek-moe train` model on one process?

Saves and loads each format in turn (interleaved, median of repeats) into a scratch directory: model, AdamW
state after one step, generator and routing state, trainer.json, fsynced as the Trainer does. Format 2 is
written here as it used to be written (the package only reads it now).

    python benchmarks/checkpoint_io.py [--reps 5] [--threads 2] [--dir /tmp/ckpt_bench]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import time
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from deepseek_moe.model.causal_lm import DeepSeekMoEForCausalLM
from deepseek_moe.moe.all_layers import routing_state
from deepseek_moe.train import state_codec
from deepseek_moe.train.build import build_model_config
from deepseek_moe.train.checkpoint import load_checkpoint, rng_state, save_checkpoint
from deepseek_moe.train.config import TrainConfig
from deepseek_moe.train.strategy import SingleProcess


def save_format2(state_dir: Path, step: int, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                 scheduler: Any) -> Path:
    """Format 2 as the package wrote it until format 3: the unsplit model in safetensors files, atomically."""
    final, tmp = state_dir / f"step-{step}", state_dir / f".tmp-step-{step}"
    tmp.mkdir(parents=True)
    model_state = model.state_dict()
    save_file({k: v.detach().clone().contiguous() for k, v in model_state.items()}, str(tmp / "model.safetensors"))
    optimizer_tensors, optimizer_layout = state_codec.encode(optimizer.state_dict())
    save_file(optimizer_tensors, str(tmp / "optimizer.safetensors"))
    rng_tensors, rng_layout = state_codec.encode({"global": rng_state(), "routing": routing_state(model)})
    save_file(rng_tensors, str(tmp / "rng.safetensors"))
    info = {"format": 2, "step": step, "data": {}, "scheduler": scheduler.state_dict(), "optimizer": optimizer_layout,
            "rng": rng_layout, "fingerprint": {k: list(v.shape) for k, v in model_state.items()}}
    (tmp / "trainer.json").write_text(json.dumps(info))
    for p in [*tmp.iterdir(), tmp]:
        fd = os.open(p, os.O_RDONLY)
        os.fsync(fd)
        os.close(fd)
    os.replace(tmp, final)
    return final


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--dir", default="/tmp/ckpt_bench")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    cfg = TrainConfig()
    model = DeepSeekMoEForCausalLM(build_model_config(cfg, cfg.data.vocab_size, 0))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda i: 1.0)
    x = torch.randint(0, cfg.data.vocab_size, (2, 64))
    model(x, labels=x).loss.backward()
    optimizer.step()
    strategy = SingleProcess(torch.device("cpu"))
    root = Path(args.dir)
    shutil.rmtree(root, ignore_errors=True)

    times: dict[str, list[float]] = {k: [] for k in ("save3", "load3", "save2", "load2")}
    sizes: dict[str, int] = {}
    for rep in range(args.reps):
        for fmt in (3, 2):
            state_dir = root / f"f{fmt}-{rep}"
            t = time.perf_counter()
            if fmt == 3:
                path = save_checkpoint(state_dir, 1, model=model, optimizer=optimizer, scheduler=scheduler,
                                       trainer={"data": {}}, keep_last=1, strategy=strategy)
            else:
                path = save_format2(state_dir, 1, model, optimizer, scheduler)
            times[f"save{fmt}"].append(time.perf_counter() - t)
            sizes[f"format{fmt}"] = sum(p.stat().st_size for p in path.iterdir())
            t = time.perf_counter()
            load_checkpoint(path, model=model, optimizer=optimizer, scheduler=scheduler, strategy=strategy)
            times[f"load{fmt}"].append(time.perf_counter() - t)
            shutil.rmtree(state_dir)
    med = {k: statistics.median(v) for k, v in times.items()}
    n_params = sum(p.numel() for p in model.parameters())
    print(f"default train model: {n_params / 1e6:.2f}M parameters, AdamW state, {args.reps} reps, "
          f"{args.threads} threads")
    print(f"{'format':<28}{'bytes':>14}{'save s':>10}{'load s':>10}")
    for fmt, name in ((3, "3: DCP + trainer.json"), (2, "2: safetensors + json")):
        print(f"{name:<28}{sizes[f'format{fmt}']:>14,}{med[f'save{fmt}']:>10.3f}{med[f'load{fmt}']:>10.3f}")
    print(json.dumps({"params": n_params, "bytes": sizes, "median_s": med, "reps": args.reps,
                      "threads": args.threads}))


if __name__ == "__main__":
    main()
