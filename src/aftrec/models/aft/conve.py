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
        """(B, 1, 2 rows, cols) interleaved image -> (B, out_dim): CNN, Flatten, W_c."""
        x = self.bn_in(image)
        x = self.conv(x)  # (B, C, 2 rows, cols): a real 2-D filter over the interleaved rows
        x = F.relu(self.bn_conv(x))
        x = self.feature_drop(x)
        x = x.flatten(1)  # (B, C * 2 rows * cols), row index kept
        return self.proj(x)  # (B, out_dim)
