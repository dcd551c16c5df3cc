"""Network for solar-cell defect detection: a small convolutional net, one logit per cell.

No BatchNorm (its batch statistics mix samples and break per-sample privacy accounting):
every convolution is followed by a GroupNorm without learnable parameters, which keeps each
image's activations on a fixed scale by itself. The trainable layers are then only
``Conv2d`` and ``Linear``. Opacus 1.6 has a ghost-clipping norm sampler for ``Linear`` but not
for ``Conv2d`` (ghost mode still materialises the convolutions' per-sample gradients and adds
a second backward pass), so per-sample gradients from Opacus's hooks (one backward pass, the
convolutions' gradients from unfolded activations) are the fastest exact clipping here: see
:attr:`~standard_models.cell_defect.task.CellDefectTask.supports_ghost`.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from .source import DEFAULT_IMAGE_SIZE


class CellCNN(nn.Module):
    """``[Conv 3x3 stride 2 -> GroupNorm -> ReLU] x k -> global max pool -> Linear``.

    Global max pooling rather than averaging: a defect (a crack, an inactive area) is a local
    finding, and its strongest response anywhere on the cell should decide; it was also the
    more accurate of the two in the image-size measurements in the README.

    Args:
        image_size: side of the square grayscale input (for the shape check only).
        channels: output channels of each convolution; each halves the resolution.
        groups: GroupNorm groups per convolution (parameter-free normalisation).
    """

    def __init__(
        self,
        image_size: int = DEFAULT_IMAGE_SIZE,
        channels: Sequence[int] = (8, 16, 32),
        groups: int = 4,
    ) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        width = 1
        for c in channels:
            if c % groups:
                raise ValueError(f"channels must be multiples of groups={groups}, got {c}")
            layers += [
                nn.Conv2d(width, c, kernel_size=3, stride=2, padding=1),
                nn.GroupNorm(groups, c, affine=False),
                nn.ReLU(),
            ]
            width = c
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveMaxPool2d(1)
        self.head = nn.Linear(width, 1)
        self.image_size = int(image_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Defect logits of shape ``(batch,)`` for images of shape ``(batch, 1, h, w)``."""
        if x.dim() != 4 or x.shape[1] != 1:
            raise ValueError(f"expected (batch, 1, h, w) images, got shape {tuple(x.shape)}")
        return self.head(self.pool(self.features(x)).flatten(1)).squeeze(-1)


def build_model(
    image_size: int = DEFAULT_IMAGE_SIZE, channels: Sequence[int] = (8, 16, 32)
) -> CellCNN:
    """The task's network (5,921 parameters with the default channels)."""
    return CellCNN(image_size, channels)
