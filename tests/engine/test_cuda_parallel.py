"""Tensor and data parallel on CUDA (NCCL): needs two GPUs (`nvidia-h200-x2`); skipped otherwise.

Run on the GPU host with `pytest -m gpu`.
"""

import pytest
import torch

from engine import LLM, SamplingParams

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.device_count() < 2, reason="needs 2 GPUs")]


def test_tp2_gives_tp1_tokens_on_the_8b_architecture_fp32():
    """The issue's check: greedy tokens of TP 2 equal TP 1 for 32 steps, Llama-3.1-8B shapes in fp32
    (dummy weights are drawn per checkpoint tensor, so both hold the same weights)."""
    params = SamplingParams(max_tokens=32, temperature=0.0, ignore_eos=True)
    prompts = [[128000, 791, 6864, 315, 9822, 374], [128000, 9906, 1917, 11, 856, 836, 374]]
    common = dict(load_format="dummy", dtype="float32", max_model_len=512, kv_cache_memory_bytes=2 * 2**30,
                  max_num_seqs=4)
    with LLM("llama-3.1-8b", tensor_parallel_size=2, **common) as split:
        got = [o.token_ids for o in split.generate(prompts, params)]
    one = LLM("llama-3.1-8b", **common)
    assert got == [o.token_ids for o in one.generate(prompts, params)]
