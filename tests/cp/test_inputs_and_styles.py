"""CP input preparation (per-document RoPE rows sharded like the tokens) and the CP styles."""

from __future__ import annotations

import pytest
import torch

from olmo_attn import ConfigurationError, RoPEConfig
from olmo_attn.cp import (
    RingAttentionLoadBalancerType,
    RingContextParallelStyle,
    UlyssesContextParallelStyle,
    shard_batch,
)
from olmo_attn.cp.errors import ShardingArgumentError
from olmo_attn.rope import document_position_ids

CU = torch.tensor([0, 7, 8, 25, 40])


@pytest.mark.parametrize("strategy", ["zig_zag", "llama3", "ulysses"])
@pytest.mark.parametrize("W", [2, 4])
@pytest.mark.parametrize("rope_name", ["default", "complex"])
def test_rope_rows_are_the_sharded_per_document_rows(strategy, W, rope_name):
    rope = RoPEConfig(name=rope_name, theta=10_000).build(16)
    T = int(CU[-1])
    ids = torch.arange(T)[None] + 100
    full = rope.get_buffers(T, "cpu")  # rows by position
    pos = document_position_ids(CU, T)  # per-document positions of the full sequence
    names = ["pos_sin", "pos_cos"] if rope_name == "default" else ["freqs_cis"]
    lm = 4 if strategy != "ulysses" else 2 * W
    for r in range(W):
        lb = RingAttentionLoadBalancerType(strategy).build_for(cp_rank=r, cp_world_size=W)
        batch = shard_batch(
            lb,
            inputs=[ids],
            seq_dims=[1],
            pad_values=[0],
            cu_doc_lens=CU,
            rope=[rope, rope],
            length_multiple=lm,
        )
        # OLMo-core's flow: full-length rows for the per-document positions, sharded with pad 0.0
        expected, meta = lb.batch_shard_by_document(
            inputs=[getattr(full, n)[pos] for n in names],
            seq_dims=[0] * len(names),
            cu_doc_lens=CU,
            pad_values=[0.0] * len(names),
            length_multiple=lm,
        )
        assert len(batch.rope_kwargs) == 2
        for n, exp in zip(names, expected):
            torch.testing.assert_close(batch.rope_kwargs[0][n], exp, rtol=0, atol=0)
        (ids_l,) = batch.inputs
        real = batch.index >= 0
        assert torch.equal(ids_l[0][real], batch.index[real] + 100)
        assert torch.equal(batch.position_ids[real], pos[batch.index[real]])
        for key, val in meta.items():
            got = batch.attention_kwargs[key]
            if isinstance(val, torch.Tensor):
                assert got.dtype == torch.int32 and got.tolist() == val.tolist()
            else:
                assert got == val
        kw = batch.kwargs_for(1)
        assert set(names) <= set(kw) and set(meta) <= set(kw)


def test_plain_sequences_use_global_positions():
    rope = RoPEConfig(theta=10_000).build(8)
    x = torch.randn(2, 22, 8)
    full = rope.get_buffers(22, "cpu")
    for r in range(2):
        lb = RingAttentionLoadBalancerType.zig_zag.build_for(cp_rank=r, cp_world_size=2)
        batch = shard_batch(lb, inputs=[x], seq_dims=[1], pad_values=[0.0], rope=rope)
        (exp,) = lb.batch_shard(inputs=[full.pos_sin], seq_dims=[0], pad_values=[0.0])
        torch.testing.assert_close(batch.rope_kwargs[0]["pos_sin"], exp, rtol=0, atol=0)
        assert batch.attention_kwargs == {}
        assert batch.inputs[0].shape == (2, 12, 8)  # 22 -> padded to 24, 12 per rank


def test_documents_need_one_row():
    lb = RingAttentionLoadBalancerType.ulysses.build_for(cp_rank=0, cp_world_size=2)
    with pytest.raises(ShardingArgumentError, match="B == 1"):
        shard_batch(
            lb, inputs=[torch.zeros(2, 20)], seq_dims=[1], pad_values=[0], cu_doc_lens=torch.tensor([0, 40])
        )


def test_styles():
    ring = RingContextParallelStyle()
    assert ring.load_balancer == "zig_zag" and ring.head_stride == 1
    s = RingContextParallelStyle("llama3", 4)
    assert RingContextParallelStyle.from_dict(s.as_dict(json_safe=True)) == s
    assert s.as_config_dict()["load_balancer"] == "llama3"
    assert RingContextParallelStyle(load_balancer="ulysses").load_balancer == "ulysses"  # refused at apply_cp
    with pytest.raises(ConfigurationError, match="head_stride"):
        RingContextParallelStyle(head_stride=0)
    with pytest.raises(ConfigurationError, match="load_balancer"):
        RingContextParallelStyle(load_balancer="stripe")
    assert UlyssesContextParallelStyle().load_balancer == RingAttentionLoadBalancerType.ulysses
    assert UlyssesContextParallelStyle().as_dict() == {}
