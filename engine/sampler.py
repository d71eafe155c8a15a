"""Sampling on the device: penalties, temperature, top-k/top-p/min-p, seeded draws.

Rows with a seed draw their noise from their own generator, so a seeded
request samples the same tokens whatever else is in the batch. Sampling uses
the exponential race (argmax of p / Exp(1)), which equals a categorical draw.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import cached_property, partial

import torch

from engine.sampling_params import SamplingParams

logger = logging.getLogger(__name__)


@dataclass
class SamplingBatch:
    """Per-row sampling inputs for one step, built by the model runner."""

    params: list[SamplingParams]
    generators: list[torch.Generator | None]
    # Only filled when some row needs them (penalties, min_tokens).
    prompt_token_ids: list[list[int]] | None = None
    output_token_ids: list[list[int]] | None = None
    eos_token_ids: tuple[int, ...] = ()
    # Constrained rows (engine/structured_output.py): one bit per token, 1 = allowed; rows of
    # the batch without a constraint are all ones. [rows, ceil(vocab / 32)] int32 on the host.
    allowed_token_bitmask: torch.Tensor | None = None
    # How sampled rows are drawn where the CUDA decoder measured roseinfer_kernels.filtered_sampling's race
    # faster than torch's draw at this batch size (sample_rows' `kernel`); None: torch's.
    kernel: Callable | None = None
    # Per-row values already on the device (row_values), kept for the batch's later steps: a
    # multi-step run samples the same batch every step.
    _on_device: dict = field(default_factory=dict, repr=False)

    # What the rows ask for, worked out once per batch (a multi-step run samples it every step).
    @cached_property
    def all_greedy(self) -> bool:
        return all(p.greedy for p in self.params)

    @cached_property
    def max_logprobs(self) -> int | None:
        return max((p.logprobs for p in self.params if p.logprobs is not None), default=None)

    @cached_property
    def needs_processing(self) -> bool:
        """Penalties, logit biases or min_tokens on some row."""
        return any(p.logit_bias or p.uses_penalties or p.min_tokens for p in self.params)

    def row_values(self, name: str, values: list, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        """`values` (one per row) as a device tensor, uploaded once per batch. From pinned memory
        without blocking: `torch.tensor(list, device=cuda)` would wait for the queued forward."""
        tensor = self._on_device.get(name)
        if tensor is None:
            host = torch.tensor(values, dtype=dtype, pin_memory=device.type == "cuda")
            tensor = self._on_device[name] = host.to(device, non_blocking=True)
        return tensor


@dataclass
class SamplerOutput:
    token_ids: torch.Tensor  # [num_rows] int64
    logprobs: torch.Tensor | None = None  # [num_rows] chosen token's logprob
    top_logprobs: torch.Tensor | None = None  # [num_rows, k]
    top_token_ids: torch.Tensor | None = None  # [num_rows, k]


def _pad(rows: list[list[int]], device: torch.device, fill: int) -> torch.Tensor:
    width = max(1, max((len(r) for r in rows), default=1))
    out = torch.full((len(rows), width), fill, dtype=torch.int64)
    for i, r in enumerate(rows):
        if r:
            out[i, : len(r)] = torch.tensor(r, dtype=torch.int64)
    return out.to(device, non_blocking=True)


def apply_penalties_and_biases(logits: torch.Tensor, batch: SamplingBatch) -> torch.Tensor:
    """Logit processing shared by greedy and random rows (in place on a float32 copy)."""
    vocab = logits.shape[1]
    device = logits.device
    params = batch.params
    if any(p.logit_bias for p in params):
        for i, p in enumerate(params):
            for tok, bias in p.logit_bias:
                if 0 <= tok < vocab:
                    logits[i, tok] += bias
    if batch.output_token_ids is not None and any(p.min_tokens for p in params):
        for i, p in enumerate(params):
            if len(batch.output_token_ids[i]) < p.min_tokens:
                banned = list(p.stop_token_ids) + ([] if p.ignore_eos else list(batch.eos_token_ids))
                if banned:
                    logits[i, banned] = float("-inf")
    if batch.output_token_ids is not None and any(p.uses_penalties for p in params):
        out_ids = _pad(batch.output_token_ids, device, vocab)  # `vocab` is a dump column
        counts = torch.zeros(len(params), vocab + 1, device=device)
        counts.scatter_add_(1, out_ids, torch.ones_like(out_ids, dtype=counts.dtype))
        counts = counts[:, :vocab]
        rep = torch.tensor([p.repetition_penalty for p in params], device=device)[:, None]
        if (rep != 1.0).any():
            assert batch.prompt_token_ids is not None
            prompt_ids = _pad(batch.prompt_token_ids, device, vocab)
            seen = torch.zeros(len(params), vocab + 1, dtype=torch.bool, device=device)
            seen.scatter_(1, prompt_ids, True)
            seen = seen[:, :vocab] | (counts > 0)
            penalised = torch.where(logits > 0, logits / rep, logits * rep)
            logits = torch.where(seen, penalised, logits)
        freq = torch.tensor([p.frequency_penalty for p in params], device=device)[:, None]
        pres = torch.tensor([p.presence_penalty for p in params], device=device)[:, None]
        logits = logits - freq * counts - pres * (counts > 0).float()
    return logits


def mask_disallowed_tokens_(logits: torch.Tensor, bitmask: torch.Tensor) -> torch.Tensor:
    """-inf, in place, where a row's [rows, words] int32 host bitmask has a 0 bit (token t at bit
    t % 32 of word t // 32). On CUDA one Triton launch; on the CPU the bits unpacked with torch."""
    if logits.is_cuda:
        from roseinfer_kernels.token_bitmask import mask_logits_

        return mask_logits_(logits, bitmask.to(logits.device, non_blocking=True))
    shifts = torch.arange(32, dtype=torch.int32)
    allowed = ((bitmask.unsqueeze(-1) >> shifts) & 1).reshape(bitmask.shape[0], -1)[:, :logits.shape[1]].bool()
    return logits.masked_fill_(~allowed, float("-inf"))


def sample(logits: torch.Tensor, batch: SamplingBatch) -> SamplerOutput:
    """Pick one token per row. `logits` is [num_rows, vocab] float32 on the device; a
    constrained batch masks it in place (unless log-probabilities, taken before, need it)."""
    raw_logits = logits
    max_logprobs = batch.max_logprobs
    if batch.needs_processing:
        logits = apply_penalties_and_biases(logits.clone(), batch)
    if batch.allowed_token_bitmask is not None:
        if logits is raw_logits and max_logprobs is not None:
            logits = logits.clone()
        logits = mask_disallowed_tokens_(logits, batch.allowed_token_bitmask)

    if batch.all_greedy:
        token_ids = logits.argmax(dim=-1)
    else:
        token_ids = _sample_random(logits, batch)
    out = SamplerOutput(token_ids=token_ids)
    if max_logprobs is not None:
        logprobs = torch.log_softmax(raw_logits, dim=-1)
        out.logprobs = logprobs.gather(1, token_ids[:, None]).squeeze(1)
        if max_logprobs > 0:
            out.top_logprobs, out.top_token_ids = logprobs.topk(max_logprobs, dim=-1)
    return out


def _sample_random(logits: torch.Tensor, batch: SamplingBatch) -> torch.Tensor:
    params = batch.params
    device = logits.device
    num_rows, vocab = logits.shape
    rows = row_sampling_values(params, vocab)
    uses_top_k, uses_top_p, uses_min_p = filters_in_use(params, vocab)
    greedy_rows = batch.row_values("greedy", rows["greedy"], torch.bool, device)
    temperature = batch.row_values("temperature", rows["temperature"], torch.float32, device)
    top_k = batch.row_values("top_k", rows["top_k"], torch.int64, device) if uses_top_k else None
    top_p = batch.row_values("top_p", rows["top_p"], torch.float32, device) if uses_top_p else None
    min_p = batch.row_values("min_p", rows["min_p"], torch.float32, device) if uses_min_p else None

    unseeded = [i for i, g in enumerate(batch.generators) if g is None]
    if len(unseeded) == num_rows:
        noise = torch.empty_like(logits).exponential_()
    else:
        noise = torch.empty_like(logits)
        if unseeded:
            rows = batch.row_values("unseeded", unseeded, torch.int64, device)
            noise[rows] = torch.empty(len(unseeded), vocab, device=device).exponential_()
        for i, g in enumerate(batch.generators):
            if g is not None:
                noise[i].exponential_(generator=g)
    return sample_rows(logits, greedy_rows, temperature, top_k, top_p, min_p, noise, batch.kernel)


def row_sampling_values(params: list[SamplingParams], vocab: int) -> dict[str, list]:
    """Each row's sampling parameters as `sample_rows` takes them: greedy, temperature (1.0 for
    greedy rows), top_k (the vocabulary when off), top_p, min_p. The eager sampler and the CUDA
    decoder's sampling graphs both build their row tensors from these."""
    return {"greedy": [p.greedy for p in params],
            "temperature": [1.0 if p.greedy else p.temperature for p in params],
            "top_k": [p.top_k if 0 < p.top_k < vocab else vocab for p in params],
            "top_p": [p.top_p for p in params], "min_p": [p.min_p for p in params]}


def filters_in_use(params: list[SamplingParams], vocab: int) -> tuple[bool, bool, bool]:
    """Whether any row filters by top-k, top-p, min-p (sample_rows skips a filter nobody uses)."""
    return (any(0 < p.top_k < vocab for p in params), any(p.top_p < 1.0 for p in params),
            any(p.min_p > 0.0 for p in params))


# The CUDA decoder's sampling graphs come in variants by the filters a batch's rows use: PLAIN
# (temperature alone), FILTERED (top-p or min-p) and TOP_K (top-k, maybe with the others). Top-k
# has its own because the sampling kernel's k-th logit search and rejection rounds can cost more
# than the sort where logits are flat (GPT-2 with random weights, top-k 50 + top-p 0.95, H100:
# 1.96 ms a step against 0.89 with top-p alone), while top-p alone gains most from the kernel; each
# variant is decided apart (sampling_kernels).
PLAIN, FILTERED, TOP_K = 0, 1, 2
SAMPLING_VARIANTS = (PLAIN, FILTERED, TOP_K)


def sampling_variant(params: list[SamplingParams], vocab: int) -> int:
    """The sampling-graph variant that a batch of rows with these parameters needs."""
    top_k, top_p, min_p = filters_in_use(params, vocab)
    return TOP_K if top_k else FILTERED if top_p or min_p else PLAIN


def sample_rows(logits: torch.Tensor, greedy: torch.Tensor, temperature: torch.Tensor, top_k: torch.Tensor | None,
                top_p: torch.Tensor | None, min_p: torch.Tensor | None, noise: torch.Tensor,
                kernel: Callable | None = None) -> torch.Tensor:
    """One token per row of fp32 `logits` [rows, vocab], from per-row tensors [rows]: greedy rows take
    the argmax; the others sample at their temperature (1.0 for greedy rows) among the top_k logits,
    the smallest prefix of probability mass top_p and the tokens within min_p of the most likely,
    each filter skipped when None (top_k = vocab, top_p >= 1 and min_p = 0 keep every token). The
    draw is argmax(probs / noise) with `noise` ~ Exp(1), [rows, vocab]. Fixed shapes and no host
    decisions: the CUDA decoder captures it in graphs (CudaGraphDecoder's sampled runs). `kernel`
    (roseinfer_kernels.filtered_sampling.filtered_sample, where `sampling_kernels` chose it) draws the rows'
    tokens without a sort or a softmax, the same ones (it keeps every logit tied with the last one
    a filter keeps)."""
    logits = logits / temperature[:, None]
    if kernel is not None:
        rows, vocab = logits.shape
        full = partial(torch.full, (rows,), device=logits.device)
        sampled = kernel(logits, noise, full(vocab, dtype=torch.int64) if top_k is None else top_k,
                         full(1.0) if top_p is None else top_p, full(0.0) if min_p is None else min_p)
        return torch.where(greedy, logits.argmax(dim=-1), sampled)
    if top_k is not None or top_p is not None:
        # One sort serves both filters (rows with both are common: the TOP_K sampling graphs pass
        # top_p too): the logits' order is the probabilities' order, before top-k's cut and after.
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        if top_k is not None:
            kth = sorted_logits.gather(1, (top_k - 1)[:, None])
            logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    if top_p is not None:
        sorted_probs = probs.gather(1, order)
        # Keep the smallest prefix whose mass reaches top_p (the first token always stays).
        drop_sorted = (sorted_probs.cumsum(dim=-1) - sorted_probs) >= top_p[:, None]
        drop = torch.zeros_like(drop_sorted).scatter(1, order, drop_sorted)
        probs = probs.masked_fill(drop, 0.0)
    if min_p is not None:
        probs = probs.masked_fill(probs < min_p[:, None] * probs.max(dim=-1, keepdim=True).values, 0.0)
    sampled = (probs / noise).argmax(dim=-1)
    return torch.where(greedy, logits.argmax(dim=-1), sampled)


def sampling_kernels(device: torch.device, vocab: int, rows: list[int]) -> dict[tuple[int, int], Callable | None]:
    """For each batch size in `rows` and each sampling-graph variant (SAMPLING_VARIANTS: timed with
    temperature alone, top-p 0.95, and top-k 50 with top-p 0.95), how the graphs draw: with
    roseinfer_kernels.filtered_sampling's race where it draws sample_rows' own tokens on random logits (but
    for a row in 64: where the mass crosses top_p within float rounding, the two summing in
    different orders) and runs faster, else None (sample_rows' sort and softmax). Top-k takes the
    kernel only where it is faster on peaked logits (random normal x 4) and on flat ones (x 1),
    where its rounds are many. Decided once at capture by measuring in CUDA graphs on this device,
    at a few sizes (the smallest, the largest, two between); each size takes the decision of the
    nearest timed one."""
    from roseinfer_kernels.filtered_sampling import filtered_sample
    from roseinfer_kernels.tune import graph_us_per_call

    timed = sorted({rows[0], rows[len(rows) // 3], rows[2 * len(rows) // 3], rows[-1]})
    torch_everywhere: dict[tuple[int, int], Callable | None] = {(b, v): None for b in rows for v in SAMPLING_VARIANTS}
    faster: dict[tuple[int, int], bool] = {}
    for n in timed:
        gen = torch.Generator(device=device).manual_seed(n)
        ones, greedy = torch.ones(n, device=device), torch.zeros(n, dtype=torch.bool, device=device)
        noise = torch.empty(n, vocab, device=device).exponential_(generator=gen)
        for variant in SAMPLING_VARIANTS:
            top_p = torch.full((n,), 0.95, device=device) if variant != PLAIN else None
            top_k = torch.full((n,), min(50, vocab), dtype=torch.int64, device=device) if variant == TOP_K else None
            faster[(n, variant)] = True
            for scale in ((4.0, 1.0) if variant == TOP_K else (4.0,)):
                logits = torch.randn(n, vocab, device=device, generator=gen) * scale
                draws = [partial(sample_rows, logits, greedy, ones, top_k, top_p, None, noise, kernel)
                         for kernel in (None, filtered_sample)]
                try:
                    want, got = (draw() for draw in draws)
                    agrees = int((got != want).sum()) <= n // 64
                except Exception as exc:  # noqa: BLE001 - a kernel that does not build here: keep torch's
                    logger.warning("sampling: the sampling kernel failed (%s); torch's draw everywhere", exc)
                    return torch_everywhere
                if not agrees:
                    logger.warning("sampling: the sampling kernel disagrees with torch's draw at batch %d; torch's "
                                   "draw everywhere", n)
                    return torch_everywhere
                torch_us, kernel_us = (graph_us_per_call([draw], rounds=3, replays=10) for draw in draws)
                faster[(n, variant)] &= kernel_us < torch_us
                logger.info("sampling at batch %d x %d, %s, logits x%g: torch %.0f us, sampling kernel %.0f us", n,
                            vocab, ("temperature alone", "top-p", "top-k and top-p")[variant], scale, torch_us,
                            kernel_us)
    return {(b, v): filtered_sample if faster[(min(timed, key=lambda t: abs(t - b)), v)] else None
            for b in rows for v in SAMPLING_VARIANTS}
