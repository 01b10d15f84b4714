"""The DeepSeekMoE layer in an image-text model: visual question answering with modality-aware routing.

Image patches (a small ViT stem) and question words (an embedding over a word-level vocabulary defined here) form
one sequence that passes through transformer blocks whose FFNs are DeepSeekMoE layers. The routed experts are split
into three groups: visual, text and cross-modal. Under modality-aware routing image tokens may choose only visual +
cross-modal experts and text tokens only text + cross-modal ones (the disallowed experts' affinities get -inf before
the softmax and top-K); the shared experts see every token. The scenes are made here, with torch only: 24x24 RGB
images of a few coloured squares, circles and triangles on a 3x3 grid, with questions ("what colour is the
square", "how many circles", "is there a red triangle", "what shape is left of the blue one") and one-word answers;
train and test scenes are disjoint.

    python examples/image_text.py [--max-steps 300 | --seconds 120] [--threads 1] [--out runs/image_text]

Trains three models for --max-steps steps each (or, without it, --seconds each, 120 by default; a time budget
favours whichever model steps fastest, so compare models at equal steps): (a) the modality-aware MoE, (b) the
same model with unrestricted routing,
(c) a dense model whose FFN width is the MoE's activated width (shared + K routed experts), so all three spend the
same FFN compute per token. Prints their test answer accuracy in one table and one JSON line, and writes the
routing heatmaps by modality (per layer: the share of image and of text tokens' assignments per expert) to --out.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from deepseek_moe import MoE, MoEConfig, collect_aux_loss, plot_routing_heatmap
from deepseek_moe.moe.router import Router, Routing

# ---------------------------------------------------------------------------------------------------------------
# The scenes, questions and answers
# ---------------------------------------------------------------------------------------------------------------

COLOURS = {"red": (0.9, 0.1, 0.1), "green": (0.1, 0.8, 0.1), "blue": (0.1, 0.2, 0.9), "yellow": (0.9, 0.9, 0.1)}
SHAPES = ("square", "circle", "triangle")
COUNTS = ("zero", "one", "two", "three", "four")
IMAGE, CELL, GRID = 24, 8, 3  # a 3x3 grid of 8x8 cells, one object per cell at most
WORDS = ("<pad>", "<cls>", "what", "colour", "is", "the", "how", "many", "there", "a", "shape", "left", "of", "one",
         *COLOURS, *SHAPES, *(s + "s" for s in SHAPES))
VOCAB = {w: i for i, w in enumerate(WORDS)}
ANSWERS = (*COLOURS, *SHAPES, *COUNTS, "yes", "no")
ANSWER_ID = {a: i for i, a in enumerate(ANSWERS)}
MAX_WORDS = 9  # "<cls> what shape is left of the blue one"


def shape_mask(shape: str) -> torch.Tensor:
    """(6, 6) bool stencil of a shape."""
    ii, jj = torch.meshgrid(torch.arange(6), torch.arange(6), indexing="ij")
    if shape == "square":
        return torch.ones(6, 6, dtype=torch.bool)
    if shape == "circle":
        return (ii - 2.5) ** 2 + (jj - 2.5) ** 2 <= 3.0**2
    return (jj - 2.5).abs() <= (ii + 0.5) / 2  # triangle: apex up, widening by a pixel a row


STENCILS = {s: shape_mask(s) for s in SHAPES}


def render(objects: list[tuple[str, str, int, int]], g: torch.Generator) -> torch.Tensor:
    """(3, 24, 24) image of (colour, shape, row, col) objects, each jittered by up to a pixel, plus noise."""
    img = torch.zeros(3, IMAGE, IMAGE)
    for colour, shape, row, col in objects:
        dy, dx = (int(v) for v in torch.randint(0, 3, (2,), generator=g))
        y, x = row * CELL + dy, col * CELL + dx
        rgb = torch.tensor(COLOURS[colour]).view(3, 1)
        img[:, y:y + 6, x:x + 6][:, STENCILS[shape]] = rgb
    return (img + 0.05 * torch.randn(img.shape, generator=g)).clamp(0, 1)


def questions(objects: list[tuple[str, str, int, int]], g: torch.Generator) -> list[tuple[str, str]]:
    """Every well-posed (question, answer) about a scene, of four kinds; ambiguous ones are left out."""
    out: list[tuple[str, str]] = []
    by_shape = {s: [o for o in objects if o[1] == s] for s in SHAPES}
    by_colour = {c: [o for o in objects if o[0] == c] for c in COLOURS}
    for shape, objs in by_shape.items():
        if len(objs) == 1:
            out.append((f"what colour is the {shape}", objs[0][0]))
        out.append((f"how many {shape}s", COUNTS[len(objs)]))
    # is-there: one positive (if any object) and one random pair, so yes and no are both common
    o = objects[int(torch.randint(0, len(objects), (1,), generator=g))]
    out.append((f"is there a {o[0]} {o[1]}", "yes"))
    c = list(COLOURS)[int(torch.randint(0, len(COLOURS), (1,), generator=g))]
    s = SHAPES[int(torch.randint(0, len(SHAPES), (1,), generator=g))]
    out.append((f"is there a {c} {s}", "yes" if any(o[0] == c and o[1] == s for o in objects) else "no"))
    for colour, objs in by_colour.items():
        if len(objs) == 1:
            left = [o for o in objects if o[3] < objs[0][3]]
            if len(left) == 1:  # exactly one object in a column left of it
                out.append((f"what shape is left of the {colour} one", left[0][1]))
    return out


def encode(question: str) -> list[int]:
    words = ["<cls>", *question.split()]
    return [VOCAB[w] for w in words] + [VOCAB["<pad>"]] * (MAX_WORDS - len(words))


def make_vqa(n_scenes: int, seed: int) -> dict[str, torch.Tensor]:
    """Scenes of 2-4 objects (colour and shape drawn independently, distinct cells) and all their questions.
    Returns image (N, 3, 24, 24), question (N, MAX_WORDS) word ids, answer (N,) and scene (N,) ids: a scene's
    questions share its image, so splitting by ``scene`` keeps every test image unseen."""
    g = torch.Generator().manual_seed(seed)
    images, qs, answers, scene_ids = [], [], [], []
    for scene in range(n_scenes):
        n = int(torch.randint(2, 5, (1,), generator=g))
        cells = torch.randperm(GRID * GRID, generator=g)[:n].tolist()
        objects = [(list(COLOURS)[int(torch.randint(0, len(COLOURS), (1,), generator=g))],
                    SHAPES[int(torch.randint(0, len(SHAPES), (1,), generator=g))], cell // GRID, cell % GRID)
                   for cell in cells]
        img = render(objects, g)
        for q, a in questions(objects, g):
            images.append(img)
            qs.append(encode(q))
            answers.append(ANSWER_ID[a])
            scene_ids.append(scene)
    return {"image": torch.stack(images), "question": torch.tensor(qs), "answer": torch.tensor(answers),
            "scene": torch.tensor(scene_ids)}


# ---------------------------------------------------------------------------------------------------------------
# Modality-aware routing
# ---------------------------------------------------------------------------------------------------------------

IMAGE_TOKEN, TEXT_TOKEN = 0, 1


def allowed_experts(n_visual: int, n_text: int, n_cross: int) -> torch.Tensor:
    """(2, E) bool: row IMAGE_TOKEN allows the visual + cross-modal experts, row TEXT_TOKEN the text + cross-modal
    ones. Experts are numbered visual, then text, then cross-modal."""
    E = n_visual + n_text + n_cross
    allowed = torch.zeros(2, E, dtype=torch.bool)
    allowed[IMAGE_TOKEN, :n_visual] = True
    allowed[TEXT_TOKEN, n_visual:n_visual + n_text] = True
    allowed[:, n_visual + n_text:] = True
    return allowed


class ModalityRouter(Router):
    """The gate with the disallowed experts' logits set to -inf, from ``modality_T`` (T,) (IMAGE_TOKEN or
    TEXT_TOKEN per token, set by the model before each forward). The affinities s are then the softmax over each
    token's allowed experts only (0 elsewhere), so top-K, the gates and the balance losses all see a distribution
    the token could actually follow; ``restrict=False`` leaves routing free (the unrestricted baseline) with
    otherwise identical code. ``last_indices_TK`` keeps the last choice for the heatmap by modality."""

    def __init__(self, cfg: MoEConfig, allowed_ME: torch.Tensor, *, restrict: bool = True) -> None:
        if cfg.score_func != "softmax" or cfg.group_limited or cfg.use_routing_bias:
            raise ValueError("ModalityRouter needs score_func='softmax', no group-limited routing and no routing "
                             "bias (the mask is applied to softmax logits)")
        if allowed_ME.shape != (2, cfg.n_routed_experts):
            raise ValueError(f"allowed_ME must have shape (2, {cfg.n_routed_experts}), got {tuple(allowed_ME.shape)}")
        if int(allowed_ME.sum(dim=1).min()) < cfg.n_activated_experts:
            raise ValueError(f"each modality must be allowed at least n_activated_experts "
                             f"({cfg.n_activated_experts}) experts")
        super().__init__(cfg)
        self.restrict = restrict
        self.register_buffer("allowed_ME", allowed_ME.clone(), persistent=False)
        self.modality_T: torch.Tensor | None = None
        self.last_indices_TK: torch.Tensor | None = None

    def forward(self, x_TD: torch.Tensor) -> Routing:
        cfg = self.cfg
        with torch.autocast(x_TD.device.type, enabled=False):
            logits_TE = F.linear(x_TD.float(), self.weight.float())
        if self.restrict:
            if self.modality_T is None or self.modality_T.shape != (x_TD.shape[0],):
                got = None if self.modality_T is None else tuple(self.modality_T.shape)
                raise ValueError(f"modality_T must be set to shape ({x_TD.shape[0]},) before the forward, got {got}")
            logits_TE = logits_TE.masked_fill(~self.allowed_ME[self.modality_T], float("-inf"))
        scores_TE = logits_TE.softmax(dim=-1)
        indices_TK = self._select(scores_TE.detach())
        weights_TK = scores_TE.gather(1, indices_TK)
        if cfg.norm_topk_prob:
            weights_TK = weights_TK / (weights_TK.sum(dim=-1, keepdim=True) + 1e-20)
        self.last_indices_TK = indices_TK.detach()
        return Routing(indices_TK, weights_TK * cfg.route_scale, scores_TE)


# ---------------------------------------------------------------------------------------------------------------
# The model
# ---------------------------------------------------------------------------------------------------------------


class DenseFFN(nn.Module):
    """SwiGLU FFN of a given width: the dense baseline's stand-in for the MoE layer."""

    def __init__(self, dim: int, inter_dim: int) -> None:
        super().__init__()
        self.w1, self.w3 = nn.Linear(dim, inter_dim, bias=False), nn.Linear(dim, inter_dim, bias=False)
        self.w2 = nn.Linear(inter_dim, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class Block(nn.Module):
    def __init__(self, dim: int, n_heads: int, ffn: nn.Module) -> None:
        super().__init__()
        self.attn_norm, self.ffn_norm = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.attn = nn.MultiheadAttention(dim, n_heads, batch_first=True)
        self.ffn = ffn

    def forward(self, h: torch.Tensor, pad_BS: torch.Tensor) -> torch.Tensor:
        a = self.attn_norm(h)
        h = h + self.attn(a, a, a, key_padding_mask=pad_BS, need_weights=False)[0]
        return h + self.ffn(self.ffn_norm(h))


class VQAModel(nn.Module):
    """[image patches; <cls> question words] -> blocks -> the answer from <cls>.

    ``ffn``: "modality" (MoE, modality-aware routing), "free" (MoE, unrestricted) or "dense" (FFN of width
    ``dense_width``)."""

    def __init__(self, moe_cfg: MoEConfig, allowed_ME: torch.Tensor, *, ffn: str, n_layers: int = 2,
                 n_heads: int = 4, patch: int = 4, dense_width: int = 0) -> None:
        super().__init__()
        dim = moe_cfg.dim
        self.patch = patch
        n_patches = (IMAGE // patch) ** 2
        self.patch_embed = nn.Linear(3 * patch * patch, dim)  # the ViT stem: a linear map of each flat patch
        self.image_pos = nn.Parameter(torch.randn(n_patches, dim) * 0.02)
        self.word_embed = nn.Embedding(len(WORDS), dim)
        self.text_pos = nn.Parameter(torch.randn(MAX_WORDS, dim) * 0.02)
        self.modality_type = nn.Embedding(2, dim)
        blocks = []
        for i in range(n_layers):
            if ffn == "dense":
                layer: nn.Module = DenseFFN(dim, dense_width)
            elif ffn in ("modality", "free"):
                layer = MoE(moe_cfg, layer_id=i)
                layer.gate = ModalityRouter(moe_cfg, allowed_ME, restrict=ffn == "modality")
            else:
                raise ValueError(f"ffn must be 'modality', 'free' or 'dense', got {ffn!r}")
            blocks.append(Block(dim, n_heads, layer))
        self.blocks = nn.ModuleList(blocks)
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, len(ANSWERS))
        self.register_buffer("modality_S", torch.tensor([IMAGE_TOKEN] * n_patches + [TEXT_TOKEN] * MAX_WORDS),
                             persistent=False)

    def routers(self) -> list[ModalityRouter]:
        return [b.ffn.gate for b in self.blocks if isinstance(b.ffn, MoE)]  # type: ignore[misc]

    def forward(self, image: torch.Tensor, question: torch.Tensor) -> torch.Tensor:
        B, p = image.shape[0], self.patch
        patches = image.unfold(2, p, p).unfold(3, p, p)  # (B, 3, H/p, W/p, p, p)
        patches = patches.permute(0, 2, 3, 1, 4, 5).reshape(B, -1, 3 * p * p)
        img_tokens = self.patch_embed(patches) + self.image_pos
        txt_tokens = self.word_embed(question) + self.text_pos
        h = torch.cat([img_tokens, txt_tokens], dim=1) + self.modality_type(self.modality_S)  # (B, S, dim)
        pad_BS = torch.cat([torch.zeros(B, img_tokens.shape[1], dtype=torch.bool, device=image.device),
                            question == VOCAB["<pad>"]], dim=1)
        modality_T = self.modality_S.repeat(B)  # the MoE flattens (B, S) to T = B*S tokens in this order
        for router in self.routers():
            router.modality_T = modality_T
        for block in self.blocks:
            h = block(h, pad_BS)
        return self.head(self.norm(h[:, img_tokens.shape[1]]))  # the <cls> token's state


def modality_counts(model: VQAModel) -> torch.Tensor:
    """(2L, E) assignments per expert of the last forward: image tokens' row then text tokens' row, per layer."""
    rows = []
    for router in model.routers():
        assert router.last_indices_TK is not None and router.modality_T is not None
        E = router.cfg.n_routed_experts
        for m in (IMAGE_TOKEN, TEXT_TOKEN):
            rows.append(torch.bincount(router.last_indices_TK[router.modality_T == m].reshape(-1), minlength=E))
    return torch.stack(rows).float()


def disallowed_share(model: VQAModel) -> float:
    """Share of the last forward's assignments that went to an expert outside the token's modality's groups."""
    bad = total = 0
    for router in model.routers():
        assert router.last_indices_TK is not None and router.modality_T is not None
        ok_TK = router.allowed_ME[router.modality_T].gather(1, router.last_indices_TK)
        bad, total = bad + int((~ok_TK).sum()), total + ok_TK.numel()
    return bad / max(total, 1)


# ---------------------------------------------------------------------------------------------------------------
# Training and evaluation
# ---------------------------------------------------------------------------------------------------------------


def accuracy(model: nn.Module, data: dict[str, torch.Tensor], batch_size: int = 512) -> float:
    model.eval()
    correct = 0
    with torch.no_grad():
        for i in range(0, len(data["answer"]), batch_size):
            logits = model(data["image"][i:i + batch_size], data["question"][i:i + batch_size])
            correct += int((logits.argmax(-1) == data["answer"][i:i + batch_size]).sum())
    model.train()
    return correct / len(data["answer"])


def train(model: nn.Module, data: dict[str, torch.Tensor], *, seconds: float, max_steps: int, batch_size: int,
          lr: float, seed: int, name: str) -> tuple[int, float]:
    """Train for ``seconds`` or ``max_steps``, whichever ends first; returns (steps, last training loss)."""
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    start, step, loss_value = time.time(), 0, float("nan")
    while time.time() - start < seconds and step < max_steps:
        idx = torch.randint(0, len(data["answer"]), (batch_size,), generator=g)
        loss = F.cross_entropy(model(data["image"][idx], data["question"][idx]), data["answer"][idx])
        aux = collect_aux_loss(model)
        if not torch.isfinite(aux):
            raise RuntimeError(f"{name}: balance loss is {float(aux)} at step {step}")
        opt.zero_grad(set_to_none=True)
        (loss + aux).backward()
        opt.step()
        step, loss_value = step + 1, float(loss.detach())
        if step % 200 == 0:
            print(f"  {name} step {step:5d}  loss {loss_value:.4f}  ({time.time() - start:.0f}s)", flush=True)
    return step, loss_value


NO_STEP_CAP = 1_000_000


def budget(seconds: float | None, max_steps: int | None) -> tuple[float, int]:
    """(seconds, steps) each model trains for: --max-steps alone is a step count with no time limit (so every
    model takes the same steps however fast it is); neither flag: 120 s each."""
    if max_steps is not None and max_steps < 1:
        raise ValueError(f"--max-steps ({max_steps}) must be >= 1")
    if seconds is not None and not seconds > 0:
        raise ValueError(f"--seconds ({seconds}) must be > 0")
    if seconds is None:
        seconds = math.inf if max_steps is not None else 120.0
    return seconds, NO_STEP_CAP if max_steps is None else max_steps


def main(argv: list[str] | None = None) -> dict[str, object]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, help="training time budget per model (default: 120 without "
                        "--max-steps, none with it)")
    parser.add_argument("--max-steps", type=int, help="training steps per model (default: as many as --seconds allow)")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (default: torch's choice)")
    parser.add_argument("--scenes", type=int, default=3000, help="scenes made (80%% train, 20%% test)")
    parser.add_argument("--tiny", action="store_true", help="a few scenes and steps: for tests")
    parser.add_argument("--out", type=Path, default=Path("runs/image_text"))
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    seconds, max_steps = budget(args.seconds, args.max_steps)
    n_scenes = 60 if args.tiny else args.scenes
    if n_scenes < 5:
        raise ValueError(f"--scenes ({n_scenes}) must be >= 5 so both splits have scenes")

    data = make_vqa(n_scenes, args.seed)
    test_scene = data["scene"] >= int(0.8 * n_scenes)  # split by scene: no test image is seen in training
    train_data = {k: v[~test_scene] for k, v in data.items()}
    test_data = {k: v[test_scene] for k, v in data.items()}
    majority = float((test_data["answer"] == train_data["answer"].mode().values).float().mean())
    print(f"{len(train_data['answer'])} train / {len(test_data['answer'])} test questions "
          f"({n_scenes} scenes); the most common answer's test accuracy is {majority:.3f}")

    n_visual = n_text = n_cross = 4
    dim = 32 if args.tiny else 64
    moe_cfg = MoEConfig(dim=dim, moe_inter_dim=dim // 2, n_routed_experts=n_visual + n_text + n_cross,
                        n_activated_experts=2, n_shared_experts=1, expert_loss_alpha=0.01, seed=args.seed)
    allowed_ME = allowed_experts(n_visual, n_text, n_cross)
    activated = (moe_cfg.n_shared_experts + moe_cfg.n_activated_experts) * moe_cfg.moe_inter_dim
    max_steps = min(max_steps, 3) if args.tiny else max_steps
    rows: dict[str, dict[str, float | int]] = {}
    heatmaps: dict[str, str] = {}
    for name, ffn in (("moe_modality", "modality"), ("moe_free", "free"), ("dense", "dense")):
        torch.manual_seed(args.seed)  # same initial stem, attention and head weights for each model
        model = VQAModel(moe_cfg, allowed_ME, ffn=ffn, dense_width=activated)
        steps, train_loss = train(model, train_data, seconds=seconds, max_steps=max_steps, batch_size=128,
                                  lr=2e-3, seed=args.seed, name=name)
        rows[name] = {"test_acc": round(accuracy(model, test_data), 4),
                      "train_acc": round(accuracy(model, train_data), 4), "steps": steps,
                      "train_loss": round(train_loss, 4),
                      "params": sum(p.numel() for p in model.parameters())}
        if ffn != "dense":
            model.eval()
            with torch.no_grad():  # route a test batch for the heatmap
                model(test_data["image"][:512], test_data["question"][:512])
            rows[name]["disallowed_share"] = round(disallowed_share(model), 4)
            labels = [f"L{i} {m}" for i in range(len(model.routers())) for m in ("image", "text")]
            path = plot_routing_heatmap(modality_counts(model), args.out / f"routing_{name}.png",
                                        title=f"{name}: experts V0-3 | T4-7 | X8-11", layer_labels=labels)
            heatmaps[name] = str(path)

    print(f"\n{'model':<14}{'test acc':>10}{'train acc':>11}{'steps':>8}{'params':>9}{'disallowed':>12}")
    for name, r in rows.items():
        print(f"{name:<14}{r['test_acc']:>10.3f}{r['train_acc']:>11.3f}{r['steps']:>8}{r['params']:>9}"
              f"{r.get('disallowed_share', float('nan')):>12.3f}")
    result: dict[str, object] = {"majority_acc": round(majority, 4),
                                 "seconds_per_model": None if math.isinf(seconds) else seconds,
                                 "max_steps": None if max_steps == NO_STEP_CAP else max_steps,
                                 "activated_ffn_width": activated, **rows, "heatmaps": heatmaps}
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
