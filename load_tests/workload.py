"""What to send and when: prompts (random tokens or a JSONL file) and arrival times.

Pure Python (no HTTP), so workloads are reproducible from `--seed` and testable alone.
"""

from __future__ import annotations

import json
import math
import random
from dataclasses import dataclass, field


@dataclass
class RequestSpec:
    """One request of a workload: a completions prompt (text or token ids) or chat messages."""

    index: int
    prompt: str | list[int] | None = None
    messages: list[dict] | None = None
    max_tokens: int = 128
    # Random-token prompts must produce exactly max_tokens (EOS ignored), so lengths are known.
    ignore_eos: bool = False
    prompt_len: int | None = None  # known for token-id prompts
    extra: dict = field(default_factory=dict)


def unique_lengths(num_prompts: int, input_len: int, shared_prefix_len: int, unique_len_range: tuple[int, int] | None,
                   rng: random.Random) -> list[int]:
    """Each prompt's length past the shared prefix: `input_len` minus the prefix, or uniform in
    `unique_len_range` (LO and HI included), as real traffic's prompts vary."""
    if unique_len_range is None:
        if not 0 <= shared_prefix_len <= input_len:
            raise ValueError("shared prefix must fit in the input length")
        return [input_len - shared_prefix_len] * num_prompts
    lo, hi = unique_len_range
    if not 0 <= lo <= hi or lo + shared_prefix_len < 1:
        raise ValueError("--input-len-range needs 0 <= LO <= HI (and a non-empty prompt)")
    return [rng.randint(lo, hi) for _ in range(num_prompts)]


def random_token_workload(num_prompts: int, input_len: int, output_len: int, shared_prefix_len: int,
                          token_range: tuple[int, int], seed: int,
                          unique_len_range: tuple[int, int] | None = None) -> list[RequestSpec]:
    """Prompts of random token ids whose first `shared_prefix_len` are the same for all (to exercise
    prefix caching), `input_len` long or with a unique part drawn from `unique_len_range`;
    `ignore_eos` so each makes exactly `output_len` tokens."""
    if input_len < 1 or output_len < 1:
        raise ValueError("input and output lengths must be positive")
    rng = random.Random(seed)
    lo, hi = token_range
    prefix = [rng.randrange(lo, hi) for _ in range(shared_prefix_len)]
    specs = []
    for i, n in enumerate(unique_lengths(num_prompts, input_len, shared_prefix_len, unique_len_range, rng)):
        ids = prefix + [rng.randrange(lo, hi) for _ in range(n)]
        specs.append(RequestSpec(i, prompt=ids, max_tokens=output_len, ignore_eos=True, prompt_len=len(ids)))
    return specs


def random_text_workload(num_prompts: int, input_len: int, output_len: int, shared_prefix_len: int,
                         seed: int, unique_len_range: tuple[int, int] | None = None) -> list[RequestSpec]:
    """For the chat endpoint, which takes text: random common words, about one token each."""
    words = ("time person year way day thing man world life hand part child eye woman place work week case "
             "point number group problem fact river stone light house table water story music garden city").split()
    rng = random.Random(seed)
    prefix = [rng.choice(words) for _ in range(shared_prefix_len)]
    specs = []
    for i, n in enumerate(unique_lengths(num_prompts, input_len, shared_prefix_len, unique_len_range, rng)):
        text = " ".join(prefix + [rng.choice(words) for _ in range(n)])
        specs.append(RequestSpec(i, messages=[{"role": "user", "content": text}], max_tokens=output_len, ignore_eos=True))
    return specs


def file_workload(path: str, num_prompts: int | None, output_len: int, endpoint: str) -> list[RequestSpec]:
    """JSONL: each line {"prompt": "..."} or {"messages": [...]}, optionally "max_tokens"."""
    specs = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            line = line.strip()
            if not line:
                continue
            row = json.loads(line)
            max_tokens = int(row.get("max_tokens", output_len))
            if "messages" in row:
                messages = row["messages"]
            elif "prompt" in row:
                messages = [{"role": "user", "content": row["prompt"]}]
            else:
                raise ValueError(f"{path}: each line needs 'prompt' or 'messages'")
            if endpoint == "chat":
                specs.append(RequestSpec(len(specs), messages=messages, max_tokens=max_tokens))
            else:
                prompt = row.get("prompt") or "\n".join(m["content"] for m in messages)
                specs.append(RequestSpec(len(specs), prompt=prompt, max_tokens=max_tokens))
            if num_prompts is not None and len(specs) >= num_prompts:
                break
    if not specs:
        raise ValueError(f"{path}: no prompts")
    return specs


def arrival_offsets_s(num_requests: int, request_rate: float, burstiness: float, seed: int) -> list[float]:
    """Send times from the start: gamma-distributed gaps with mean 1/rate (burstiness 1 is Poisson;
    below 1 burstier, above 1 more regular); rate inf sends everything at once."""
    if request_rate <= 0 or burstiness <= 0:
        raise ValueError("request rate and burstiness must be positive")
    if math.isinf(request_rate):
        return [0.0] * num_requests
    rng = random.Random(seed + 1)
    theta = 1.0 / (request_rate * burstiness)
    t, out = 0.0, []
    for _ in range(num_requests):
        out.append(t)
        t += rng.gammavariate(burstiness, theta)
    return out
