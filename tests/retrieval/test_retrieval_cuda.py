"""knn_search on a GPU equals the CPU result (skipped where CUDA is absent)."""

import pytest
import torch

from cbmir.retrieval import knn_search

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def brute_force(q, x, k, distance="euclidean"):
    q, x = q.double().cpu(), x.double().cpu()
    if distance == "cosine":
        d = 1.0 - (q / q.norm(dim=1, keepdim=True)) @ (x / x.norm(dim=1, keepdim=True)).T
    else:
        d = torch.cdist(q, x)
    return d.argsort(dim=1, stable=True)[:, :k]


@pytest.fixture
def data():
    g = torch.Generator().manual_seed(0)
    q = torch.randn(300, 64, generator=g)
    x = torch.randn(5000, 64, generator=g)
    x[4000] = x[11]
    x[2500] = x[11]
    q[0] = x[11]
    return q, x


@pytest.mark.parametrize("distance", ["euclidean", "cosine"])
@pytest.mark.parametrize("score_dtype", [None, torch.float16, torch.bfloat16])
def test_cuda_equals_brute_force(data, distance, score_dtype):
    q, x = data
    d, i = knn_search(q, x, 7, distance, device="cuda", score_dtype=score_dtype, db_chunk=1000)
    assert d.device.type == "cpu" and i.device.type == "cpu"
    assert torch.equal(i, brute_force(q, x, 7, distance))
    assert i[0, :3].tolist() == [11, 2500, 4000]
    cpu_d, _ = knn_search(q, x, 7, distance)
    assert torch.allclose(d, cpu_d, atol=1e-5)


def test_cuda_tensors_default_to_their_device(data):
    q, x = data
    d, i = knn_search(q.cuda(), x.cuda(), 5)
    assert d.device.type == "cpu"
    assert torch.equal(i, brute_force(q, x, 5))


def test_tf32_and_cancellation_still_exact():
    g = torch.Generator().manual_seed(2)
    x = 1000.0 + 1e-2 * torch.randn(3000, 32, generator=g)
    q = 1000.0 + 1e-2 * torch.randn(100, 32, generator=g)
    truth = brute_force(q, x, 5)
    old = torch.backends.cuda.matmul.allow_tf32
    try:
        for tf32 in (False, True):
            torch.backends.cuda.matmul.allow_tf32 = tf32
            assert torch.equal(knn_search(q, x, 5, device="cuda")[1], truth)
            assert torch.equal(
                knn_search(q, x, 5, device="cuda", score_dtype=torch.float16)[1], truth
            )
    finally:
        torch.backends.cuda.matmul.allow_tf32 = old
