"""SGD that updates only the sampled rows of a sparse-gradient parameter (the sampled classification layer).

``torch.optim.SGD`` turns a sparse gradient dense as soon as weight decay is on (``grad + λ·w``), so every
row of a C × D classification weight would decay and keep moving with its old momentum even when its class
was not sampled. :class:`RowSparseSGD` is ``torch.optim.SGD`` for dense gradients and, for a sparse
gradient (``SampledClassifier``), applies the same momentum SGD update to the rows present in the gradient
only ("lazy" momentum and weight decay, as LazyAdam does for Adam): rows of unsampled classes stay exactly
as they were, and so does their momentum buffer.
"""

from __future__ import annotations

import torch

__all__ = ["RowSparseSGD"]


class RowSparseSGD(torch.optim.SGD):
    """``torch.optim.SGD`` with lazy row updates for parameters whose gradient is sparse.

    For a sparse gradient with rows R: ``v[R] ← μ·v[R] + (g[R] + λ·w[R])`` and ``w[R] ← w[R] − lr·v[R]``
    (``nesterov``, ``dampening`` and ``maximize`` are honoured too). Dense gradients use the parent class.
    """

    @torch.no_grad()
    def step(self, closure=None):  # type: ignore[override]
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        hidden: list[tuple[torch.Tensor, torch.Tensor]] = []
        for group in self.param_groups:
            for param in group["params"]:
                grad = param.grad
                if grad is None or not grad.is_sparse:
                    continue
                self._sparse_update(param, grad.coalesce(), group)
                hidden.append((param, grad))
                param.grad = None
        try:
            super().step()
        finally:
            for param, grad in hidden:
                param.grad = grad
        return loss

    def _sparse_update(self, param: torch.Tensor, grad: torch.Tensor, group: dict) -> None:
        rows = grad.indices()[0]
        values = grad.values().to(param.dtype)
        if group["maximize"]:
            values = -values
        weight_decay, momentum = group["weight_decay"], group["momentum"]
        lr = float(group["lr"])
        param_rows = param.index_select(0, rows)
        if weight_decay != 0:
            values = values + weight_decay * param_rows
        if momentum != 0:
            state = self.state[param]
            buf = state.get("momentum_buffer")
            if buf is None:
                buf = torch.zeros_like(param, memory_format=torch.preserve_format)
                state["momentum_buffer"] = buf
                buf_rows = values.clone()
            else:
                buf_rows = buf.index_select(0, rows).mul_(momentum).add_(values, alpha=1 - group["dampening"])
            buf.index_copy_(0, rows, buf_rows)
            values = values + momentum * buf_rows if group["nesterov"] else buf_rows
        param.index_copy_(0, rows, param_rows - lr * values)
