"""``run(cfg)``: train a DeepSeekMoE language model end to end and leave a run directory behind.

A :class:`Trainer` is one run: ``setup`` (processes, run directory, data, model, optimizer, resumed state),
then ``step`` once per optimizer step, with ``evaluate`` and ``save`` between steps, then ``finish`` (the final
validation, ``model/``, a sample, the plots). ``fit`` is that loop. How the work spreads over processes is the
strategy's business (``train.strategy``); the Trainer reads the same on one process as on N.

Order of one optimizer step: routing stage → micro-batches (forward, backward) → clip → optimizer step →
restore frozen experts → routing-bias update (counts of all micro-batches) → lr step. Validation and
checkpoints happen between steps, at the same steps in a resumed run as in an uninterrupted one, which is
what makes resume exact.
"""

from __future__ import annotations

import contextlib
import json
import math
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from tqdm import tqdm

from deepseek_moe.device import keep_freed_memory, release_freed_memory, resolve_device
from deepseek_moe.moe.all_layers import (
    load_routing_state,
    moe_layers,
    routing_state,
    set_entropy_scale,
    set_uniform_routing,
)
from deepseek_moe.moe.bias import update_routing_bias
from deepseek_moe.moe.capacity import capacity_factors, update_capacity
from deepseek_moe.nn.compute_copy import attach as attach_compute_copies
from deepseek_moe.train import checkpoint as ckpt
from deepseek_moe.train.build import (
    autocast,
    build_model_config,
    load_data,
    resolve_precision,
    seed_everything,
)
from deepseek_moe.train.config import TrainConfig
from deepseek_moe.train.errors import TrainError
from deepseek_moe.train.optim import build_optimizer
from deepseek_moe.train.report import plot_heatmap, plot_loss
from deepseek_moe.train.routing import (
    ExpertFreezer,
    drop_counts,
    layer_names,
    load_summary,
    orthogonal_init_experts,
    reset_traffic,
    traffic_counts,
)
from deepseek_moe.train.rundir import (
    MetricsLog,
    check_same_plan,
    default_run_dir,
    prepare_run_dir,
    write_json,
)
from deepseek_moe.train.schedule import entropy_scale, lr_factor, routing_stage
from deepseek_moe.train.strategy import Strategy, start_strategy
from deepseek_moe.viz import routing_counts

if TYPE_CHECKING:
    from deepseek_moe.config import ModelConfig
    from deepseek_moe.model.causal_lm import DeepSeekMoEForCausalLM


@dataclass
class RunResult:
    run_dir: Path
    steps: int
    val_loss: float
    unigram_entropy: float
    tokens_per_s: float
    wall_s: float
    sample: str


@dataclass
class StepResult:
    """What one optimizer step reports (numbers of the global batch, means over its micro-batches)."""

    step: int  # steps done, this one included
    stage: int
    ce_loss: float
    aux_loss: float
    lr: float  # the rate this step used
    counts: torch.Tensor | None  # (L, E) tokens per expert over the step's micro-batches
    dropped: float  # fraction of the step's assignments dropped, over all processes
    # All-to-all traffic of the step's forwards over all processes, per token and MoE layer (empty on 1 process):
    # a2a_bytes_per_token (dispatch + combine, to other processes), a2a_ranks_per_token (processes reached).
    traffic: dict[str, float] = field(default_factory=dict)
    # With MTP modules: (1/D) Σ_k CE_k (mean over micro-batches and processes) and the λ the step weighted it by.
    mtp_loss: float | None = None
    mtp_lambda: float | None = None
    # Mean normalised routing entropy over the MoE layers and micro-batches (None under uniform routing), and
    # each layer's capacity factor after this step's adaptive update (empty when no layer adapts).
    routing_entropy: float | None = None
    capacity: list[float] = field(default_factory=list)


def run(cfg: TrainConfig, *, resume: bool = False, force: bool = False, progress: bool = True) -> RunResult:
    """Train per ``cfg`` into ``cfg.out``; with ``resume``, continue the run there from its latest checkpoint."""
    return Trainer(cfg, resume=resume, force=force, progress=progress).fit()


class Trainer:
    def __init__(self, cfg: TrainConfig, *, resume: bool = False, force: bool = False,
                 progress: bool = True) -> None:
        self.cfg, self.resume, self.force, self.progress = cfg, resume, force, progress
        self.t_start = time.perf_counter()
        self.freezer: ExpertFreezer | None = None
        self.update_bias = True  # the routing-bias update after each step (a fine-tune with a frozen router: off)
        self.model_name = f"model {cfg.model.preset}"  # for the log

    # ---- setup ------------------------------------------------------------------------------------------
    def setup(self) -> None:
        cfg = self.cfg
        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        malloc = (", malloc keeps freed memory" if cfg.keep_freed_memory is True and keep_freed_memory() else
                  ", malloc releases freed memory" if cfg.keep_freed_memory == "release" and release_freed_memory()
                  else "")
        try:
            device = resolve_device(cfg.device)
        except ValueError as e:
            raise TrainError(f"device: {e}") from e
        # Under torchrun: check the expert layout, then join the process group.
        self.strategy: Strategy = start_strategy(cfg, device)
        self.device = self.strategy.device
        self.log = _printer(self.progress and self.strategy.is_main)
        self.run_dir = Path(cfg.out) if cfg.out else default_run_dir()
        self.state_dir = self.run_dir / "state"
        self.precision = resolve_precision(cfg.dtype, self.device)
        self.amp = self.precision.amp
        seed_everything(cfg.seed)
        created = self.strategy.is_main and not self.run_dir.exists()
        try:
            with self.strategy.main_first():  # rank 0 prepares the run directory and fills the data caches
                if self.strategy.is_main:
                    prepare_run_dir(self.run_dir, resume=self.resume, force=self.force)
                    if self.resume:
                        check_same_plan(self.run_dir, cfg)
                self.data = self.load_data()
        except BaseException:
            if created:  # a run refused for its data leaves no empty runs/<timestamp>/ behind
                with contextlib.suppress(OSError):
                    self.run_dir.rmdir()  # only ever removes an empty directory
            raise
        self.val_batches = self.data.val.fixed_batches(cfg.schedule.batch_size, cfg.eval.batches)

        model_cfg = self.model_config()
        self.model = self.build_model(model_cfg)  # on N processes: on the meta device, wrap materialises it
        n_params = sum(p.numel() for p in self.model.parameters())
        self.train_model = self.strategy.wrap(self.model)  # what the step calls (on N processes: the same module)
        if cfg.routing.orthogonal_init:
            orthogonal_init_experts(self.model, shard_of=self.strategy.shard_of)
        copies = attach_compute_copies(self.model, self.amp) if self.amp is not None and cfg.compute_copies else 0
        self.optimizer = build_optimizer(self.model, cfg.optim)  # AdamWCopies when there are copies
        s = cfg.schedule  # the cosine follows the planned steps; extra steps stay at its end
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lambda i: lr_factor(
            i, steps=s.steps, warmup_steps=s.warmup_steps, min_lr_ratio=s.min_lr_ratio))

        self.start = self.restore() if self.resume else 0
        if self.strategy.is_main:
            write_json(self.run_dir / "config.json", {**cfg.to_dict(), "out": str(self.run_dir),
                                                       "resolved_model": model_cfg.to_dict(), "precision": self.precision.describe(),
                                                       **self.data.describe()})
        self.metrics: MetricsLog | _Discard = (
            MetricsLog(self.run_dir / "metrics.jsonl", keep_through_step=self.start if self.resume else None)
            if self.strategy.is_main else _Discard())
        self.log(f"{self.model_name}: {n_params / 1e6:.2f}M parameters, vocab {self.data.vocab_size}; data "
                 f"{self.data.corpus.source}: {self.data.n_train_tokens:,} train / {self.data.n_val_tokens:,} val "
                 f"tokens; device {self.device}, {self.precision.reason}"
                 f"{f', {copies} weights keep bf16 copies' if copies else ''}{malloc}; "
                 f"run dir {self.run_dir}")

    # The parts a fine-tune (deepseek_moe/finetune/run.py) replaces: its data, its model, how a batch is run and
    # what is written as the model at the end.
    def load_data(self) -> Any:
        return load_data(self.cfg)

    def model_config(self) -> ModelConfig:
        return build_model_config(self.cfg, self.data.vocab_size, self.data.eos_id)

    def forward(self, model: Any, batch: torch.Tensor) -> tuple[Any, int]:
        """The model's output on a batch (with ce_loss, aux_loss, loss) and how many predictions ce_loss
        averages."""
        return model(batch, labels=batch), batch.numel() - batch.shape[0]  # the model shifts labels by one

    def write_model(self) -> str:
        """model/: each process writes the tensors it holds (no gather; save_pretrained on one process)."""
        from deepseek_moe.parallel.shard_io import save_pretrained_sharded

        return save_pretrained_sharded(self.model, self.run_dir / "model")

    def build_model(self, model_cfg: ModelConfig) -> DeepSeekMoEForCausalLM:
        from deepseek_moe.model.block import set_activation_checkpointing
        from deepseek_moe.model.causal_lm import DeepSeekMoEForCausalLM

        torch.manual_seed(self.cfg.seed)  # decides model.init_seed, the base of every parameter's init draw
        with torch.device(self.strategy.init_device):
            model = DeepSeekMoEForCausalLM(model_cfg)
        model.tokenizer = self.data.tokenizer
        set_activation_checkpointing(model, self.cfg.activation_checkpointing)
        return (model if self.strategy.init_device.type == "meta" else model.to(self.device)).train()

    def restore(self) -> int:
        """Load the latest checkpoint of the run being resumed; the step to continue from."""
        saved = ckpt.step_dirs(self.state_dir)
        if not saved:
            self.log(f"{self.run_dir} has no checkpoint yet: starting it from step 0")
            return 0
        info = ckpt.load_checkpoint(saved[-1], model=self.model, optimizer=self.optimizer,
                                    scheduler=self.scheduler, strategy=self.strategy)
        self.data.train.load_state_dict(info["data"])
        self.log(f"resuming {self.run_dir} from {saved[-1].name}")
        return int(info["step"])

    # ---- the loop ---------------------------------------------------------------------------------------
    def fit(self) -> RunResult:
        self.setup()
        cfg, steps = self.cfg, self.cfg.schedule.total_steps
        tokens_per_step = cfg.schedule.batch_size * cfg.schedule.grad_accum_steps * cfg.data.seq_len
        self.window_tokens, self.window_t = 0, time.perf_counter()
        train_t0, tokens_done = time.perf_counter(), 0
        self.bar = tqdm(total=steps, initial=self.start, disable=not (self.progress and self.strategy.is_main),
                        dynamic_ncols=True, file=sys.stderr, desc="train")
        try:
            for step in range(self.start, steps):
                result = self.step(step)
                done = result.step
                self.window_tokens += tokens_per_step
                tokens_done += tokens_per_step
                self.bar.update(1)
                if done % cfg.eval.log_every == 0 or done == steps:
                    self.log_step(result)
                if done % cfg.eval.every == 0 or done == steps:
                    self.validate(done)
                if (cfg.checkpoint.every and done % cfg.checkpoint.every == 0) or done == steps:
                    self.save(done)
        except KeyboardInterrupt:
            self.bar.close()
            saved = ckpt.step_dirs(self.state_dir)
            self.log(f"interrupted; {'the latest checkpoint is ' + saved[-1].name if saved else 'no checkpoint yet'}"
                     f": continue with  deepseek-moe train --resume {self.run_dir}")
            raise
        self.bar.close()
        return self.finish(tokens_per_s=tokens_done / max(time.perf_counter() - train_t0, 1e-9))

    def step(self, step: int) -> StepResult:
        """Optimizer step ``step`` (0-based) over ``grad_accum_steps`` micro-batches of the global batch."""
        cfg, s, model = self.cfg, self.cfg.schedule, self.model
        stage = routing_stage(cfg, step)
        set_uniform_routing(model, stage == 1)
        set_entropy_scale(model, entropy_scale(cfg, step))
        if stage == 3 and cfg.routing.frozen_experts and self.freezer is None:
            self.freezer = ExpertFreezer(model, cfg.routing.frozen_experts, shard_of=self.strategy.shard_of)

        ce_sum, aux_sum, mtp_sum = 0.0, 0.0, 0.0
        mtp_lambda = s.mtp_lambda_at(step)
        counts, drops = None, torch.zeros(2, dtype=torch.float64)
        entropy = torch.zeros(2, dtype=torch.float64)  # sum over layers and micro-batches, and how many
        reset_traffic(model)
        for _ in range(s.grad_accum_steps):
            # every process draws the global batch and keeps its rows
            batch = self.strategy.local(self.data.train.next_batch(s.batch_size).to(self.device))
            with autocast(self.device, self.amp):
                out, _ = self.forward(self.train_model, batch)
            loss = out.loss
            if out.mtp_loss is not None:  # the schedule's λ, not the model config's
                loss = out.ce_loss + out.aux_loss + mtp_lambda * out.mtp_loss
                mtp_sum += float(out.mtp_loss.detach())
            ce_sum += float(out.ce_loss.detach())
            aux_sum += float(out.aux_loss.detach())
            del out  # its (B, T, vocab) logits, which nothing below reads, not held through the backward
            (loss / s.grad_accum_steps).backward()
            counts = _add(counts, routing_counts(model))
            drops += drop_counts(model)
            entropy += _entropy_sum(model)
        # the global batch's numbers, so every process takes the same decisions
        ce_sum, aux_sum, mtp_sum = self.strategy.mean(ce_sum, aux_sum, mtp_sum)
        counts = self.strategy.sum(counts) if counts is not None else None
        dropped, assignments = self.strategy.sum(drops).tolist()
        entropy_total, entropy_n = self.strategy.sum(entropy).tolist()
        traffic = traffic_counts(model)
        if traffic is not None:
            sent_bytes, rows, tokens = self.strategy.sum(traffic).tolist()
            traffic_per_token = {"a2a_bytes_per_token": sent_bytes / max(tokens, 1),
                                 "a2a_ranks_per_token": rows / max(tokens, 1)}
        if not math.isfinite(ce_sum):
            raise TrainError(f"the loss became {ce_sum} at step {step + 1}; lower optim.lr ({cfg.optim.lr}) or "
                             "check the data")
        if self.freezer is not None:
            self.freezer.zero_grads()
        if cfg.optim.grad_clip > 0:
            self.strategy.clip_grad_norm_(model, cfg.optim.grad_clip)
        self.optimizer.step()
        if self.freezer is not None:
            self.freezer.restore()
        if self.update_bias:
            update_routing_bias(model, all_reduce=self.strategy.all_reduce)
        update_capacity(model, all_reduce=self.strategy.all_reduce)
        adaptive = any(moe.cfg.capacity_policy == "adaptive" for _, moe in moe_layers(model))
        lr = self.optimizer.param_groups[0]["lr"]
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return StepResult(step + 1, stage, ce_sum / s.grad_accum_steps, aux_sum / s.grad_accum_steps, lr, counts,
                          dropped / assignments if assignments else 0.0,
                          traffic_per_token if traffic is not None else {},
                          mtp_loss=mtp_sum / s.grad_accum_steps if model.config.mtp_depth else None,
                          mtp_lambda=mtp_lambda if model.config.mtp_depth else None,
                          routing_entropy=entropy_total / entropy_n if entropy_n else None,
                          capacity=capacity_factors(model) if adaptive else [])

    def log_step(self, r: StepResult) -> None:
        now = time.perf_counter()
        tps = self.window_tokens / max(now - self.window_t, 1e-9)
        self.window_tokens, self.window_t = 0, now
        loads = load_summary(r.counts) if r.counts is not None else {"imbalance": float("nan"), "cv": float("nan")}
        self.metrics.write({"kind": "train", "step": r.step, "loss": r.ce_loss + r.aux_loss, "ce_loss": r.ce_loss,
                            "aux_loss": r.aux_loss, "lr": r.lr, "tokens_per_s": tps, "imbalance": loads["imbalance"],
                            "cv": loads["cv"], "dropped": r.dropped, "stage": r.stage,
                            "epoch": self.data.train.epochs_done, **r.traffic,
                            **({"mtp_loss": r.mtp_loss, "mtp_lambda": r.mtp_lambda} if r.mtp_loss is not None else {}),
                            **({"routing_entropy": r.routing_entropy} if r.routing_entropy is not None else {}),
                            **({"capacity": r.capacity} if r.capacity else {})})
        postfix: dict[str, object] = {"loss": f"{r.ce_loss:.3f}", "tok_s": f"{tps:,.0f}", "lr": f"{r.lr:.2e}",
                                      "imb": f"{loads['imbalance']:.2f}", "drop": f"{r.dropped:.1%}",
                                      "stage": r.stage}
        if r.mtp_loss is not None:
            postfix["mtp"] = f"{r.mtp_loss:.3f}"
        if r.traffic:  # all-to-all bytes per token and MoE layer, every process's
            postfix["a2a"] = f"{r.traffic['a2a_bytes_per_token'] / 1024:.1f}KiB/tok"
        self.bar.set_postfix(postfix, refresh=False)

    # ---- evaluation and checkpoints -----------------------------------------------------------------------
    @torch.no_grad()
    def evaluate(self, batches: list[torch.Tensor]) -> tuple[float, torch.Tensor | None]:
        """Mean cross-entropy (nats/token) over ``batches`` and the (L, E) expert counts over the same tokens.

        Every process calls this; each evaluates its rows of a batch, except a batch the processes cannot share
        equally (the last, shorter one), which each evaluates whole; the shared sums are then summed over them.
        The routing generators are put back afterwards: under uniform routing evaluation draws routes, and how
        often one evaluates (or how a batch splits over processes) must not change the routes training draws.
        """
        saved = routing_state(self.model)
        try:
            return self._evaluate(batches)
        finally:
            load_routing_state(self.model, saved)

    def _evaluate(self, batches: list[torch.Tensor]) -> tuple[float, torch.Tensor | None]:
        self.model.eval()
        shared, whole = _Sums(), _Sums()
        for batch in batches:
            batch = batch.to(self.device)
            sums = shared if self.strategy.is_split(batch) else whole
            batch = self.strategy.local(batch)
            with autocast(self.device, self.amp):
                out, k = self.forward(self.model, batch)
            sums.nll += float(out.ce_loss) * k
            sums.n += k
            sums.counts = _add(sums.counts, routing_counts(self.model))
        self.model.train()
        shared.nll, shared.n = self.strategy.sum(torch.tensor([shared.nll, shared.n], dtype=torch.float64)).tolist()
        if shared.counts is not None:
            shared.counts = self.strategy.sum(shared.counts)
        return (shared.nll + whole.nll) / (shared.n + whole.n), _add(shared.counts, whole.counts)

    def validate(self, done: int) -> None:
        """A validation pass on ``eval.batches`` of the validation split: metrics, routing.json, a log line."""
        val_loss, counts = self.evaluate(self.val_batches)
        self.metrics.write({"kind": "val", "step": done, "val_loss": val_loss, "val_ppl": math.exp(val_loss)})
        if counts is not None and self.strategy.is_main:
            write_json(self.run_dir / "routing.json", {"step": done, "layers": layer_names(self.model),
                                                       "counts": counts.tolist(), "source": "validation"})
        h = self.data.unigram_entropy
        self.log(f"step {done}: validation loss {val_loss:.3f}, perplexity {math.exp(val_loss):.1f} "
                 f"(unigram entropy {h:.3f})")

    def save(self, done: int) -> None:
        ckpt.save_checkpoint(self.state_dir, done, model=self.model, optimizer=self.optimizer,
                             scheduler=self.scheduler, trainer={"data": self.data.train.state_dict()},
                             keep_last=self.cfg.checkpoint.keep_last, strategy=self.strategy)

    # ---- the end ----------------------------------------------------------------------------------------
    def finish(self, *, tokens_per_s: float) -> RunResult:
        """The final validation loss (on the whole validation split), then on the main process ``model/``, a
        sample, the summary record and the plots."""
        cfg, h = self.cfg, self.data.unigram_entropy
        val_loss, _ = self.evaluate(self.data.val.fixed_batches(cfg.schedule.batch_size))
        if self.freezer is not None:
            self.freezer.remove()
        fmt = self.write_model()
        model = self.strategy.gathered(self.model)  # every expert in one process, for the sample
        sample = self.write_outputs(model, fmt, val_loss, tokens_per_s) if self.strategy.is_main else ""
        self.strategy.close()
        return RunResult(self.run_dir, cfg.schedule.total_steps, val_loss, h, tokens_per_s,
                         time.perf_counter() - self.t_start, sample)

    def write_outputs(self, model: Any, fmt: str, val_loss: float, tokens_per_s: float) -> str:
        from deepseek_moe.infer.generate import generate
        from deepseek_moe.io.native import FORMAT as NATIVE_FORMAT

        cfg, tok, h, log = self.cfg, self.data.tokenizer, self.data.unigram_entropy, self.log
        model.eval()
        model_dir = self.run_dir / "model"
        if fmt == NATIVE_FORMAT:
            log(f"note: neither transformers' DeepSeek classes nor DeepSeekMoE 16B's layout hold this config; wrote "
                f"{model_dir} in this package's own format (deepseek_moe.from_pretrained reads it)")
        sample = ""
        if cfg.eval.sample_tokens > 0:
            eos = self.data.eos_id
            prompt = tok.encode(cfg.eval.sample_prompt, add_special_tokens=False).ids or [eos]
            out = generate(model, [prompt], max_new_tokens=cfg.eval.sample_tokens, temperature=cfg.eval.temperature,
                           top_k=cfg.eval.top_k or None, stop_tokens=[eos], seed=cfg.seed)
            sample = tok.decode(out.sequences[0])
            (self.run_dir / "sample.txt").write_text(sample + "\n")
        wall_s = time.perf_counter() - self.t_start
        self.metrics.write({"kind": "summary", "step": cfg.schedule.total_steps, "resumed_from": self.start,
                            "val_loss": val_loss, "val_ppl": math.exp(val_loss), "unigram_entropy": h,
                            "below_unigram": h - val_loss, "tokens_per_s": tokens_per_s, "wall_s": wall_s})
        metrics_path = self.run_dir / "metrics.jsonl"
        records = [json.loads(line) for line in metrics_path.read_text().splitlines() if line.strip()]
        plot_loss(records, self.run_dir / "loss.png", unigram_entropy=h)
        routing_path = self.run_dir / "routing.json"
        if routing_path.is_file():
            plot_heatmap(json.loads(routing_path.read_text()), self.run_dir / "routing_heatmap.png")
        log(f"validation loss (whole split) {val_loss:.3f} nats/token, perplexity {math.exp(val_loss):.1f}; "
            f"unigram entropy of the validation split {h:.3f} nats/token: {h - val_loss:.3f} below it")
        log(f"{tokens_per_s:,.0f} tokens/s, {wall_s:.0f} s in all; wrote {self.run_dir}")
        if sample:
            log(f"--- sample ---\n{sample}\n--------------")
        return sample


@dataclass
class _Sums:
    nll: float = 0.0  # summed cross-entropy (nats)
    n: float = 0.0  # predictions
    counts: torch.Tensor | None = None


def _entropy_sum(model: torch.nn.Module) -> torch.Tensor:
    """(2,) float64: the sum of the MoE layers' routing entropies in the last forward, and how many layers
    measured one."""
    values = [float(moe.last_stats.routing_entropy) for _, moe in moe_layers(model)
              if moe.last_stats is not None and moe.last_stats.routing_entropy is not None]
    return torch.tensor([sum(values), len(values)], dtype=torch.float64)


def _add(a: torch.Tensor | None, b: torch.Tensor | None) -> torch.Tensor | None:
    return b if a is None else a if b is None else a + b


class _Discard:
    """Metrics sink of the processes other than the main one (which writes the run directory)."""

    def write(self, record: dict[str, Any]) -> None:
        pass


def _printer(enabled: bool) -> Callable[[str], None]:
    def log(message: str) -> None:
        if enabled:
            tqdm.write(message, file=sys.stdout)
    return log


__all__ = ["RunResult", "StepResult", "Trainer", "run"]
