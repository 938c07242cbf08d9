"""Which attention kernel Transformer Engine picks on this GPU for the shapes our ``te`` adapter
hands it (bshd causal, bshd sliding window, thd documents), forward and backward once each.

    NVTE_DEBUG=1 NVTE_DEBUG_LEVEL=2 python scripts/te/probe.py      # TE logs its choice
"""

from __future__ import annotations

import torch
import transformer_engine
import transformer_engine.pytorch as te


def main() -> None:
    print("transformer_engine", transformer_engine.__version__, "torch", torch.__version__)
    dev, dt = torch.device("cuda"), torch.bfloat16
    B, T, H, Hkv, D = 2, 1024, 16, 4, 128
    for label, window, fmt in (
        ("causal", (-1, 0), "bshd"),
        ("window", (127, 0), "bshd"),
        ("documents", (-1, 0), "thd"),
    ):
        attn = te.DotProductAttention(
            H, D, num_gqa_groups=Hkv, attn_mask_type="causal", window_size=window, qkv_format="bshd"
        )
        q = torch.randn(B, T, H, D, device=dev, dtype=dt, requires_grad=True)
        k = torch.randn(B, T, Hkv, D, device=dev, dtype=dt, requires_grad=True)
        v = torch.randn(B, T, Hkv, D, device=dev, dtype=dt, requires_grad=True)
        if fmt == "bshd":
            out = attn(q, k, v, qkv_format="bshd", attn_mask_type="causal", window_size=window)
        else:
            cu = torch.tensor([0, 300, 1024, 1500, 2048], device=dev, dtype=torch.int32)
            out = attn(
                q.flatten(0, 1), k.flatten(0, 1), v.flatten(0, 1), qkv_format="thd", cu_seqlens_q=cu,
                cu_seqlens_kv=cu, max_seqlen_q=724, max_seqlen_kv=724, attn_mask_type="padding_causal",
                window_size=window,
            )  # fmt: skip
        out.float().square().sum().backward()
        torch.cuda.synchronize()
        print(
            f"{label}: out {tuple(out.shape)} finite={bool(out.isfinite().all())} dq finite={bool(q.grad.isfinite().all())}"
        )


if __name__ == "__main__":
    main()
