"""Tensor parallelism on gloo with 2 CPU processes: forward, input and
parameter gradients of the sequence-sharded TP module equal the single-process module; weight init
on DTensors equals the unsharded init. Mirrors OLMo-core's ``test_tensor_parallel_attention``."""

from __future__ import annotations

import os
import tempfile
import traceback

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from olmo_attn import Attention, ConfigurationError, GateConfig, LayerNormConfig, RoPEConfig

WORLD = 2
D_MODEL, N_HEADS, B, T = 32, 4, 2, 16

CASES = {
    "plain": dict(),
    "rope": dict(rope=RoPEConfig()),
    "qk_norm": dict(qk_norm=LayerNormConfig()),
    "qk_norm_rope": dict(qk_norm=LayerNormConfig(), rope=RoPEConfig()),
    "head_qk_norm": dict(qk_norm=LayerNormConfig(name="rms"), use_head_qk_norm=True),
    "head_qk_norm_rope": dict(qk_norm=LayerNormConfig(), use_head_qk_norm=True, rope=RoPEConfig()),
    "gate_gqa": dict(gate=GateConfig(), n_kv_heads=2),
    "elementwise_gate_swa": dict(gate=GateConfig(granularity="elementwise"), window_size=5),
}


def _build(name: str) -> Attention:
    return Attention(d_model=D_MODEL, n_heads=N_HEADS, backend="torch", **CASES[name])


def _worker(rank: int, store_path: str, ref_path: str, errors) -> None:
    try:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.tensor import DTensor, Shard

        torch.set_num_threads(1)
        store = dist.FileStore(store_path, WORLD)
        dist.init_process_group("gloo", store=store, rank=rank, world_size=WORLD)
        mesh = init_device_mesh("cpu", (WORLD,), mesh_dim_names=("tp",))
        refs = torch.load(ref_path)
        lo, hi = rank * T // WORLD, (rank + 1) * T // WORLD
        for name, ref in refs.items():
            m = _build(name)
            m.load_state_dict(ref["state"])
            m.apply_tp(mesh, input_layout=Shard(1), output_layout=Shard(1), use_local_output=False)
            x = ref["x"][:, lo:hi].clone().requires_grad_()
            y = m(x)
            assert isinstance(y, DTensor), name
            torch.testing.assert_close(y.to_local(), ref["y"][:, lo:hi], msg=lambda s, n=name: f"{n} y: {s}")
            y.to_local().backward(ref["dy"][:, lo:hi])
            torch.testing.assert_close(x.grad, ref["dx"][:, lo:hi], msg=lambda s, n=name: f"{n} dx: {s}")
            for pname, p in m.named_parameters():
                grad = p.grad.full_tensor() if isinstance(p.grad, DTensor) else p.grad
                torch.testing.assert_close(
                    grad, ref["grads"][pname], msg=lambda s, n=f"{name} d{pname}": f"{n}: {s}"
                )
            # init on DTensor parameters: same draws as the unsharded module
            m.init_weights(
                init_method="llama",
                d_model=D_MODEL,
                block_idx=0,
                num_blocks=2,
                generator=torch.Generator().manual_seed(3),
            )
            for pname, p in m.named_parameters():
                full = p.full_tensor() if isinstance(p, DTensor) else p
                torch.testing.assert_close(
                    full, ref["init"][pname], rtol=0, atol=0, msg=lambda s, n=pname: f"init {n}: {s}"
                )
        dist.barrier()
    except BaseException:  # report every failure to the parent, which fails the test
        errors.put(f"rank {rank}:\n{traceback.format_exc()}")
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_tensor_parallel_attention_on_gloo():
    refs = {}
    for i, name in enumerate(CASES):
        torch.manual_seed(i)
        m = _build(name)
        x = torch.randn(B, T, D_MODEL, requires_grad=True)
        dy = torch.randn(B, T, D_MODEL)
        y = m(x)
        y.backward(dy)
        fresh = _build(name)
        fresh.init_weights(
            init_method="llama",
            d_model=D_MODEL,
            block_idx=0,
            num_blocks=2,
            generator=torch.Generator().manual_seed(3),
        )
        refs[name] = {
            "state": m.state_dict(),
            "x": x.detach(),
            "dy": dy,
            "y": y.detach(),
            "dx": x.grad,
            "grads": {n: p.grad for n, p in m.named_parameters()},
            "init": {n: p.detach() for n, p in fresh.named_parameters()},
        }
    with tempfile.TemporaryDirectory() as tmp:
        ref_path = os.path.join(tmp, "refs.pt")
        torch.save(refs, ref_path)
        ctx = mp.get_context("spawn")
        errors = ctx.SimpleQueue()
        procs = [
            ctx.Process(target=_worker, args=(r, os.path.join(tmp, "store"), ref_path, errors))
            for r in range(WORLD)
        ]
        for p in procs:
            p.start()
        for p in procs:
            p.join(timeout=100)
        hung = [p for p in procs if p.is_alive()]
        for p in hung:  # kill the whole group at once when one rank hangs
            p.kill()
        messages = []
        while not errors.empty():
            messages.append(errors.get())
        assert not hung, f"ranks {[procs.index(p) for p in hung]} hung; " + "\n".join(messages)
        assert not messages, "\n".join(messages)
        assert all(p.exitcode == 0 for p in procs), [p.exitcode for p in procs]


def test_tensor_parallel_needs_divisible_heads():
    class _Mesh:
        def size(self) -> int:
            return 3

    with pytest.raises(ConfigurationError, match="divisible by 3"):
        Attention(d_model=32, n_heads=4).apply_tp(_Mesh())
