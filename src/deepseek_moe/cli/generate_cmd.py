"""``deepseek-moe generate CHECKPOINT --prompt TEXT``: continue a prompt with a Hugging Face-format checkpoint
(or a train run directory), streaming the text to stdout as tokens are chosen."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

from deepseek_moe.cli.main import UsageError
from deepseek_moe.io import CheckpointError
from deepseek_moe.io.locate import checkpoint_dir

if TYPE_CHECKING:
    from deepseek_moe.infer.draft import BatchDrafter, Drafter

TOKENIZER_FILE = "tokenizer.json"
# End-of-text tokens of the tokenizers we meet, tried when config.json has no eos_token_id.
EOS_NAMES = ("<|endoftext|>", "<｜end▁of▁sentence｜>", "</s>", "<eos>")


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("generate", help="continue a prompt with a checkpoint, streaming the text",
                       description=__doc__)
    p.add_argument("checkpoint", metavar="CHECKPOINT",
                   help="Hugging Face checkpoint directory (config.json, safetensors, tokenizer.json) or a train "
                   "run directory (its model/ is used)")
    p.add_argument("--prompt", required=True, help="text to continue")
    p.add_argument("--chat", action="store_true",
                   help="the prompt is a user's message: render it with the checkpoint's chat template "
                   "(tokenizer_config.json's, else the plain default the server and finetune use: "
                   "'User: PROMPT\\n\\nAssistant:') and continue from there")
    p.add_argument("--max-new-tokens", type=int, default=100, metavar="N", help="default 100")
    p.add_argument("--temperature", type=float, default=0.8, metavar="T", help="0 is greedy (default 0.8)")
    p.add_argument("--top-k", type=int, metavar="K", help="sample among the K most likely tokens")
    p.add_argument("--top-p", type=float, default=0.95, metavar="P",
                   help="sample among the most likely tokens holding mass P (default 0.95; 1 disables)")
    p.add_argument("--seed", type=int, metavar="S", help="makes sampling repeatable")
    p.add_argument("--device", metavar="D", help="cpu, cuda, cuda:1, ... (default: cuda when available)")
    p.add_argument("--speculative", choices=("ngram", "mtp"), metavar="DRAFTER",
                   help="speculative decoding: 'ngram' drafts by prompt lookup (the tokens that followed the last "
                   "match of the text's last few tokens), 'mtp' with the checkpoint's multi-token-prediction "
                   "modules (trained with model.mtp_depth >= 1); verified in one forward; same greedy output, "
                   "same sampling distribution")
    p.add_argument("--num-draft-tokens", type=int, default=4, metavar="K",
                   help="with --speculative: the most tokens drafted per step (default 4)")
    p.add_argument("--adapter", action="append", default=[], metavar="[NAME=]PATH",
                   help="a LoRA adapter directory (PEFT's format, e.g. a fine-tune's RUN/adapter) applied unmerged "
                   "(repeatable: each on other modules); NAME= is accepted as serve --adapter takes it, and "
                   "ignored here")
    p.set_defaults(func=run)


class TextStream:
    """``stream(row, token)`` callback that prints the text of the tokens so far as it grows.

    The whole sequence is decoded at each step and only the new suffix printed: a byte-level BPE token may hold
    part of a multi-byte character, which decoded alone would be garbage. A trailing U+FFFD is such an
    incomplete character, so it waits for the token that completes it (``finish`` prints whatever is left).
    """

    def __init__(self, tokenizer: Any, out: IO[str], stop_tokens: set[int]) -> None:
        self.tokenizer, self.out, self.stop_tokens = tokenizer, out, stop_tokens
        self.ids: list[int] = []
        self.printed = ""

    def __call__(self, row: int, token: int) -> None:
        if token in self.stop_tokens:
            return
        self.ids.append(token)
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        if not text.endswith("\ufffd"):
            self._emit(text)

    def finish(self) -> None:
        self._emit(self.tokenizer.decode(self.ids, skip_special_tokens=True))

    def _emit(self, text: str) -> None:
        # Decoders only append to what they produced before; were one to revise earlier text, the printed part
        # stays and only what lies past its length is printed.
        new = text[len(self.printed):]
        if new:
            self.out.write(new)
            self.out.flush()
            self.printed += new


def load_tokenizer(path: Path) -> Any:  # -> tokenizers.Tokenizer
    from tokenizers import Tokenizer

    file = path / TOKENIZER_FILE
    if not file.is_file():
        raise CheckpointError(f"{path}: no {TOKENIZER_FILE}; generate needs the checkpoint's tokenizer (a "
                              f"Hugging Face tokenizers {TOKENIZER_FILE}) beside config.json")
    try:
        return Tokenizer.from_file(str(file))
    except Exception as e:  # tokenizers raises a bare Exception for files it cannot parse
        raise CheckpointError(f"{file}: not a tokenizers {TOKENIZER_FILE} ({e})") from e


def stop_tokens(cfg: Any, tokenizer: Any) -> set[int]:
    """The eos id of config.json, else the tokenizer's end-of-text token, else none."""
    if cfg.eos_token_id is not None:
        return {cfg.eos_token_id}
    for name in EOS_NAMES:
        token = tokenizer.token_to_id(name)
        if token is not None and token < cfg.vocab_size:
            return {token}
    return set()


def chat_prompt(path: Path, message: str) -> str:
    """``message`` as a user's turn, rendered with the checkpoint's chat template and its generation prompt."""
    from deepseek_moe.serve.text import ChatTemplate

    try:
        return str(ChatTemplate.for_checkpoint(path).render([{"role": "user", "content": message}]))
    except ImportError as e:  # jinja2 (the serve extra), imported when the template is built
        raise UsageError(f"--chat renders the chat template with jinja2: pip install -e '.[serve]' ({e})") from e


def check_sampling(args: argparse.Namespace) -> None:
    """The sampling rules of infer/sampling.py, said about the flags, before any time is spent loading."""
    if args.max_new_tokens < 0:
        raise UsageError(f"--max-new-tokens ({args.max_new_tokens}) must be >= 0")
    if args.temperature < 0:
        raise UsageError(f"--temperature ({args.temperature}) must be >= 0 (0 is greedy)")
    if args.top_k is not None and args.top_k <= 0:
        raise UsageError(f"--top-k ({args.top_k}) must be a positive integer")
    if args.top_p is not None and not 0.0 < args.top_p <= 1.0:
        raise UsageError(f"--top-p ({args.top_p}) must be in (0, 1]")


def run(args: argparse.Namespace) -> int:
    from deepseek_moe.device import resolve_device
    from deepseek_moe.infer.generate import generate
    from deepseek_moe.io import load_pretrained

    path = checkpoint_dir(args.checkpoint)
    try:
        device = resolve_device(args.device)
    except ValueError as e:
        raise UsageError(f"--device {e}") from e
    check_sampling(args)
    if args.num_draft_tokens < 1:
        raise UsageError(f"--num-draft-tokens ({args.num_draft_tokens}) must be >= 1")
    tokenizer = load_tokenizer(path)  # before the weights: a missing tokenizer should not cost a long load
    prompt = chat_prompt(path, args.prompt) if args.chat else args.prompt
    try:
        model = load_pretrained(path, device=device)
    except CheckpointError:
        raise
    except ValueError as e:  # config.json translation and the config dataclasses' rules
        raise CheckpointError(str(e)) from e
    if args.adapter:
        from deepseek_moe.adapters.peft import load_adapter
        from deepseek_moe.cli.adapter_arg import adapter_specs

        for adapter, (_, path) in zip(args.adapter, adapter_specs(args.adapter), strict=True):
            try:
                load_adapter(model, path)
            except (ValueError, FileNotFoundError) as e:
                raise UsageError(f"--adapter {adapter}: {e}") from e
    cfg = model.config

    # A chat prompt's template writes its own special tokens, as finetune tokenised the chats it trained on.
    prompt_ids = tokenizer.encode(prompt, add_special_tokens=not args.chat).ids
    if not prompt_ids:
        raise UsageError("--prompt is empty (it encodes to no tokens)")
    if len(prompt_ids) >= cfg.max_seq_len:
        raise UsageError(f"the prompt is {len(prompt_ids)} tokens, which leaves no room in this model's context "
                         f"of {cfg.max_seq_len} tokens (max_position_embeddings in {path / 'config.json'}); "
                         "shorten it")
    if max(prompt_ids) >= cfg.vocab_size:
        raise CheckpointError(f"{path / TOKENIZER_FILE} gives token id {max(prompt_ids)}, beyond the model's "
                              f"vocab_size ({cfg.vocab_size}): the tokenizer does not belong to this checkpoint")

    stops = stop_tokens(cfg, tokenizer)
    stream = TextStream(tokenizer, sys.stdout, stops)
    sys.stdout.write(prompt)
    sys.stdout.flush()
    drafter: Drafter | BatchDrafter | None = None
    if args.speculative == "ngram":
        from deepseek_moe.infer.draft import NgramDrafter

        drafter = NgramDrafter()
    elif args.speculative == "mtp":
        from deepseek_moe.infer.mtp_draft import MTPDrafter

        try:
            drafter = MTPDrafter(model)
        except ValueError as e:
            raise UsageError(f"--speculative mtp: {e} ({path})") from e
    out = generate(model, [prompt_ids], max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                   top_k=args.top_k, top_p=args.top_p, stop_tokens=sorted(stops), seed=args.seed, stream=stream,
                   drafter=drafter, num_draft_tokens=args.num_draft_tokens)
    stream.finish()
    sys.stdout.write("\n")
    sys.stdout.flush()
    n = len(out.new_tokens[0])
    speed = f", decode {out.decode_tokens_per_s:.1f} tokens/s" if n > 1 else ""
    spec = out.speculative
    if spec is not None and spec.steps:
        speed += (f"; speculative: {spec.accepted}/{spec.drafted} drafted tokens accepted, "
                  f"{spec.mean_acceptance_length:.2f} tokens per verification")
    print(f"[{n} new tokens; prefill {out.prefill_s:.2f}s{speed}]", file=sys.stderr)
    return 0
