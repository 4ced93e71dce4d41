"""classifier="sharded": the layer split across ranks computes what the full layer computes on the
global batch. Ranks run on CPU with gloo (tests/sharded_ranks.py)."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from fastface_pl.models.classifiers import FullClassifier, SampledClassifier
from fastface_pl.models.margins import build_margin
from fastface_pl.models.sharded import ShardedClassifier, shard_range
from sharded_ranks import (EMBEDDING, PER_RANK, autocast_rank, autocast_step, build, equality_rank, global_batches,
                           optimizer, sampling_rank, spawn, train)

needs_gloo = pytest.mark.skipif(not (dist.is_available() and dist.is_gloo_available()), reason="needs gloo")


def test_shard_ranges_cover_the_classes_once_and_differ_by_at_most_one_row():
    for classes, world in [(11, 2), (11, 3), (10, 3), (3, 3), (2_000_000, 8)]:
        ranges = [shard_range(classes, world, rank) for rank in range(world)]
        assert ranges[0][0] == 0 and ranges[-1][1] == classes
        assert all(a[1] == b[0] for a, b in zip(ranges, ranges[1:]))
        sizes = [end - start for start, end in ranges]
        assert max(sizes) - min(sizes) <= 1


@pytest.mark.parametrize("margin", ["arcface", "cosface", "arcface_exact"])
def test_on_one_process_it_is_the_full_layer(margin):
    torch.manual_seed(0)
    sharded = ShardedClassifier(8, 11, build_margin(margin))
    full = FullClassifier(8, 11, build_margin(margin))
    full.weight.data.copy_(sharded.weight.data)
    embeddings = torch.randn(6, 8, requires_grad=True)
    labels = torch.tensor([0, 3, 10, -1, 5, 3])
    expected = full(embeddings, labels)
    expected_grads = torch.autograd.grad(expected, [embeddings, full.weight])
    loss = sharded(embeddings, labels)
    grads = torch.autograd.grad(loss, [embeddings, sharded.weight])
    torch.testing.assert_close(loss, expected, rtol=1e-6, atol=1e-6)
    for got, want in zip(grads, expected_grads):
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-7)


def test_on_one_process_with_a_sample_rate_it_keeps_every_positive_and_the_share():
    torch.manual_seed(0)
    layer = ShardedClassifier(8, 100, "arcface", sample_rate=0.2)
    labels = torch.tensor([0, 3, 99, -1, 5, 3])
    loss = layer(torch.randn(6, 8, requires_grad=True), labels)
    loss.backward()
    assert layer.last_sampled.numel() == 20 and set(labels[labels >= 0].tolist()) <= set(layer.last_sampled.tolist())
    assert layer.weight.grad.is_sparse  # only the sampled rows: RowSparseSGD leaves the others alone
    rows = layer.weight.grad.coalesce().indices()[0]
    assert set(rows.tolist()) <= set(layer.last_sampled.tolist())
    layer.eval()  # evaluation scores every class, as the sampled layer does
    sampled = SampledClassifier(8, 100, "arcface", sample_rate=0.2).eval()
    sampled.weight.data.copy_(layer.weight.data)
    embeddings = torch.randn(6, 8)
    torch.testing.assert_close(layer(embeddings, labels), sampled(embeddings, labels), rtol=1e-6, atol=1e-6)


def reference_full_layer(num_classes: int, world: int) -> dict:
    """The full layer on one process, trained on the same global batches from the same initial weights."""
    backbone, sharded = build(num_classes)
    full = FullClassifier(EMBEDDING, num_classes, "arcface")
    full.weight.data.copy_(sharded.weight.data)
    x, y = global_batches(num_classes, world)
    losses, first_grads = train(backbone, backbone, full, optimizer(backbone, full), x, y)
    return {"losses": losses, "grads": first_grads, "backbone": backbone.state_dict(), "weight": full.weight.detach()}


@needs_gloo
@pytest.mark.parametrize("world", [2, 3])
def test_ranks_compute_the_full_layers_loss_gradients_and_weights(tmp_path, world):
    """C = 11 (divisible by neither 2 nor 3): the global loss on every rank, the backbone's gradient after DDP's
    average, and every weight after 4 SGD steps (momentum, weight decay) equal the full layer's on one process."""
    num_classes = 11
    ranks = spawn(equality_rank, world, tmp_path, num_classes)
    want = reference_full_layer(num_classes, world)
    for rank in ranks:
        torch.testing.assert_close(rank["losses"], want["losses"], rtol=1e-6, atol=1e-6)
        for got, expected in zip(rank["grads"], want["grads"]):
            torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
        for key, value in want["backbone"].items():
            torch.testing.assert_close(rank["backbone"][key], value, rtol=1e-5, atol=1e-6)
    assert [r["range"] for r in ranks] == [shard_range(num_classes, world, k) for k in range(world)]
    torch.testing.assert_close(torch.cat([r["rows"] for r in ranks]), want["weight"], rtol=1e-5, atol=1e-6)
    assert not torch.equal(want["losses"][0], want["losses"][-1])  # it trained


@needs_gloo
def test_under_bf16_autocast_the_first_step_differs_from_the_full_layers_by_rounding_only(tmp_path):
    """bf16-mixed on 2 ranks, one step from the same weights on the same global batch: the loss and the layer's
    gradient equal the full layer's on one process to fp32 rounding, the embeddings' gradient (bf16) to one bf16
    rounding. It is summed over the classes in another order (per rank, then reduce-scatter), so before its cast to
    bf16 it differs in the last fp32 bits; a value on a bf16 rounding boundary then rounds the other way, and the
    steps after drift apart as under any change of rounding (docs/sharded.md; the gpu_check smoke compares the last
    losses in fp32 for this reason). The backbone's gradient is not compared with one process's: under DDP each
    rank's bf16 matrix products sum its own samples only, whatever the layer."""
    num_classes, world = 11, 2
    ranks = spawn(autocast_rank, world, tmp_path, num_classes)
    backbone, sharded = build(num_classes)
    full = FullClassifier(EMBEDDING, num_classes, "arcface")
    full.weight.data.copy_(sharded.weight.data)
    x, y = global_batches(num_classes, world)
    # the backbone on each rank's samples apart, as the ranks run it: the same bf16 embeddings, whatever the kernels
    want = autocast_step(lambda images: torch.cat([backbone(part) for part in images.split(PER_RANK)]), full,
                         x[0], y[0])
    assert want["embeddings"].dtype == torch.bfloat16  # the backbone ran in bf16
    for rank, got in enumerate(ranks):
        torch.testing.assert_close(got["loss"], want["loss"], rtol=1e-6, atol=1e-6)
        start, end = got["range"]
        torch.testing.assert_close(got["rows"], want["rows"][start:end], rtol=1e-5, atol=1e-7)
        # the rank's embeddings' gradient is N times its share of the global loss's (DDP then averages)
        mine = want["embeddings"][rank * PER_RANK : (rank + 1) * PER_RANK]
        torch.testing.assert_close(got["embeddings"] / world, mine, rtol=2**-7, atol=1e-6)


@needs_gloo
def test_ranks_sample_their_positives_and_the_share_and_draw_the_same_after_a_restore(tmp_path):
    num_classes, rate = 23, 0.5
    ranks = spawn(sampling_rank, 2, tmp_path, num_classes, rate)
    labels = ranks[0]["labels"]
    for rank in ranks:
        start, end = rank["range"]
        for step, sample in enumerate(rank["samples"]):
            positives = {int(c) - start for c in labels[step] if start <= c < end}
            assert positives <= set(sample.tolist())
            assert sample.numel() == max(rank["num_sample"], len(positives)) == max(round(rate * (end - start)),
                                                                                     len(positives))
            assert torch.equal(sample, sample.unique())  # sorted, no repeats
        assert torch.equal(rank["resumed"], rank["samples"][2])
        assert not all(torch.equal(rank["samples"][0], s) for s in rank["samples"][1:])  # redrawn each step
    assert not torch.equal(ranks[0]["samples"][0], ranks[1]["samples"][0])


def test_a_step_reads_no_scalar_from_the_device():
    """No ``.item()``/``int(tensor)`` in the layer's step (on a GPU each would be a host-device sync)."""
    layer = ShardedClassifier(8, 50, "arcface")
    embeddings = torch.randn(6, 8, requires_grad=True)
    labels = torch.tensor([0, 3, 49, -1, 5, 3])
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as profile:
        layer(embeddings, labels).backward()
    events = profile.events()
    assert any(event.name == "aten::mm" for event in events)  # the profiler saw the step
    # the label range check is an asynchronous assertion on a GPU (on the CPU it reads its flag, nothing else does)
    def within_the_assertion(event) -> bool:
        while event is not None:
            if event.name.startswith("aten::_assert_async"):
                return True
            event = event.cpu_parent
        return False

    reads = [event for event in events if event.name == "aten::_local_scalar_dense" and not within_the_assertion(event)]
    assert reads == []


def test_a_label_that_no_rank_holds_stops_the_step():
    """Without the check it would leave its sample without a target and count it anyway (a silent wrong loss)."""
    layer = ShardedClassifier(8, 10, "arcface")
    with pytest.raises(RuntimeError, match=r"labels must be in \[0, 10\) or -1"):
        layer(torch.randn(3, 8), torch.tensor([0, 10, 2]))
