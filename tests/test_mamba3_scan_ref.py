"""The Mamba-3 PyTorch reference: step recurrence == chunked quadratic form (float64), MIMO, gradcheck."""
import pytest
import torch

from kernels.mamba3_scan_ref import (
    cumulative_angles,
    expand_groups,
    rotate_pairs,
    scan_chunked_ref,
    scan_step_ref,
)


def random_inputs(batch=2, length=37, heads=4, groups=2, headdim=3, state=8, angles=2, rank=None, seed=0):
    gen = torch.Generator().manual_seed(seed)
    f64 = dict(dtype=torch.float64, generator=gen)
    rank_axis = () if rank is None else (rank,)
    return dict(
        x=torch.randn(batch, length, heads, *rank_axis, headdim, **f64),
        dt=torch.rand(batch, length, heads, **f64) * 0.8,
        A=-torch.rand(batch, length, heads, **f64) * 2 - 1e-4,
        lam=torch.rand(batch, length, heads, **f64),
        Bm=torch.randn(batch, length, groups, *rank_axis, state, **f64),
        Cm=torch.randn(batch, length, groups, *rank_axis, state, **f64),
        D=torch.randn(heads, **f64),
        theta=torch.randn(batch, length, angles, **f64) * 2,
    )


def rotated(inputs):
    heads = inputs["x"].shape[2]
    angle = cumulative_angles(inputs["dt"], inputs["theta"])
    if inputs["Bm"].dim() == 5:
        angle = angle[:, :, :, None, :]
    return (rotate_pairs(expand_groups(inputs["Bm"], heads), angle),
            rotate_pairs(expand_groups(inputs["Cm"], heads), angle))


@pytest.mark.parametrize("use_rotation", [False, True])
@pytest.mark.parametrize("chunk_size", [8, 16, 64])
def test_step_equals_chunked_float64(use_rotation, chunk_size):
    inp = random_inputs(seed=chunk_size)
    common = (inp["x"], inp["dt"], inp["A"], inp["lam"])
    if use_rotation:
        step = scan_step_ref(*common, inp["Bm"], inp["Cm"], inp["D"], theta=inp["theta"])
        chunked = scan_chunked_ref(*common, *rotated(inp), inp["D"], chunk_size=chunk_size)
    else:
        step = scan_step_ref(*common, inp["Bm"], inp["Cm"], inp["D"])
        chunked = scan_chunked_ref(*common, inp["Bm"], inp["Cm"], inp["D"], chunk_size=chunk_size)
    assert step.abs().max() > 0.1
    torch.testing.assert_close(chunked, step, rtol=0, atol=1e-10)


def test_rotation_changes_the_output():
    inp = random_inputs(seed=3)
    common = (inp["x"], inp["dt"], inp["A"], inp["lam"])
    plain = scan_step_ref(*common, inp["Bm"], inp["Cm"], inp["D"])
    rotating = scan_step_ref(*common, inp["Bm"], inp["Cm"], inp["D"], theta=inp["theta"])
    assert (plain - rotating).abs().max() > 1e-2


def test_mimo_step_equals_chunked_and_rank1_equals_siso():
    inp = random_inputs(rank=3, seed=5)
    common = (inp["x"], inp["dt"], inp["A"], inp["lam"])
    step = scan_step_ref(*common, inp["Bm"], inp["Cm"], inp["D"], theta=inp["theta"])
    chunked = scan_chunked_ref(*common, *rotated(inp), inp["D"], chunk_size=16)
    torch.testing.assert_close(chunked, step, rtol=0, atol=1e-10)

    siso = random_inputs(seed=6)
    as_rank1 = {k: (v.unsqueeze(3) if k in ("x", "Bm", "Cm") else v) for k, v in siso.items()}
    y_siso = scan_chunked_ref(siso["x"], siso["dt"], siso["A"], siso["lam"], *rotated(siso), siso["D"], chunk_size=16)
    y_rank1 = scan_chunked_ref(as_rank1["x"], as_rank1["dt"], as_rank1["A"], as_rank1["lam"], *rotated(as_rank1),
                               as_rank1["D"], chunk_size=16)
    torch.testing.assert_close(y_rank1.squeeze(3), y_siso, rtol=0, atol=1e-12)


def test_gradcheck_chunked_reference():
    inp = random_inputs(batch=1, length=6, heads=2, groups=1, headdim=2, state=4, angles=1, seed=7)
    names = ["x", "dt", "A", "lam", "Bm", "Cm", "D", "theta"]
    tensors = [inp[name].clone().requires_grad_() for name in names]

    def fn(x, dt, A, lam, Bm, Cm, D, theta):
        angle = cumulative_angles(dt, theta)
        heads = x.shape[2]
        Bh, Ch = rotate_pairs(expand_groups(Bm, heads), angle), rotate_pairs(expand_groups(Cm, heads), angle)
        return scan_chunked_ref(x, dt, A, lam, Bh, Ch, D, chunk_size=4)

    assert torch.autograd.gradcheck(fn, tensors, eps=1e-6, atol=1e-7)
