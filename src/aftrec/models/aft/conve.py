"""ConvE feature translation, Eq. 9 of AFT.

"Convolutional 2D Knowledge Graph Embeddings" (Dettmers, Minervini, Stenetorp and Riedel,
AAAI 2018), as used by "Adversarial Feature Translation for Multi-domain Recommendation"
(Hao et al., KDD 2021), Eq. 9::

    e_t = ConvE(e_h, r) = Flatten(CNN(f(e_h, r))) W_c

``f`` reshapes the head ``e_h`` and the relation ``r`` into two ``rows x cols`` matrices and
interleaves them row by row (head row 0, relation row 0, head row 1, ...), giving a
``2 rows x cols`` image. A real 2-D convolution (``channels`` filters of ``kernel x kernel``,
zero "same" padding) runs over that image, so every filter sees neighbouring entries of both
inputs across rows *and* columns; batch norm on the input image and on the feature maps, ReLU
and feature-map dropout follow as in Dettmers et al.; the feature maps are flattened and
projected by ``W_c``. Unlike Dettmers et al., the projection is not followed by a ReLU:
``u_t`` (Eq. 11) is a retrieval vector whose inner products with item embeddings must be free
to take either sign.

This is deliberately not the AFT authors' TensorFlow "ConvE" (a linear 2x2 convolution summed
over rows), which collapses to a 1-D filter and ignores the interleaving: here the feature maps
keep their row index through ``Flatten``, so permuting the interleaved rows changes the output.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from aftrec.models.layers import batch_statistics_synced, batch_sum


def interleave_rows(head: torch.Tensor, rel: torch.Tensor, rows: int) -> torch.Tensor:
    """(B, rows*cols) head and relation -> (B, 1, 2*rows, cols) image, rows alternating."""
    b = head.shape[0]
    cols = head.shape[1] // rows
    h = head.reshape(b, rows, cols)  # (B, rows, cols)
    r = rel.reshape(b, rows, cols)  # (B, rows, cols)
    return torch.stack([h, r], dim=2).reshape(b, 1, 2 * rows, cols)  # (B, 1, 2 rows, cols)


class ConvE(nn.Module):
    """``ConvE(head, rel)`` of Eq. 9 for inputs of ``rows * cols`` entries each."""

    def __init__(
        self,
        rows: int,
        cols: int,
        out_dim: int,
        channels: int = 16,
        kernel: int = 3,
        dropout: float = 0.1,
    ) -> None:
        super().__init__()
        self.rows, self.cols = rows, cols
        self.bn_in = nn.BatchNorm2d(1)
        self.conv = nn.Conv2d(1, channels, kernel, padding=kernel // 2)  # "same" size
        self.bn_conv = nn.BatchNorm2d(channels)
        self.feature_drop = nn.Dropout2d(dropout)
        self.proj = nn.Linear(channels * 2 * rows * cols, out_dim)  # W_c

    def forward(self, head: torch.Tensor, rel: torch.Tensor) -> torch.Tensor:
        """(B, rows*cols), (B, rows*cols) -> (B, out_dim)."""
        return self.translate(interleave_rows(head, rel, self.rows))

    def translate(self, image: torch.Tensor) -> torch.Tensor:
        """(B, 1, 2 rows, cols) interleaved image -> (B, out_dim): CNN, Flatten, W_c.

        The function of ``Flatten(Dropout2d(ReLU(BN(Conv2d(BN(image)))))) W_c`` with the
        modules' own parameters, statistics and dropout draws, in a few large products:

        * the k x k filter over the one input channel is a batched product of the filters with
          each example's k^2 shifted copies of its padded image (the patches ``P_b``,
          k^2 x HW), written in the (B, C, HW) layout that ``Flatten`` reads, so ``W_c`` is one
          matrix product whose weight gradient lands in the parameter's own layout;
        * batch norm of a filter's output is folded into the filter: a channel's output
          ``w_c . p + b_c`` has mean ``w_c . mu + b_c`` and variance ``w_c^T S w_c`` over
          the batch's positions (``mu``, ``S`` the patches' mean and covariance, k^2 and
          k^2 x k^2), so ``BN(conv(x)) = (g_c / s_c) w_c . p + beta_c + g_c (b_c - m_c) / s_c``
          with ``s_c = sqrt(var_c + eps)``: the statistics ``BatchNorm2d`` computes,
          differentiated through like it; the running statistics are updated as it does;
        * the per-(example, channel) dropout keep ``m_bc``, a non-negative scale, commutes with
          the ReLU, so it scales example b's folded filter and shift instead of the feature
          maps: ``m_bc ReLU(a) = ReLU(m_bc a)``, and no extra pass over the maps is made.

        ``tests/models/test_aft_conve.py`` checks forward, gradients and running statistics
        against the module-by-module computation."""
        b, _, height, width = image.shape
        conv, proj, bn = self.conv, self.proj, self.bn_conv
        channels, k = conv.out_channels, conv.kernel_size[0]
        hw = height * width
        x = self._normalise_image(image)  # (B, H, W)
        pad = F.pad(x, (k // 2, k // 2, k // 2, k // 2))  # (B, H + k - 1, W + k - 1)
        shifted = [pad[:, i : i + height, j : j + width] for i in range(k) for j in range(k)]
        patches = torch.stack(shifted, dim=1).view(b, k * k, hw)  # (B, k^2, HW): P_b
        weight, bias = conv.weight.view(channels, k * k), conv.bias  # (C, k^2), (C,)
        assert bias is not None, "ConvE's filter has a bias"
        if bn.training or bn.running_mean is None or bn.running_var is None:
            n = float(b * hw)
            sum_p = patches.sum((0, 2))  # (k^2,)
            sum_pp = torch.bmm(patches, patches.mT).sum(0)  # (k^2, k^2)
            if batch_statistics_synced():  # over the global batch of a data-parallel step
                sums = batch_sum(torch.cat([sum_p, sum_pp.flatten()]))
                sum_p, sum_pp = sums[: k * k], sums[k * k :].view(k * k, k * k)
                n = _global_count(n, patches.device)
            mu = sum_p / n  # (k^2,)
            second = sum_pp / n  # (k^2, k^2)
            cov = second - mu[:, None] * mu[None, :]  # S
            mean = weight @ mu + bias  # (C,)  m_c
            var = ((weight @ cov) * weight).sum(1).clamp(min=0.0)  # (C,)  w_c^T S w_c
            if bn.training and bn.running_mean is not None and bn.running_var is not None:
                _update_running(bn, mean.detach(), var.detach() * n / max(n - 1, 1))
        else:
            mean, var = bn.running_mean, bn.running_var
        scale = torch.rsqrt(var + bn.eps)  # (C,)  1 / s_c
        if bn.weight is not None and bn.bias is not None:
            scale = scale * bn.weight
            shift = bn.bias + (bias - mean) * scale
        else:
            shift = (bias - mean) * scale
        folded = weight * scale[:, None]  # (C, k^2)
        drop = self.feature_drop
        if drop.training and drop.p > 0:  # Dropout2d's draw: one keep per (example, channel)
            keep = image.new_empty(b, channels).bernoulli_(1 - drop.p).div_(1 - drop.p)
            filters, shifts = keep.unsqueeze(-1) * folded, keep * shift  # (B, C, k^2), (B, C)
        else:
            filters, shifts = folded.expand(b, -1, -1), shift.expand(b, -1)
        y = torch.baddbmm(shifts.unsqueeze(-1), filters, patches)  # (B, C, HW): BN(conv(x))
        y = F.relu_(y)  # baddbmm keeps no output for its backward: in place is safe
        return proj(y.view(b, channels * hw))  # (B, out_dim): Flatten W_c

    def _normalise_image(self, image: torch.Tensor) -> torch.Tensor:
        """(B, 1, H, W) -> (B, H, W): ``bn_in``; in a data-parallel step, with the statistics
        of the global batch (:func:`~aftrec.models.layers.batch_sum`), as one process
        computes them over it."""
        bn = self.bn_in
        if not (bn.training and batch_statistics_synced()):
            return bn(image)[:, 0]
        sums = batch_sum(torch.stack([image.sum(), (image * image).sum()]))
        n = _global_count(float(image.numel()), image.device)
        mean = sums[0] / n
        var = (sums[1] / n - mean * mean).clamp(min=0.0)
        _update_running(bn, mean.detach().view(1), var.detach().view(1) * n / max(n - 1, 1))
        y = (image - mean) * torch.rsqrt(var + bn.eps)
        if bn.weight is not None and bn.bias is not None:
            y = y * bn.weight + bn.bias
        return y[:, 0]


def _global_count(n: float, device: torch.device) -> float:
    """``n`` summed over the ranks of a data-parallel step (in float64: exact)."""
    return float(batch_sum(torch.tensor([n], dtype=torch.float64, device=device)).item())


@torch.no_grad()
def _update_running(bn: nn.BatchNorm2d, mean: torch.Tensor, unbiased_var: torch.Tensor) -> None:
    """``BatchNorm2d``'s update of its running statistics from one training batch."""
    assert bn.running_mean is not None and bn.running_var is not None
    assert bn.num_batches_tracked is not None
    bn.num_batches_tracked.add_(1)
    m = bn.momentum if bn.momentum is not None else 1.0 / float(bn.num_batches_tracked)
    bn.running_mean.mul_(1 - m).add_(mean, alpha=m)
    bn.running_var.mul_(1 - m).add_(unbiased_var, alpha=m)
