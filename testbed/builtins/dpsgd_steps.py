"""dp_sgd's training steps: the forward and backward pass of one DP-SGD step.

A step leaves Opacus' optimizer what it needs to clip every example's gradient to C (the
per-example gradients, or with ghost clipping the already clipped sum); the optimizer then
adds the noise and steps the client's accountant. Two drivers: Opacus' own, and testbed's
leaner driver of ghost clipping with a faster per-example gradient for convolutions. They
are apart from the training hook in dpsgd.py because they are the speed-critical part that
benchmarks/bench_dpsgd.py measures, and they neither read nor change the accounting.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from opacus.grad_sample.conv import compute_conv_grad_sample
from torch import nn

# (model wrapped by Opacus, images, labels) -> the batch's mean loss, detached; the
# gradients are left for Opacus' optimizer.
Step = Callable[[nn.Module, torch.Tensor, torch.Tensor], torch.Tensor]


def _opacus_step(criterion: Any) -> Step:
    """Opacus as documented: hooks/functorch, or ghost's wrapped criterion whose
    ``backward`` runs both passes."""

    def step(dp_model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        loss = criterion(dp_model(x), y)
        loss.backward()
        return loss.detach()

    return step


def _lean_ghost_step(dp_model: Any) -> Step:
    """Opacus' ghost clipping (``DPTensorFastGradientClipping.backward``) without work it
    throws away. Pass 1 only has to run Opacus' hooks, which compute each example's
    gradient norm from layer inputs and output gradients: asking autograd for the
    gradient w.r.t. the images skips the weight gradients Opacus computes and discards
    there. Pass 2, on the loss reweighted by the clipping factors min(1, C / norm), asks
    for the weight gradients only. Convolutions' per-example gradients (needed for their
    norms) come from one grouped convolution instead of unfold + bmm
    (``_conv2d_grad_sample``). The norms, the clipping and therefore the guarantee are
    Opacus' own; tests/test_dpsgd.py checks the update against hooks mode."""
    samplers = dict(dp_model.GRAD_SAMPLERS)
    samplers[nn.Conv2d] = _conv2d_grad_sample
    dp_model.GRAD_SAMPLERS = samplers  # this wrapper only, not Opacus' registry
    params = [p for p in dp_model.parameters() if p.requires_grad]

    def step(dp_model: Any, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        x = x.requires_grad_(True)
        per_example = nn.functional.cross_entropy(dp_model(x), y, reduction="none")
        torch.autograd.grad(per_example.mean(), x, retain_graph=True)  # hooks: norms
        coef = dp_model.get_clipping_coef().to(per_example.device)
        dp_model.disable_hooks()
        try:
            torch.autograd.backward((coef * per_example).sum(), inputs=params)
        finally:
            dp_model.enable_hooks()
        return per_example.detach().mean()

    return step


def _conv2d_grad_sample(
    layer: nn.Conv2d, activations: list[torch.Tensor], backprops: torch.Tensor
) -> dict[nn.Parameter, torch.Tensor]:
    """Per-example gradients of a Conv2d as the weight gradient of one convolution with
    the batch folded into groups; faster than Opacus' unfold + bmm on CPU for layers with
    many input channels, which would materialise batch x C_in*k*k x H*W. Opacus' own for
    the rest."""
    a = activations[0]
    n = a.shape[0]
    if n == 0 or layer.groups != 1 or isinstance(layer.padding, str) or layer.in_channels < 16:
        return compute_conv_grad_sample(layer, activations, backprops)
    a = a.to(backprops.dtype)
    o, i = layer.out_channels, layer.in_channels
    weight = layer.weight.detach().repeat(n, 1, 1, 1)
    _, gw, _ = torch.ops.aten.convolution_backward(
        backprops.reshape(1, n * o, *backprops.shape[2:]),
        a.reshape(1, n * i, *a.shape[2:]),
        weight,
        None,
        list(layer.stride),
        list(layer.padding),
        list(layer.dilation),
        False,
        [0, 0],
        n,
        [False, True, False],
    )
    out = {layer.weight: gw.view(n, *layer.weight.shape)}
    if layer.bias is not None and layer.bias.requires_grad:
        out[layer.bias] = backprops.sum(dim=(2, 3))
    return out
