"""``run(cfg)``: train a DeepSeekMoE language model end to end and leave a run directory behind.

Order of one optimizer step: routing stage → micro-batches (forward, backward) → clip → optimizer step →
restore frozen experts → routing-bias update (counts of all micro-batches) → lr step. Validation and
checkpoints happen between steps, at the same steps in a resumed run as in an uninterrupted one, which is
what makes resume exact.
"""

from __future__ import annotations

import contextlib
import json
import math
import random
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import numpy as np
import torch
from safetensors.torch import save_file
from tqdm import tqdm

from deepseek_moe.config import ModelConfig
from deepseek_moe.moe.all_layers import set_uniform_routing
from deepseek_moe.moe.bias import update_routing_bias
from deepseek_moe.train import checkpoint as ckpt
from deepseek_moe.train.config import TrainConfig
from deepseek_moe.train.corpus import load_corpus
from deepseek_moe.train.data import PackedSequences, cached_tokens, tokenizer_sha256, unigram_entropy
from deepseek_moe.train.errors import TrainError
from deepseek_moe.train.optim import build_optimizer
from deepseek_moe.train.report import plot_heatmap, plot_loss
from deepseek_moe.train.routing import (
    ExpertFreezer,
    dropped_fraction,
    layer_counts,
    layer_names,
    load_summary,
    orthogonal_init_experts,
)
from deepseek_moe.train.rundir import MetricsLog, default_run_dir, prepare_run_dir, write_json
from deepseek_moe.train.schedule import lr_factor, routing_stage
from deepseek_moe.train.tokenizer import EOS, default_cache_dir, get_tokenizer


@dataclass
class RunResult:
    run_dir: Path
    steps: int
    val_loss: float
    unigram_entropy: float
    tokens_per_s: float
    wall_s: float
    sample: str


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as e:
        raise TrainError(f"device ({name!r}) is not a torch device: {e}") from e
    if device.type == "cuda" and not torch.cuda.is_available():
        raise TrainError(f"device ({name!r}) asks for CUDA, which this machine does not have")
    return device


def autocast_dtype(dtype: str, device: torch.device) -> torch.dtype | None:
    """bf16 autocast where asked (or "auto" on CUDA); None runs in fp32."""
    if dtype == "bf16" or (dtype == "auto" and device.type == "cuda"):
        return torch.bfloat16
    return None


def build_model_config(cfg: TrainConfig, vocab_size: int, eos_id: int | None) -> ModelConfig:
    from deepseek_moe.presets import get_preset

    try:
        base = get_preset(cfg.model.preset)
    except (KeyError, ValueError) as e:
        raise TrainError(f"model.preset ({cfg.model.preset!r}) is not a preset: {e}") from e
    data = base.to_dict()
    for key, value in cfg.model.overrides.items():
        data[key] = {**data["moe"], **value} if key == "moe" else value
    data["vocab_size"] = vocab_size  # always the tokenizer's
    data["max_seq_len"] = max(data["max_seq_len"], cfg.data.seq_len)
    data["eos_token_id"] = eos_id
    data["moe"]["seed"] = cfg.seed
    try:
        return ModelConfig.from_dict(data)
    except ValueError as e:
        raise TrainError(f"model config (preset {cfg.model.preset!r} with model.overrides): {e}") from e


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def run(cfg: TrainConfig, *, resume: bool = False, force: bool = False, progress: bool = True) -> RunResult:
    """Train per ``cfg`` into ``cfg.out``; with ``resume``, continue the run there from its latest checkpoint."""
    from deepseek_moe.model.causal_lm import DeepSeekMoEForCausalLM

    t_start = time.perf_counter()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    device = resolve_device(cfg.device)
    # Started by torchrun: check the expert layout, then join the process group (None on one process).
    dt = start_distributed(cfg, device)
    main = dt is None or dt.is_main
    device = dt.device if dt is not None else device
    log = _printer(progress and main)
    run_dir = Path(cfg.out) if cfg.out else default_run_dir()
    if dt is not None and not main:
        dt.barrier()  # rank 0 prepares the run directory and fills the data caches first
    if main:
        prepare_run_dir(run_dir, resume=resume, force=force)
    amp = autocast_dtype(cfg.dtype, device)
    seed_everything(cfg.seed)

    # Data: corpus → tokenizer (cached) → token arrays (cached, memory-mapped).
    cache_dir = Path(cfg.data.cache_dir).expanduser() if cfg.data.cache_dir else default_cache_dir()
    corpus = load_corpus(cfg.data.paths, text_field=cfg.data.text_field, val_fraction=cfg.data.val_fraction)
    tok = get_tokenizer(corpus, cfg.data.vocab_size, cache_dir)
    tok_hash = tokenizer_sha256(tok)
    key = f"{corpus.sha256[:16]}-{tok_hash[:16]}"
    train_tokens = cached_tokens(corpus.train, tok, cache_dir, f"{key}-train")
    val_tokens = cached_tokens(corpus.val, tok, cache_dir, f"{key}-val")
    train_seqs = PackedSequences(train_tokens, cfg.data.seq_len, cfg.seed)
    val_seqs = PackedSequences(val_tokens, cfg.data.seq_len, cfg.seed)
    val_batches = val_seqs.fixed_batches(cfg.schedule.batch_size, cfg.eval.batches)
    vocab = tok.get_vocab_size()
    h_unigram = unigram_entropy(val_tokens, vocab)
    if dt is not None and main:
        dt.barrier()

    # Model and optimizer.
    model_cfg = build_model_config(cfg, vocab, tok.token_to_id(EOS))
    torch.manual_seed(cfg.seed)
    model = DeepSeekMoEForCausalLM(model_cfg)
    if cfg.routing.orthogonal_init:
        orthogonal_init_experts(model)
    model.tokenizer = tok
    model.to(device).train()
    n_params = sum(p.numel() for p in model.parameters())
    # N processes: routed experts split over the ranks (model keeps its slice), the rest DDP (train_model).
    train_model = dt.wrap(model) if dt is not None else model
    optimizer = build_optimizer(model, cfg.optim)
    s = cfg.schedule
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda i: lr_factor(
        i, steps=s.steps, warmup_steps=s.warmup_steps, min_lr_ratio=s.min_lr_ratio))

    resolved = {**cfg.to_dict(), "out": str(run_dir), "resolved_model": model_cfg.to_dict(),
                "corpus": {**corpus.describe(), "train_tokens": len(train_tokens), "val_tokens": len(val_tokens)},
                "tokenizer": {"vocab_size": vocab, "sha256": tok_hash}}
    state_dir = run_dir / "state"
    start = 0
    latest = ckpt.step_dirs(state_dir)[-1] if resume and ckpt.step_dirs(state_dir) else None
    if latest is not None:
        info = ckpt.load_checkpoint(latest, model=model, optimizer=optimizer, scheduler=scheduler, shards=dt)
        train_seqs.load_state_dict(info["data"])
        start = int(info["step"])
        log(f"resuming {run_dir} from {latest.name}")
    elif resume:
        log(f"{run_dir} has no checkpoint yet: starting it from step 0")
    if main:
        write_json(run_dir / "config.json", resolved)
    metrics = (MetricsLog(run_dir / "metrics.jsonl", keep_through_step=start if resume else None) if main
               else _Discard())
    log(f"model {cfg.model.preset}: {n_params / 1e6:.2f}M parameters, vocab {vocab}; data {corpus.source}: "
        f"{len(train_tokens):,} train / {len(val_tokens):,} val tokens; device {device}, "
        f"{'bf16 autocast' if amp else 'fp32'}; run dir {run_dir}")

    freezer: ExpertFreezer | None = None
    tokens_per_step = s.batch_size * s.grad_accum_steps * cfg.data.seq_len
    window_tokens, window_t = 0, time.perf_counter()
    train_t0, train_tokens_done = time.perf_counter(), 0
    val_loss = float("nan")
    bar = tqdm(total=s.steps, initial=start, disable=not (progress and main), dynamic_ncols=True, file=sys.stderr,
               desc="train")
    try:
        for step in range(start, s.steps):
            stage = routing_stage(cfg, step)
            set_uniform_routing(model, stage == 1)
            if stage == 3 and cfg.routing.frozen_experts and freezer is None:
                freezer = ExpertFreezer(model, cfg.routing.frozen_experts)

            ce_sum, aux_sum = 0.0, 0.0
            counts = None
            for _ in range(s.grad_accum_steps):
                batch = train_seqs.next_batch(s.batch_size).to(device)
                if dt is not None:  # every rank draws the global batch and keeps its slice
                    batch = dt.local(batch)
                with torch.autocast(device.type, dtype=amp) if amp else contextlib.nullcontext():
                    out = train_model(batch, labels=batch)
                (out.loss / s.grad_accum_steps).backward()
                ce_sum += float(out.ce_loss.detach())
                aux_sum += float(out.aux_loss.detach())
                c = layer_counts(model)
                counts = c if counts is None or c is None else counts + c
            if dt is not None:  # the global batch's numbers, and the same decision on every rank
                ce_sum, aux_sum = dt.mean(ce_sum, aux_sum)
                counts = dt.sum(counts) if counts is not None else None
            if not math.isfinite(ce_sum):
                raise TrainError(f"the loss became {ce_sum} at step {step + 1}; lower optim.lr "
                                 f"({cfg.optim.lr}) or check the data")
            if cfg.optim.grad_clip > 0 and dt is not None:
                dt.clip_grad_norm_(model, cfg.optim.grad_clip)  # the norm includes every rank's expert slices
            elif cfg.optim.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.optim.grad_clip)
            optimizer.step()
            if freezer is not None:
                freezer.restore()
            update_routing_bias(model, all_reduce=dt.all_reduce if dt is not None else None)
            lr = optimizer.param_groups[0]["lr"]
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)

            done = step + 1
            window_tokens += tokens_per_step
            train_tokens_done += tokens_per_step
            ce = ce_sum / s.grad_accum_steps
            loads = load_summary(counts) if counts is not None else {"imbalance": float("nan"), "cv": float("nan")}
            dropped = dropped_fraction(model)
            bar.update(1)
            if done % cfg.eval.log_every == 0 or done == s.steps:
                now = time.perf_counter()
                tps = window_tokens / max(now - window_t, 1e-9)
                window_tokens, window_t = 0, now
                metrics.write({"kind": "train", "step": done, "loss": ce + aux_sum / s.grad_accum_steps,
                               "ce_loss": ce, "aux_loss": aux_sum / s.grad_accum_steps, "lr": lr,
                               "tokens_per_s": tps, "imbalance": loads["imbalance"], "cv": loads["cv"],
                               "dropped": dropped, "stage": stage, "epoch": train_seqs.epochs_done})
                bar.set_postfix(loss=f"{ce:.3f}", tok_s=f"{tps:,.0f}", lr=f"{lr:.2e}", imb=f"{loads['imbalance']:.2f}",
                                drop=f"{dropped:.1%}", stage=stage, refresh=False)
            if done % cfg.eval.every == 0 or done == s.steps:
                val_loss, val_counts = evaluate(model, val_batches, device, amp, dt=dt)
                metrics.write({"kind": "val", "step": done, "val_loss": val_loss, "val_ppl": math.exp(val_loss)})
                if val_counts is not None and main:
                    write_json(run_dir / "routing.json", {"step": done, "layers": layer_names(model),
                                                          "counts": val_counts.tolist(), "source": "validation"})
                log(f"step {done}: validation loss {val_loss:.3f}, perplexity {math.exp(val_loss):.1f} "
                    f"(unigram entropy {h_unigram:.3f})")
            if (cfg.checkpoint.every and done % cfg.checkpoint.every == 0) or done == s.steps:
                ckpt.save_checkpoint(state_dir, done, model=model, optimizer=optimizer, scheduler=scheduler,
                                     trainer={"data": train_seqs.state_dict()}, keep_last=cfg.checkpoint.keep_last,
                                     shards=dt)
    except KeyboardInterrupt:
        bar.close()
        saved = ckpt.step_dirs(state_dir)
        log(f"interrupted; {'the latest checkpoint is ' + saved[-1].name if saved else 'no checkpoint yet'}: "
            f"continue with  deepseek-moe train --resume {run_dir}")
        raise
    bar.close()
    train_s = time.perf_counter() - train_t0
    # The final number, on the whole validation split (the passes above use eval.batches of it).
    val_loss, _ = evaluate(model, val_seqs.fixed_batches(s.batch_size), device, amp, dt=dt)
    if freezer is not None:
        freezer.remove()

    tokens_per_s = train_tokens_done / max(train_s, 1e-9)
    if dt is not None:  # rank 0 exports and samples from the gathered, single-process model
        model = dt.gathered(model)
        if not main:
            dt.barrier()
            dt.close()
            return RunResult(run_dir, s.steps, val_loss, h_unigram, tokens_per_s, time.perf_counter() - t_start, "")
    result = _finish(cfg, model, run_dir, cast(MetricsLog, metrics), tok, start=start, val_loss=val_loss, h_unigram=h_unigram,
                     tokens_per_s=tokens_per_s, t_start=t_start, log=log)
    if dt is not None:
        dt.barrier()
        dt.close()
    return result


def start_distributed(cfg: TrainConfig, device: torch.device) -> Any:
    """A DistributedTraining under torchrun (WORLD_SIZE > 1), else None. A model or batch that does not fit the
    process count fails here, before any process-group work."""
    from deepseek_moe.parallel import DistributedTraining, env_world_size

    if env_world_size() == 1:
        return None
    try:
        moe = build_model_config(cfg, cfg.data.vocab_size, 0).moe  # the layout does not depend on the vocabulary
        return DistributedTraining.start(moe, cfg.schedule.batch_size, device)
    except ValueError as e:
        raise TrainError(f"cannot train on {env_world_size()} processes: {e}") from e


class _Discard:
    """Metrics sink of the ranks other than 0 (rank 0 writes the run directory)."""

    def write(self, record: dict[str, Any]) -> None:
        pass


@torch.no_grad()
def evaluate(model: torch.nn.Module, batches: list[torch.Tensor], device: torch.device,
             amp: torch.dtype | None, *, dt: Any = None) -> tuple[float, torch.Tensor | None]:
    """Mean validation cross-entropy (nats/token) and the (L, E) expert counts over the same tokens.

    ``dt`` (N processes): every rank must call this; each evaluates its slice of a batch (a batch the ranks
    cannot share equally is evaluated whole by each) and the sums are taken over ranks."""
    model.eval()
    # [total, n, counts] of the batches shared over ranks, then of those every rank evaluates whole
    sums: list[list[Any]] = [[0.0, 0.0, None], [0.0, 0.0, None]]
    for batch in batches:
        batch = batch.to(device)
        part = sums[0] if dt is not None and dt.is_split(batch) else sums[1]
        if dt is not None:
            batch = dt.local(batch)
        with torch.autocast(device.type, dtype=amp) if amp else contextlib.nullcontext():
            out = model(batch, labels=batch)
        k = batch.numel() - batch.shape[0]  # predictions per batch: the model shifts labels by one
        part[0] += float(out.ce_loss) * k
        part[1] += k
        c = layer_counts(model)
        part[2] = c if part[2] is None or c is None else part[2] + c
    model.train()
    if dt is not None:
        sliced = dt.sum(torch.tensor(sums[0][:2], dtype=torch.float64)).tolist()
        sums[0][:2] = sliced
        if sums[0][2] is not None:
            sums[0][2] = dt.sum(sums[0][2])
    total, n = sums[0][0] + sums[1][0], sums[0][1] + sums[1][1]
    counts = [c for _, _, c in sums if c is not None]
    return total / n, (counts[0] + counts[1] if len(counts) == 2 else counts[0] if counts else None)


def _finish(cfg: TrainConfig, model: Any, run_dir: Path, metrics: MetricsLog, tok: Any, *, start: int,
            val_loss: float, h_unigram: float, tokens_per_s: float, t_start: float, log: Any) -> RunResult:
    from deepseek_moe.infer.generate import generate

    model.eval()
    save_model(model, run_dir / "model", log)
    sample = ""
    if cfg.eval.sample_tokens > 0:
        prompt = tok.encode(cfg.eval.sample_prompt, add_special_tokens=False).ids or [tok.token_to_id(EOS)]
        out = generate(model, [prompt], max_new_tokens=cfg.eval.sample_tokens, temperature=cfg.eval.temperature,
                       top_k=cfg.eval.top_k or None, stop_tokens=[tok.token_to_id(EOS)], seed=cfg.seed)
        sample = tok.decode(out.sequences[0])
        (run_dir / "sample.txt").write_text(sample + "\n")
    wall_s = time.perf_counter() - t_start
    summary = {"kind": "summary", "step": cfg.schedule.steps, "resumed_from": start, "val_loss": val_loss,
               "val_ppl": math.exp(val_loss), "unigram_entropy": h_unigram,
               "below_unigram": h_unigram - val_loss, "tokens_per_s": tokens_per_s, "wall_s": wall_s}
    metrics.write(summary)
    records = [json.loads(line) for line in metrics.path.read_text().splitlines() if line.strip()]
    plot_loss(records, run_dir / "loss.png", unigram_entropy=h_unigram)
    routing_path = run_dir / "routing.json"
    if routing_path.is_file():
        plot_heatmap(json.loads(routing_path.read_text()), run_dir / "routing_heatmap.png")
    log(f"validation loss (whole split) {val_loss:.3f} nats/token, perplexity {math.exp(val_loss):.1f}; "
        f"unigram entropy of the validation split {h_unigram:.3f} nats/token: {h_unigram - val_loss:.3f} below it")
    log(f"{tokens_per_s:,.0f} tokens/s, {wall_s:.0f} s in all; wrote {run_dir}")
    if sample:
        log(f"--- sample ---\n{sample}\n--------------")
    return RunResult(run_dir, cfg.schedule.steps, val_loss, h_unigram, tokens_per_s, wall_s, sample)


def hf_incompatibility(cfg: ModelConfig) -> str | None:
    """Why transformers' DeepSeek classes cannot hold this model, or None when they can."""
    from deepseek_moe.io import config_to_hf

    try:
        config_to_hf(cfg)
    except ValueError as e:
        return str(e)
    return None


def save_model(model: Any, path: Path, log: Any) -> None:
    """The Hugging Face checkpoint; for a config transformers cannot express, our own names and config.json."""
    from deepseek_moe.io import save_pretrained

    reason = hf_incompatibility(model.config)
    if reason is None:
        save_pretrained(model, path)
        return
    path.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().cpu().clone().contiguous() for k, v in model.state_dict().items()}
    save_file(tensors, str(path / "model.safetensors"), metadata={"format": "deepseek_moe"})
    write_json(path / "config.json", {"format": "deepseek_moe", **model.config.to_dict()})
    model.tokenizer.save(str(path / "tokenizer.json"))
    log(f"note: {reason}; wrote {path} with this package's parameter names instead of the Hugging Face ones")


def _printer(enabled: bool) -> Any:
    def log(message: str) -> None:
        if enabled:
            tqdm.write(message, file=sys.stdout)
    return log


__all__ = ["RunResult", "autocast_dtype", "build_model_config", "evaluate", "resolve_device", "run"]
