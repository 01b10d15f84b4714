"""Speculative decoding with the MTP drafter (infer/mtp_draft.py): every draft equals the one an uncached
reference computes from the whole context (so the MTP caches are filled, extended and rolled back right, for
depths 1 and 2 and more drafts than depths); greedy output identical to plain greedy, batched and alone; at
T > 0 each draft's q is the MTP softmax under the request's transform and the emitted pairs follow the target;
int8 drafts and verifies; a model without MTP is a named error.

The test model makes drafts often but not always right: one MoE layer, whose copy (with noise) is the MTP
module's block, fed the next token's embedding (eh_proj takes the embedding half; embeddings of unit RMS, so
enorm changes nothing): the module then sees what the main model sees one token later."""

from __future__ import annotations

from collections.abc import Sequence

import pytest
import torch
from test_model_configs import small_config
from test_speculative import _pair_distribution, assert_pairs_follow

from deepseek_moe.infer.draft import Draft, SamplingParams
from deepseek_moe.infer.generate import generate
from deepseek_moe.infer.loop import left_padded
from deepseek_moe.infer.mtp_draft import MTPDrafter
from deepseek_moe.infer.sampling import probabilities
from deepseek_moe.model.causal_lm import DeepSeekMoEForCausalLM

PROMPTS = [[5, 9, 2, 5, 9, 2, 5, 9], [7, 1, 3, 3, 8, 11, 4], [30]]


def echo_model(depth: int, noise: float = 1.2, dtype: torch.dtype = torch.float64) -> DeepSeekMoEForCausalLM:
    model = DeepSeekMoEForCausalLM(small_config(mtp_depth=depth, max_seq_len=96, n_layers=1, n_dense_layers=0),
                                   init_seed=3).to(dtype).eval()
    g = torch.Generator().manual_seed(0)
    dim = model.config.dim
    with torch.no_grad():
        e = model.embed.weight
        e /= e.pow(2).mean(-1, keepdim=True).sqrt()
        for module in model.mtp:
            module.block.load_state_dict(model.layers[0].state_dict())
            module.norm.load_state_dict(model.norm.state_dict())
            module.eh_proj.weight.zero_()
            module.eh_proj.weight[:, :dim] = torch.eye(dim)
            for p in module.block.parameters():
                p.add_(noise * p.std() * torch.randn(p.shape, generator=g, dtype=torch.float64).to(dtype))
    return model


@torch.no_grad()
def reference_logits(model: DeepSeekMoEForCausalLM, context: Sequence[int], draft: Sequence[int]) -> torch.Tensor:
    """(k, V): the logits draft token j was chosen from, recomputed from the whole context with no cache: depth j
    (j <= D) over positions 0 .. n-2, each taking h^{j-1}_i and t_{i+j} (drafts past the context); a token past D
    reruns depth D over one more position each time, its last output as that position's hidden state."""
    D, n = len(model.mtp), len(context)
    ext = list(context) + list(draft)
    h = model(torch.tensor([context[:-1]])).hidden  # (1, n-1, dim): positions 0 .. n-2
    out = []
    for j in range(1, min(len(draft), D) + 1):
        step = model.mtp_forward(j, h, torch.tensor([ext[j:n - 1 + j]]))
        out.append(step.logits[0, -1])
        h = step.hidden if j < D else h
    if len(draft) > D:
        hidden_seq = h  # h^{D-1} over 0 .. n-2
        last = model.mtp_forward(D, hidden_seq, torch.tensor([ext[D:n - 1 + D]])).hidden[:, -1:]
        for j in range(D + 1, len(draft) + 1):
            hidden_seq = torch.cat((hidden_seq, last), dim=1)  # position n-2+(j-D) takes the output before it
            step = model.mtp_forward(D, hidden_seq, torch.tensor([ext[D:n - 1 + j]]))
            out.append(step.logits[0, -1])
            last = step.hidden[:, -1:]
    return torch.stack(out)


class Recording(MTPDrafter):
    """An MTPDrafter that keeps every step's contexts, drafts and cache lengths."""

    def __init__(self, model: DeepSeekMoEForCausalLM) -> None:
        super().__init__(model)
        self.log: list[tuple[list[list[int]], list[int], list[Draft], list[list[int]]]] = []

    def propose_batch(self, contexts: Sequence[Sequence[int]], ks: Sequence[int]) -> list[Draft]:
        drafts = super().propose_batch(contexts, ks)
        self.log.append(([list(c) for c in contexts], list(ks), drafts, self.cache_lengths()))
        return drafts


@pytest.fixture(scope="module", params=[1, 2])
def model(request: pytest.FixtureRequest) -> DeepSeekMoEForCausalLM:
    return echo_model(request.param)


@pytest.mark.parametrize("k", [1, 2, 3])
def test_greedy_mtp_drafts_equal_the_uncached_reference_and_output_equals_greedy(
        model: DeepSeekMoEForCausalLM, k: int) -> None:
    plain = generate(model, PROMPTS, max_new_tokens=30)
    drafter = Recording(model)
    spec = generate(model, PROMPTS, max_new_tokens=30, drafter=drafter, num_draft_tokens=k)
    assert spec.new_tokens == plain.new_tokens
    stats = spec.speculative
    assert stats is not None and 0 < stats.accepted < stats.drafted  # both accepted and rolled-back drafts
    D = len(model.mtp)
    for contexts, ks, drafts, lengths in drafter.log:
        for b, (ctx, kb, d) in enumerate(zip(contexts, ks, drafts, strict=True)):
            if kb == 0:
                continue
            assert len(d.tokens) == kb and d.q is None
            assert d.tokens == reference_logits(model, ctx, d.tokens).argmax(-1).tolist()
            # Depth 1's cache holds as many slots as the main cache (positions 0 .. n-2), depth j, j - 1 fewer.
            for j in range(1, min(kb, D) + 1):
                assert lengths[j - 1][b] == len(ctx) - j, (j, b)
    for prompt, expected in zip(PROMPTS, plain.new_tokens, strict=True):
        assert generate(model, [prompt], max_new_tokens=30, drafter=MTPDrafter(model),
                        num_draft_tokens=k).new_tokens[0] == expected


@pytest.mark.parametrize("k", [1, 3])
def test_unpadded_drafts_batch_one_and_rows_alike_equal_the_reference(
        model: DeepSeekMoEForCausalLM, k: int, monkeypatch: pytest.MonkeyPatch) -> None:
    """Batch 1, and rows of equal length, run the module without padding or mask (MTPDrafter._run's fast path):
    the same drafts as the uncached reference, and the path is taken (it would not be, were every forward
    padded). eh_proj here also reads the hidden half (the echo model's ignores it), so a hidden state fed out of
    place changes drafts."""
    model = echo_model(len(model.mtp))
    dim = model.config.dim
    with torch.no_grad():
        for module in model.mtp:
            w = torch.randn(dim, dim, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
            module.eh_proj.weight[:, dim:] = 0.5 * w / dim ** 0.5
    unmasked = 0
    forward = model.mtp_forward

    def spy(*args: object, **kwargs: object) -> object:
        nonlocal unmasked
        unmasked += kwargs.get("attention_mask") is None
        return forward(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(model, "mtp_forward", spy)
    for prompts in ([PROMPTS[0]], [[5, 9, 2, 5, 9, 2], [7, 1, 3, 3, 8, 11]]):
        unmasked = 0
        drafter = Recording(model)
        spec = generate(model, prompts, max_new_tokens=20, drafter=drafter, num_draft_tokens=k)
        assert spec.new_tokens == generate(model, prompts, max_new_tokens=20).new_tokens
        assert spec.speculative is not None and 0 < spec.speculative.accepted < spec.speculative.drafted
        assert unmasked > 0
        for contexts, ks, drafts, _ in drafter.log:
            for ctx, kb, d in zip(contexts, ks, drafts, strict=True):
                if kb:
                    assert d.tokens == reference_logits(model, ctx, d.tokens).argmax(-1).tolist()


@pytest.mark.parametrize("k", [1, 2])
def test_fill_prompts_runs_each_depth_over_the_prompt_so_the_first_draft_runs_j_positions(
        model: DeepSeekMoEForCausalLM, k: int, monkeypatch: pytest.MonkeyPatch) -> None:
    """``fill_prompts`` (timed as prefill by ``generate``) caches depth j over positions 0 .. P-1-j, all the prompt
    alone determines, for the depths k drafts use; the first draft then runs depth j over j positions, not the
    whole prompt. (That its drafts are right is the reference test above, which runs through ``generate`` and so
    this path.) A prompt that does not match the prefill is refused by name."""
    D = len(model.mtp)
    ids, mask = left_padded(PROMPTS, 0)
    out = model(torch.tensor(ids), attention_mask=torch.tensor(mask))
    drafter = MTPDrafter(model)
    drafter.begin(out.hidden, torch.tensor(mask), SamplingParams(temperature=0.0))
    with pytest.raises(ValueError, match="prompt 1 has 6 tokens, its prefill 7 real positions"):
        drafter.fill_prompts([PROMPTS[0], PROMPTS[1][:-1], PROMPTS[2]], k)
    drafter.fill_prompts(PROMPTS, k)
    used = min(D, k)
    assert drafter.cache_lengths() == [[max(0, len(p) - j) if j <= used else 0 for p in PROMPTS]
                                       for j in range(1, D + 1)]
    widths: list[int] = []
    forward = model.mtp_forward

    def spy(depth: int, hidden: torch.Tensor, input_ids: torch.Tensor, **kwargs: object) -> object:
        widths.append(input_ids.shape[1])
        return forward(depth, hidden, input_ids, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(model, "mtp_forward", spy)
    first = out.logits[:, -1].argmax(-1).tolist()
    drafter.propose_batch([p + [t] for p, t in zip(PROMPTS, first, strict=True)], [used] * len(PROMPTS))
    assert widths == list(range(1, used + 1))
    assert drafter.cache_lengths()[:used] == [[len(p) + 1 - j for p in PROMPTS] for j in range(1, used + 1)]


def test_a_drafter_without_fill_prompts_still_drafts(model: DeepSeekMoEForCausalLM) -> None:
    """``fill_prompts`` is optional: a BatchDrafter written without it (here MTPDrafter with it removed, which then
    runs its modules over the prompt in the first draft instead) gives the same drafts and output."""

    class Plain(MTPDrafter):
        fill_prompts = None  # type: ignore[assignment]

    plain = generate(model, PROMPTS, max_new_tokens=12)
    spec = generate(model, PROMPTS, max_new_tokens=12, drafter=Plain(model), num_draft_tokens=2)
    filled = generate(model, PROMPTS, max_new_tokens=12, drafter=MTPDrafter(model), num_draft_tokens=2)
    assert spec.new_tokens == plain.new_tokens == filled.new_tokens
    assert spec.speculative is not None and filled.speculative is not None
    assert spec.speculative.as_dict() == filled.speculative.as_dict()


def test_observe_keeps_the_marked_slots_in_order_contiguous_or_not() -> None:
    """What observe appends per row equals boolean indexing by ``kept``, for a run of columns (what the decoding
    loop passes: the fed token and the accepted drafts), scattered columns and none."""
    model = echo_model(1)
    drafter = MTPDrafter(model)
    g = torch.Generator().manual_seed(0)
    prefill = torch.randn(3, 2, 32, generator=g, dtype=torch.float64)
    drafter.begin(prefill, torch.ones(3, 2), SamplingParams(temperature=0.0))
    hidden = torch.randn(3, 4, 32, generator=g, dtype=torch.float64)
    kept = torch.tensor([[False, True, True, False], [True, False, True, True], [False] * 4])
    drafter.observe(hidden, kept)
    for b in range(3):
        torch.testing.assert_close(drafter._pending[0][b], torch.cat((prefill[b], hidden[b, kept[b]])), rtol=0, atol=0)


def test_mtp_speculative_stops_and_limits_as_plain(model: DeepSeekMoEForCausalLM) -> None:
    """A row that reaches max_seq_len (96) beside one that runs on, and a stop token inside an accepted draft."""
    rows = [list(range(1, 60)) + [1, 2, 3], [5, 6]]
    plain = generate(model, rows, max_new_tokens=80)
    assert [len(t) for t in plain.new_tokens] == [34, 80]
    assert generate(model, rows, max_new_tokens=80, drafter=MTPDrafter(model), num_draft_tokens=3).new_tokens == \
        plain.new_tokens
    stop = plain.new_tokens[1][5]
    stopped = generate(model, rows, max_new_tokens=20, stop_tokens=[stop]).new_tokens
    assert generate(model, rows, max_new_tokens=20, stop_tokens=[stop], drafter=MTPDrafter(model),
                    num_draft_tokens=3).new_tokens == stopped


def test_sampled_drafts_carry_the_mtp_distribution_under_the_same_transform(model: DeepSeekMoEForCausalLM) -> None:
    sampling = dict(temperature=0.8, top_k=5, top_p=0.9)
    drafter = Recording(model)
    generate(model, PROMPTS, max_new_tokens=12, drafter=drafter, num_draft_tokens=3, seed=0, **sampling)
    checked = 0
    for contexts, ks, drafts, _ in drafter.log:
        for ctx, kb, d in zip(contexts, ks, drafts, strict=True):
            if kb == 0:
                continue
            q = probabilities(reference_logits(model, ctx, d.tokens), **sampling)  # type: ignore[arg-type]
            assert d.q is not None
            torch.testing.assert_close(d.q, q)
            assert all(q[j, x] > 0 for j, x in enumerate(d.tokens))  # drawn from q's support
            checked += 1
    assert checked > 5


def test_mtp_speculative_sampling_matches_target_pairs() -> None:
    """As test_speculative's pair test, with the MTP drafter's own q (not a point mass)."""
    model = echo_model(1)
    prompt = [3, 14, 15, 9, 2, 6]
    sampling = dict(temperature=0.7, top_k=3, top_p=0.95)
    exact = _pair_distribution(model, prompt, **sampling)
    assert_pairs_follow(model, prompt, MTPDrafter(model), exact, sampling)


def test_scheduler_mtp_sampling_matches_target_pairs() -> None:
    """The server's scheduler drafting with the MTP module (serve/mtp_drafting.py, its q the module's softmax under
    each request's transform): the first two tokens of 500 seeded requests, batched 64 at a time, the second out
    of a verification of a one-token draft, follow the target's pair distribution."""
    from collections import Counter

    from test_speculative import chi2, chi2_critical

    from deepseek_moe.serve.request import Request, TokenEvent
    from deepseek_moe.serve.request import SamplingParams as ServeParams
    from deepseek_moe.serve.scheduler import Scheduler, SchedulerConfig

    model = echo_model(1, noise=4.0)  # drafts often rejected
    prompt = [3, 14, 15, 9, 2, 6]
    sampling = dict(temperature=0.7, top_k=3, top_p=0.95)
    exact = _pair_distribution(model, prompt, **sampling)
    s = Scheduler(model, SchedulerConfig(speculative="mtp", num_draft_tokens=2, max_batch_size=64, block_size=4,
                                         kv_cache_bytes=1 << 24, max_queue=500))
    n = 500
    outs: list[list[int]] = [[] for _ in range(n)]
    for i, out in enumerate(outs):  # max_tokens 3: the decode step after the first token drafts one
        s.submit(Request(prompt, ServeParams(max_tokens=3, seed=i, **sampling),  # type: ignore[arg-type]
                         lambda e, out=out: out.append(e.token) if isinstance(e, TokenEvent) else None))
    while s.has_work():
        s.step()
    m = s.metrics
    assert m.spec_draft_tokens.value >= n and 0 < m.spec_accepted_tokens.value < m.spec_draft_tokens.value
    counts = Counter((out[0], out[1]) for out in outs)
    assert set(counts) <= set(exact), set(counts) - set(exact)
    cells = sorted(exact)
    stat, dof = chi2(Counter({j: counts[c] for j, c in enumerate(cells)}), torch.tensor([exact[c] for c in cells]), n)
    assert stat < chi2_critical(dof), (stat, dof, counts)


def test_an_int8_model_drafts_with_its_mtp_module_and_verifies() -> None:
    from deepseek_moe.quant import QuantConfig, quantize_model

    model = quantize_model(echo_model(1, dtype=torch.float32), QuantConfig(bits=8))
    assert type(model.mtp[0].block.ffn.experts).__name__ == "QuantRoutedExperts"
    plain = generate(model, PROMPTS, max_new_tokens=24)
    spec = generate(model, PROMPTS, max_new_tokens=24, drafter=MTPDrafter(model), num_draft_tokens=2)
    assert spec.new_tokens == plain.new_tokens
    assert spec.speculative is not None and spec.speculative.accepted > 0


def test_a_model_without_mtp_cannot_draft_with_it() -> None:
    plain = DeepSeekMoEForCausalLM(small_config(), init_seed=0)
    with pytest.raises(ValueError, match="mtp_depth 0"):
        MTPDrafter(plain)
    drafter = MTPDrafter(echo_model(1))
    drafter.begin(torch.zeros(1, 3, 32, dtype=torch.float64), torch.ones(1, 3), SamplingParams(temperature=0.0))
    assert drafter.propose_batch([[1, 2, 3, 4]], [0])[0].tokens == []
