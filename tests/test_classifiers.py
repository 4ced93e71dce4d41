"""Classification layers: the fused margin cross-entropy against a straightforward one, full vs sampled, sparse SGD."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from fastface_pl.models.classifiers import FullClassifier, SampledClassifier, margin_cross_entropy
from fastface_pl.models.margins import CombinedMargin, build_margin
from fastface_pl.models.optim import RowSparseSGD

HEADS = {
    "arcface": lambda: build_margin("arcface", s=16.0),
    "arcface_exact": lambda: build_margin("arcface_exact", s=16.0),
    "cosface": lambda: build_margin("cosface", s=16.0),
    "combined_exact": lambda: CombinedMargin(s=16.0, m1=1.2, m2=0.3, m3=0.1, straight_through=False),
}


def straightforward_loss(embeddings, weight, labels, head):
    """The textbook layer: normalise both, cosine matrix, margin on the target, cross-entropy."""
    cosine = F.normalize(embeddings, dim=1) @ F.normalize(weight, dim=1).t()
    return F.cross_entropy(head(cosine, labels), labels, ignore_index=-1)


def random_problem(batch=6, dim=5, classes=9, seed=0):
    generator = torch.Generator().manual_seed(seed)
    embeddings = torch.randn(batch, dim, dtype=torch.float64, generator=generator, requires_grad=True)
    weight = torch.randn(classes, dim, dtype=torch.float64, generator=generator, requires_grad=True)
    return embeddings, weight


@pytest.mark.parametrize("name", list(HEADS))
def test_fused_loss_and_gradients_equal_straightforward(name):
    head = HEADS[name]()
    embeddings, weight = random_problem()
    labels = torch.tensor([0, 3, 8, -1, 3, 1])
    fused = margin_cross_entropy(embeddings, weight, labels, head)
    fused_grads = torch.autograd.grad(fused, (embeddings, weight))
    reference = straightforward_loss(embeddings, weight, labels, head)
    reference_grads = torch.autograd.grad(reference, (embeddings, weight))
    torch.testing.assert_close(fused, reference)
    for got, expected in zip(fused_grads, reference_grads):
        torch.testing.assert_close(got, expected)
    assert not fused_grads[1][:, :].eq(0).all()


@pytest.mark.parametrize("name", ["arcface_exact", "cosface", "combined_exact"])
def test_fused_gradcheck_float64(name):
    head = HEADS[name]()
    embeddings, weight = random_problem(batch=4, dim=3, classes=5, seed=1)
    labels = torch.tensor([4, -1, 0, 2])
    assert torch.autograd.gradcheck(
        lambda e, w: margin_cross_entropy(e, w, labels, head, reuse_buffer=False), (embeddings, weight))


def test_second_backward_through_reused_buffer_raises():
    embeddings, weight = random_problem()
    loss = margin_cross_entropy(embeddings, weight, torch.tensor([0, 1, 2, 3, 4, 5]), HEADS["cosface"]())
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="reuse_buffer=False"):
        loss.backward()


def test_fused_layer_saves_a_single_batch_by_classes_tensor():
    batch, classes = 8, 50
    embeddings = torch.randn(batch, 16, requires_grad=True)
    weight = torch.randn(classes, 16, requires_grad=True)
    labels = torch.randint(0, classes, (batch,))
    head = build_margin("arcface")

    def count_saved(fn):
        sizes = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: sizes.append(t.numel()) or t, lambda t: t):
            fn()
        return sum(1 for size in sizes if size == batch * classes)  # weight: 800, embeddings: 128

    assert count_saved(lambda: margin_cross_entropy(embeddings, weight, labels, head)) == 1
    assert count_saved(lambda: straightforward_loss(embeddings, weight, labels, head)) >= 2


def test_all_rows_ignored_gives_zero_loss_and_gradient():
    embeddings, weight = random_problem()
    loss = margin_cross_entropy(embeddings, weight, torch.full((6,), -1), HEADS["arcface"]())
    loss.backward()
    assert loss.item() == 0.0 and embeddings.grad.abs().max() == 0 and weight.grad.abs().max() == 0


def test_low_precision_embeddings_give_fp32_loss():
    layer = FullClassifier(8, 20, "arcface")
    for dtype in (torch.float16, torch.bfloat16):
        embeddings = torch.randn(4, 8).to(dtype).requires_grad_(True)
        loss = layer(embeddings, torch.tensor([0, 5, 10, 19]))
        loss.backward()
        assert loss.dtype == torch.float32 and embeddings.grad.dtype == dtype
        assert torch.isfinite(embeddings.grad).all()


def test_sampled_with_rate_one_equals_full():
    torch.manual_seed(0)
    full = FullClassifier(16, 40, build_margin("arcface"))
    sampled = SampledClassifier(16, 40, build_margin("arcface"), sample_rate=1.0)
    sampled.weight.data.copy_(full.weight.data)
    embeddings = torch.randn(8, 16)
    labels = torch.randint(0, 40, (8,))
    full_loss = full(embeddings, labels)
    sampled_loss = sampled(embeddings, labels)
    torch.testing.assert_close(sampled_loss, full_loss)
    full_loss.backward()
    sampled_loss.backward()
    assert sampled.weight.grad.is_sparse
    torch.testing.assert_close(sampled.weight.grad.to_dense(), full.weight.grad)


def test_sampled_includes_positives_and_remaps_labels():
    torch.manual_seed(0)
    layer = SampledClassifier(8, 100, build_margin("cosface", s=8.0), sample_rate=0.1)
    embeddings = torch.randn(12, 8)
    labels = torch.tensor([3, 97, 50, 3, 12, 0, 99, 64, 50, -1, 7, 41])
    for _ in range(5):
        index = layer.sample(labels)
        assert index.numel() == 10 and torch.equal(index, index.sort().values) and index.unique().numel() == 10
        assert set(labels[labels >= 0].tolist()) <= set(index.tolist())
    loss = layer(embeddings, labels)
    index = layer.last_sampled
    remapped = torch.where(labels >= 0, torch.searchsorted(index, labels.clamp_min(0)), labels)
    assert torch.equal(index[remapped[labels >= 0]], labels[labels >= 0])
    expected = straightforward_loss(embeddings, layer.weight[index].detach(), remapped, layer.margin)
    torch.testing.assert_close(loss, expected)
    many = SampledClassifier(8, 20, "arcface", sample_rate=0.1)  # 2 sampled < 5 positives: positives only
    assert torch.equal(many.sample(torch.tensor([4, 1, 9, 1, 15, 2])), torch.tensor([1, 2, 4, 9, 15]))
    layer.eval()  # evaluation uses every class
    torch.testing.assert_close(layer(embeddings, labels), straightforward_loss(embeddings, layer.weight.detach(),
                                                                               labels, layer.margin))
    assert not torch.distributed.is_initialized()


def test_unsampled_rows_untouched_by_sgd_with_momentum_and_weight_decay():
    torch.manual_seed(0)
    layer = SampledClassifier(4, 50, build_margin("arcface", s=8.0), sample_rate=0.1)
    optimizer = RowSparseSGD(layer.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)
    initial = layer.weight.detach().clone()
    touched = torch.zeros(50, dtype=torch.bool)
    for step in range(3):
        labels = torch.tensor([step, 10 + step])
        optimizer.zero_grad()
        layer(torch.randn(2, 4), labels).backward()
        touched[layer.last_sampled] = True
        optimizer.step()
    assert 5 <= int(touched.sum()) < 50
    assert torch.equal(layer.weight.detach()[~touched], initial[~touched])
    momentum = optimizer.state[layer.weight]["momentum_buffer"]
    assert momentum[~touched].abs().max() == 0 and momentum[touched].abs().sum() > 0
    assert not torch.equal(layer.weight.detach()[touched], initial[touched])


def test_row_sparse_sgd_matches_sgd_on_the_sampled_rows():
    torch.manual_seed(0)
    weight = torch.randn(10, 3)
    rows = torch.tensor([1, 4, 7])
    dense = torch.nn.Parameter(weight.clone())
    sparse = torch.nn.Parameter(weight.clone())
    sgd = torch.optim.SGD([dense], lr=0.1, momentum=0.9, weight_decay=0.01, nesterov=True)
    lazy = RowSparseSGD([sparse], lr=0.1, momentum=0.9, weight_decay=0.01, nesterov=True)
    for _ in range(3):
        values = torch.randn(3, 3)
        dense.grad = torch.zeros(10, 3).index_copy(0, rows, values)
        sparse.grad = torch.sparse_coo_tensor(rows.unsqueeze(0), values, (10, 3))
        sgd.step()
        lazy.step()
    # identical on the rows that had a gradient every step; plain SGD also moved the others (weight decay)
    torch.testing.assert_close(sparse.data[rows], dense.data[rows])
    others = torch.tensor([0, 2, 3, 5, 6, 8, 9])
    assert torch.equal(sparse.data[others], weight[others]) and not torch.equal(dense.data[others], weight[others])
    # dense gradients: exactly torch.optim.SGD
    a, b = torch.nn.Parameter(weight.clone()), torch.nn.Parameter(weight.clone())
    opt_a, opt_b = torch.optim.SGD([a], lr=0.1, momentum=0.9), RowSparseSGD([b], lr=0.1, momentum=0.9)
    for _ in range(2):
        a.grad = b.grad = torch.randn(10, 3)
        opt_a.step()
        opt_b.step()
    assert torch.equal(a.data, b.data)


@pytest.mark.parametrize(
    "build, match",
    [
        (lambda: SampledClassifier(8, 10, "arcface", sample_rate=0.0), "sample_rate"),
        (lambda: FullClassifier(8, 0, "arcface"), "num_classes"),
        (lambda: margin_cross_entropy(torch.randn(2, 8), torch.randn(5, 4), torch.tensor([0, 1]),
                                      build_margin("arcface")), "embedding_size"),
        (lambda: FullClassifier(4, 5, "arcface", check_labels=True)(torch.randn(2, 4), torch.tensor([0, 5])),
         "num_classes"),
    ],
)
def test_invalid_arguments(build, match):
    with pytest.raises(ValueError, match=match):
        build()
