"""Tensor parallel over gloo on the CPU: the same greedy tokens as one process, for GPT-2 (MHA,
biases), the tiny Llama (GQA) and SmolLM2 at 3 ranks (9 heads, 3 KV heads: one KV head a rank);
a size that does not divide the heads is refused; a killed worker is reported, not waited on."""

import os
import signal
import time

import pytest
import torch

from engine import LLM, SamplingParams
from engine.errors import EngineDead
from engine.parallel import TensorParallel, check_divisible

GREEDY = SamplingParams(max_tokens=16, temperature=0.0, ignore_eos=True)
PROMPTS = ["Hello world, my name is", "The capital of France is", "def fibonacci(n):",
           "Once upon a time, in a land far, far away, there lived a young girl who"]


@pytest.fixture(scope="module")
def gpt2_micro_dir(tmp_path_factory) -> str:
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    path = str(tmp_path_factory.mktemp("gpt2-micro"))
    torch.manual_seed(0)
    GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=128, n_head=4, n_positions=256)).save_pretrained(path)
    return path


def tokens(llm: LLM, prompts=PROMPTS) -> list[list[int]]:
    return [o.token_ids for o in llm.generate(prompts, GREEDY)]


def run_both(model: str, size: int, **kwargs) -> tuple[list[list[int]], list[list[int]], LLM]:
    # A small budget chunks the longest prompt; dense weights (GGUF blocks are not split).
    common = dict(num_kv_blocks=48, max_num_batched_tokens=12, quantization="none", **kwargs)
    one = tokens(LLM(model, **common))
    with LLM(model, tensor_parallel_size=size, **common) as llm:
        split = tokens(llm)
        # A repeated prompt hits the prefix cache on every rank.
        assert tokens(llm, PROMPTS[3:]) == split[3:]
        assert llm.engine.block_manager.prefix_cache_hits > 0
        bm = llm.engine.block_manager
        assert bm.num_free_blocks == bm.num_blocks
    return one, split, llm


def test_gpt2_two_ranks_match_one(gpt2_micro_dir):
    one, split, llm = run_both(gpt2_micro_dir, 2)
    assert split == one
    model = llm.engine.runner.model
    assert model.h[0].attn.num_heads == 2 and model.h[0].mlp.c_fc.out_features == 256


def test_llama_gqa_two_ranks_match_one(tiny_llama_dir):
    one, split, llm = run_both(tiny_llama_dir, 2)
    assert split == one
    attn = llm.engine.runner.model.model.layers[0].self_attn
    assert (attn.num_heads, attn.num_kv_heads) == (2, 1)
    assert llm.engine.runner.kv_caches[0].shape[2] == 1  # one KV head in this rank's cache


def test_fp8_kv_cache_splits_across_ranks(tiny_llama_dir):
    """Each rank calibrates its own heads' scales (the calibration prefill's all-reduces meet across
    ranks) and keeps its slice of the cache in e4m3; the prefix cache hits on every rank. Scales
    of a head set differ from one rank's to all heads', so only the first tokens must agree."""
    one, split, llm = run_both(tiny_llama_dir, 2, kv_cache_dtype="fp8", attention_backend="torch")
    assert [t[:4] for t in split] == [t[:4] for t in one]
    assert llm.engine.runner.kv_caches[0].dtype == torch.float8_e4m3fn


def test_smollm2_three_ranks_match_one():
    one, split, llm = run_both("smollm2-135m-instruct", 3)
    assert split == one
    attn = llm.engine.runner.model.model.layers[0].self_attn
    assert (attn.num_heads, attn.num_kv_heads) == (3, 1)


def test_sizes_that_do_not_divide_are_refused(tiny_llama_dir):
    from engine.loader import SMOLLM2_135M

    with pytest.raises(ValueError, match="9 attention heads"):
        check_divisible(SMOLLM2_135M, 2)
    with pytest.raises(ValueError, match="4 attention heads"):
        LLM(tiny_llama_dir, num_kv_blocks=16, tensor_parallel_size=3)
    # Nothing is left behind: a group of another size starts cleanly afterwards.
    with LLM(tiny_llama_dir, num_kv_blocks=16, tensor_parallel_size=2) as llm:
        assert len(tokens(llm, PROMPTS[:1])[0]) == 16


def test_kv_heads_replicate_when_ranks_outnumber_them():
    # 2 KV heads over 4 ranks: ranks 0-1 hold head 0, ranks 2-3 head 1 (beside their query heads 2r, 2r+1).
    assert [TensorParallel(r, 4).kv_head_range(2) for r in range(4)] == [(0, 1), (0, 1), (1, 2), (1, 2)]
    assert [TensorParallel(r, 4).head_range(8) for r in range(4)] == [(0, 2), (2, 4), (4, 6), (6, 8)]
    assert TensorParallel(1, 2).kv_head_range(8) == (4, 8)


def test_a_killed_worker_is_reported(tiny_llama_dir):
    llm = LLM(tiny_llama_dir, num_kv_blocks=16, tensor_parallel_size=2)
    try:
        worker = llm.engine.runner.tp_group.workers[0]
        os.kill(worker.pid, signal.SIGKILL)
        worker.join(timeout=10)
        start = time.monotonic()
        with pytest.raises(EngineDead, match="rank 1"):
            llm.generate(PROMPTS[:1], GREEDY)
        assert time.monotonic() - start < 10
    finally:
        llm.engine.runner.tp_group.abort()


def test_two_nodes_as_two_local_process_groups(tiny_llama_dir):
    """--nnodes 2: node 1 runs its rank on its own (as `roseinfer serve --node-rank 1` on another
    host would), node 0 runs rank 0 and serves; they meet at --master-addr:--master-port."""
    import multiprocessing as mp

    from engine.config import EngineConfig
    from engine.model_runner import run_tp_worker
    from engine.tp_group import free_port, run_node

    port = free_port()
    common = dict(model=tiny_llama_dir, num_kv_blocks=48, tensor_parallel_size=2, nnodes=2, master_port=port)
    node1 = mp.get_context("spawn").Process(target=run_node, args=(EngineConfig(node_rank=1, **common), run_tp_worker))
    node1.start()
    try:
        with LLM(config=EngineConfig(node_rank=0, **common)) as llm:
            assert llm.engine.runner.tp_group.workers == []  # rank 1 is not this node's child
            split = tokens(llm)
        node1.join(timeout=30)
        assert node1.exitcode == 0
    finally:
        if node1.is_alive():
            node1.kill()
    assert split == tokens(LLM(tiny_llama_dir, num_kv_blocks=48))


def test_each_rank_reads_only_its_slices(tiny_llama_dir, monkeypatch):
    """Rank 0's loader reads whole only the tensors every rank holds whole (the norms); the
    projections, the embedding and the LM head it reads as its rows or columns."""
    import engine.loader as loader

    whole_reads = []
    read = loader._LazyTensor.read
    monkeypatch.setattr(loader._LazyTensor, "read", lambda self: whole_reads.append(self._name) or read(self))
    with LLM(tiny_llama_dir, num_kv_blocks=16, tensor_parallel_size=2) as llm:
        assert len(tokens(llm, PROMPTS[:1])[0]) == 16
    assert whole_reads and all("norm" in name for name in whole_reads), whole_reads


def test_fp8_weights_split_across_ranks(tiny_llama_dir, tmp_path):
    """FP8 projections under tensor parallel, from an FP8 checkpoint (each rank reads its slice:
    the rows of a column-parallel projection with their scales, the columns of a row-parallel one
    with all of its per-row scales, so rank 0 holds exactly its part of one process's weights) and
    quantized at load: both decode, and agree with one process on the first tokens (the
    activations are quantized per token over each rank's slice of a row-parallel input, so later
    tokens of this random model may part)."""
    from engine.models.layers import Fp8Linear
    from tests.engine.test_fp8 import _write_fp8_checkpoint

    quantized = LLM(tiny_llama_dir, num_kv_blocks=48, quantization="fp8")
    _write_fp8_checkpoint(tiny_llama_dir, str(tmp_path / "fp8"), quantized)
    whole = dict(quantized.engine.runner.model.named_modules())
    one = tokens(quantized)
    with LLM(str(tmp_path / "fp8"), num_kv_blocks=48, tensor_parallel_size=2) as llm:
        model = llm.engine.runner.model
        checked = 0
        for name, module in model.named_modules():
            if not isinstance(module, Fp8Linear):
                continue
            checked += 1
            full = whole[name]
            if name.endswith(("o_proj", "down_proj")):  # row-parallel: this rank's columns, every row's scale
                cols = module.weight.shape[1]
                want, scale = full.weight[:, :cols], full.weight_scale
            elif name.endswith("gate_up_proj"):  # gate's first half, then up's
                half = module.weight.shape[0] // 2
                rows = torch.cat([torch.arange(half), full.weight.shape[0] // 2 + torch.arange(half)])
                want, scale = full.weight[rows], full.weight_scale[rows]
            else:  # qkv: this rank's q heads, then its k and v heads
                attn = model.model.layers[0].self_attn
                q, kv = attn.num_heads * attn.head_dim, attn.num_kv_heads * attn.head_dim
                full_q = 2 * q
                rows = torch.cat([torch.arange(q), full_q + torch.arange(kv), full_q + 2 * kv + torch.arange(kv)])
                want, scale = full.weight[rows], full.weight_scale[rows]
            assert torch.equal(module.weight.view(torch.uint8), want.view(torch.uint8)), name
            assert torch.equal(module.weight_scale, scale), name
        assert checked == sum(isinstance(m, Fp8Linear) for m in whole.values()) == 8  # 2 layers x 4
        split = tokens(llm)
    assert [t[:2] for t in split] == [t[:2] for t in one]
    with LLM(tiny_llama_dir, num_kv_blocks=48, quantization="fp8", tensor_parallel_size=2) as llm:
        assert [t[:1] for t in tokens(llm)] == [t[:1] for t in one]
