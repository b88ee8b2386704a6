"""The input-subspace bookkeeping behind merge / olora "inputs" (nanochat/lora/subspace.py): bases that
hold the asked energy and grow task by task, and adapters confined off them (or inside a task's own
directions) exactly."""
import pytest
import torch

from nanochat.lora.adapter import LoRA
from nanochat.lora.subspace import InputSubspace

KEY = "h.0.attn.c_q"  # a 64-wide input in the tiny model


def rotation(n, seed):
    q, _ = torch.linalg.qr(torch.randn(n, n, generator=torch.Generator().manual_seed(seed), dtype=torch.float64))
    return q


def covariance(q, energies):
    """sum x x^T with energy e_k along column k of q (no energy elsewhere)."""
    q = q[:, :len(energies)]
    return q @ torch.diag(torch.tensor(energies, dtype=torch.float64)) @ q.t()


def projector(M):
    return M.double() @ M.double().t()


def test_basis_holds_the_energy_and_grows_only_by_what_it_lacks(tiny_model):
    lora = LoRA(tiny_model)
    sub = InputSubspace(lora, 0.85)
    q = rotation(64, 0)
    # energies 6, 3, 1: 85% of 10 needs the top two directions
    assert sub.add({KEY: covariance(q, [6, 3, 1])}) == {KEY: 2}
    U = sub.bases[KEY]
    assert U.shape == (64, 2)
    assert torch.allclose(projector(U), projector(q[:, :2]), atol=1e-6)
    # the next task: 5 along a held direction, 5 along a new one; the basis holds 5 of the 8.5 asked
    # already, the new direction brings the rest
    assert sub.add({KEY: covariance(q[:, [0, 3]], [5, 5])}) == {KEY: 1}
    U = sub.bases[KEY]
    assert torch.allclose(U.t().double() @ U.double(), torch.eye(3, dtype=torch.float64), atol=1e-6)
    assert torch.allclose(projector(U), projector(q[:, [0, 1, 3]]), atol=1e-6)
    # inputs wholly inside the basis add nothing
    assert sub.add({KEY: covariance(q[:, [1, 3]], [2, 1])}) == {KEY: 0}
    assert sub.dims() == {KEY: 3}
    assert sub.num_bytes() == 64 * 3 * 4
    lora.close()


def test_projection_keeps_A_off_the_basis_and_leaves_the_rest(tiny_model):
    lora = LoRA(tiny_model)
    sub = InputSubspace(lora, 0.9)
    sub.add({KEY: covariance(rotation(64, 1), [4, 3, 2, 1])})
    U = sub.bases[KEY]
    ad = lora.add("new", rank=4, alpha=8, seed=0)
    before = [a.detach().clone() for a in ad.A]
    sub.project(ad)
    i = ad.index[KEY]
    assert (ad.A[i] @ U).abs().max().item() < 1e-6  # reads nothing of the earlier inputs
    off = before[i] - (before[i] @ U) @ U.t()
    assert torch.allclose(ad.A[i], off, atol=1e-6)  # and keeps everything else
    assert (ad.A[i] - before[i]).abs().max() > 1e-3  # the projection did remove something
    for k, j in ad.index.items():  # layers without a basis are untouched
        if k != KEY:
            assert torch.equal(ad.A[j], before[j])
    # so for an input inside the basis the adapter's output is zero, whatever B holds
    with torch.no_grad():
        ad.B[i].normal_()
    x = U @ torch.randn(U.size(1))
    assert ad.delta(i, x[None]).abs().max().item() < 1e-5
    lora.close()


def test_confine_keeps_A_inside_the_new_tasks_own_directions(tiny_model):
    lora = LoRA(tiny_model)
    sub = InputSubspace(lora, 0.95)
    q = rotation(64, 2)
    sub.add({KEY: covariance(q, [10])})  # the earlier task used direction 0
    # the new task uses directions 0 (shared), 1 and 2; off the basis, 1 and 2 hold all of the rest
    sub.confine({KEY: covariance(q, [7, 3, 2])}, 0.95)
    V = sub.own[KEY]
    assert torch.allclose(projector(V), projector(q[:, 1:3]), atol=1e-6)
    ad = lora.add("new", rank=4, alpha=8, seed=0)
    sub.project(ad)
    A = ad.A[ad.index[KEY]]
    assert torch.allclose(A.double() @ projector(q[:, 1:3]), A.double(), atol=1e-6)  # inside span(q1, q2)
    assert (A @ sub.bases[KEY]).abs().max().item() < 1e-6
    lora.close()


def test_energy_outside_zero_one_is_refused(tiny_model):
    lora = LoRA(tiny_model)
    for bad in (0.0, 1.0, 1.5):
        with pytest.raises(ValueError, match="subspace energy must be in"):
            InputSubspace(lora, bad)
    lora.close()


def test_covariances_are_the_inputs_each_layer_saw(tiny_model):
    lora = LoRA(tiny_model)
    sub = InputSubspace(lora, 0.9)
    seen = {}

    def record(module, inputs, output):
        seen["x"] = inputs[0].detach().clone()
    h = lora.modules["h.0.mlp.c_proj"].register_forward_hook(record)
    x = torch.randint(0, 265, (2, 16))
    covs = sub.covariances(lambda: tiny_model(x))
    h.remove()
    assert set(covs) == set(lora.modules)
    flat = seen["x"].reshape(-1, seen["x"].size(-1)).double()
    assert torch.allclose(covs["h.0.mlp.c_proj"], flat.t() @ flat, rtol=1e-4, atol=1e-4)
    lora.close()
