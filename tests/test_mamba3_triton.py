"""Triton Mamba-3 scan == PyTorch reference, outputs and all input gradients, under TRITON_INTERPRET=1 on CPU.

TRITON_INTERPRET must be set before triton is imported, so the comparison runs in a fresh subprocess (this file run
as a script). Skipped when triton is not importable.
"""
import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def compare(dtype_name: str, seed: int) -> dict:
    """Run in the interpreted subprocess: relative errors {name: err} of Triton vs reference for one dtype."""
    import torch

    from kernels.mamba3_scan import ScanSettings, mamba3_scan
    from kernels.mamba3_scan_ref import scan_chunked_ref

    if dtype_name.startswith("fused-inline-"):
        return compare_fused(dtype_name[len("fused-inline-"):], seed, reversed_heads=1, inline_rotation=True)
    if dtype_name.startswith("fused-reversed-"):
        # long_scan_chunks=0 also covers the long-sequence form of the start-angle cumsum
        return compare_fused(dtype_name[len("fused-reversed-"):], seed, reversed_heads=3, long_scan_chunks=0)
    if dtype_name.startswith("fused-"):
        return compare_fused(dtype_name[len("fused-"):], seed)
    if dtype_name == "layer":
        return compare_layer(seed)

    torch.set_num_threads(1)
    dtype = getattr(torch, dtype_name)
    gen = torch.Generator().manual_seed(seed)
    batch, length, heads, groups, headdim, state = 2, 72, 4, 2, 16, 16  # 72: a partial last chunk
    inputs = [
        torch.randn(batch, length, heads, headdim, generator=gen),
        torch.rand(batch, length, heads, generator=gen) * 0.5,
        -torch.rand(batch, length, heads, generator=gen) - 0.05,
        torch.rand(batch, length, heads, generator=gen),
        torch.randn(batch, length, groups, state, generator=gen) * 0.5,
        torch.randn(batch, length, groups, state, generator=gen) * 0.5,
        torch.randn(heads, generator=gen),
    ]
    low_precision = {0, 4, 5}  # x, Bm, Cm travel in `dtype`
    out_grad = torch.randn(batch, length, heads, headdim, generator=gen)

    def run(fn, cast, **kwargs):
        args = [(v.to(dtype).to(cast) if i in low_precision else v.to(cast)).clone().requires_grad_()
                for i, v in enumerate(inputs)]
        y = fn(*args, **kwargs)
        (y.to(cast) * out_grad.to(cast)).sum().backward()
        return [y.detach().double()] + [a.grad.double() for a in args]

    reference = run(scan_chunked_ref, torch.float64, chunk_size=16)
    # target_programs=24 with batch*heads=8 cuts the 5 chunks into 3 blocks: exercises the block scan too; 8: one
    # block per row (zero incoming states, not kept for backward)
    names = ["y", "dx", "ddt", "dA", "dlam", "dB", "dC", "dD"]
    errors = {}
    for programs, tag in ((24, ""), (8, "one block:")):
        triton_out = run(mamba3_scan, dtype, chunk_size=16, settings=ScanSettings(target_programs=programs))
        errors.update({tag + n: ((t - r).norm() / r.norm()).item() for n, r, t in zip(names, reference, triton_out)})
    return errors


def compare_fused(dtype_name: str, seed: int, reversed_heads: int = 0, **settings) -> dict:
    """The fused op (per-group B/C, per-head biases, rotation by cumulative angles, D skip, all in-kernel) vs
    ``scan_fused_ref`` in float64: output and the gradient of every input (biases and θ included). With
    ``reversed_heads``, the last heads scan right to left in the same launch (the reference flips them);
    ``settings``: ``ScanSettings`` fields, e.g. ``inline_rotation`` forms B̄, C̄ inside the scan kernels instead of
    in the separate rotation pass."""
    import torch

    from kernels.mamba3_scan import ScanSettings, mamba3_scan
    from kernels.mamba3_scan_ref import scan_fused_ref

    torch.set_num_threads(1)
    dtype = getattr(torch, dtype_name)
    gen = torch.Generator().manual_seed(seed)
    batch, length, heads, groups, headdim, state, angles = 4, 72, 4, 2, 16, 16, 4
    inputs = dict(
        x=torch.randn(batch, length, heads, headdim, generator=gen),
        dt=torch.rand(batch, length, heads, generator=gen) * 0.8,
        A=-torch.rand(batch, length, heads, generator=gen) - 0.05,
        lam=torch.rand(batch, length, heads, generator=gen),
        Bm=torch.randn(batch, length, groups, state, generator=gen) * 0.5,
        Cm=torch.randn(batch, length, groups, state, generator=gen) * 0.5,
        D=torch.randn(heads, generator=gen),
        B_bias=1 + 0.3 * torch.randn(2, heads, state, generator=gen),  # two bias rows: batch rows 0-1 and 2-3
        C_bias=1 + 0.3 * torch.randn(2, heads, state, generator=gen),
        theta=torch.randn(batch, length, angles, generator=gen) * 2,
    )
    low_precision = {"x", "Bm", "Cm"}
    out_grad = torch.randn(batch, length, heads, headdim, generator=gen)

    def run(fn, cast, **kwargs):
        args = {k: (v.to(dtype).to(cast) if k in low_precision else v.to(cast)).clone().requires_grad_()
                for k, v in inputs.items()}
        y = fn(**args, **kwargs)
        (y.to(cast) * out_grad.to(cast)).sum().backward()
        return [y.detach().double()] + [a.grad.double() for a in args.values()]

    reference = run(scan_fused_ref, torch.float64, chunk_size=16, reversed_heads=reversed_heads)
    # 5 chunks -> 2 blocks per row
    triton_out = run(mamba3_scan, dtype, chunk_size=16, reversed_heads=reversed_heads,
                     settings=ScanSettings(target_programs=40, **settings))
    names = ["y"] + ["d" + k for k in inputs]
    return {n: ((t - r).norm() / r.norm()).item() for n, r, t in zip(names, reference, triton_out)}


def compare_layer(seed: int) -> dict:
    """A bidirectional Mamba-3 block (2 groups, padding) through the fused Triton op vs the PyTorch reference path,
    fp32: output and every parameter gradient. Worst error per kind of direction handling."""
    import torch

    import predictors.backbones.mamba3 as mamba3

    torch.set_num_threads(1)
    torch.manual_seed(seed)
    errors = {}
    for bidirectional in ("separate", "shared", "split", "forward"):
        options = dict(mlp_ratio=2.0, d_state=16, headdim=16, chunk_size=16, ngroups=2, bidirectional=bidirectional)
        block = mamba3.Mamba3Block(32, kernel="reference", **options)
        for p in block.parameters():
            p.data += 0.05 * torch.randn_like(p)  # biases away from their init
        with torch.random.fork_rng():
            fused = mamba3.Mamba3Block(32, kernel="triton", **options)  # the Triton op on CPU tensors
        fused.load_state_dict(block.state_dict())
        x = torch.randn(2, 40, 32)
        padding = torch.zeros(2, 40, dtype=torch.bool)
        padding[1, 33:] = True
        outs = []
        for module in (block, fused):
            y = module(x, padding)
            (y * torch.linspace(-1, 1, 32)).sum().backward()
            outs.append([y.detach()] + [p.grad for p in module.parameters()])
        names = ["y"] + [n for n, _ in block.named_parameters()]
        for name, ref, got in zip(names, *outs):
            if ref.norm() > 0:
                errors[f"{bidirectional}:{name}"] = ((got - ref).norm() / ref.norm()).item()
    return errors


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed")
@pytest.mark.parametrize("dtype_name,tolerance", [("float32", 1e-5), ("bfloat16", 2.5e-2), ("fused-float32", 1e-5),
                                                  ("fused-bfloat16", 2.5e-2), ("fused-reversed-float32", 1e-5),
                                                  ("fused-inline-float32", 1e-5),
                                                  ("layer", 1e-5)])
def test_triton_matches_reference_interpreted(dtype_name, tolerance):
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    result = subprocess.run([sys.executable, __file__, dtype_name], env=env, capture_output=True, text=True,
                            timeout=300, cwd=REPO)
    assert result.returncode == 0, result.stderr[-3000:]
    errors = eval(result.stdout.strip().splitlines()[-1])  # a dict literal printed by the script
    bad = {name: err for name, err in errors.items() if not err <= tolerance}
    assert not bad, f"{dtype_name}: relative errors above {tolerance}: {bad} (all: {errors})"


if __name__ == "__main__":
    assert os.environ.get("TRITON_INTERPRET") == "1", "run with TRITON_INTERPRET=1"
    print(compare(sys.argv[1], seed=0))
