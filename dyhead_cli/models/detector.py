"""The whole detector: normalise -> backbone -> FPN -> DyHead tower -> head (losses or detections).

Images come in as a padded batch of 0..255 RGB floats, whatever the backbone wants; the detector
normalises (and flips to BGR for caffe-style backbones) itself, so data code never has to know. Then it
zeroes the padding, as both reference implementations do (normalise, then pad with zeros): padded with
zeros in pixel space, the padding would be -mean/std and reach every output through DyHead's global pooling.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from dyhead_cli.errors import DyheadError, check_choice

INPUT_FORMATS = ("RGB", "BGR")  # the recipe key model.input_format is checked against this


class Detector(nn.Module):
    """``backbone``, ``fpn``, ``dyhead``, ``head`` (these names are the state-dict prefixes)."""

    def __init__(
        self,
        backbone: nn.Module,
        fpn: nn.Module,
        dyhead: nn.Module,
        head: nn.Module,
        pixel_mean: list[float],
        pixel_std: list[float],
        input_format: str = "RGB",
    ) -> None:
        super().__init__()
        check_choice("input_format", input_format, INPUT_FORMATS)
        self.backbone = backbone
        self.fpn = fpn
        self.dyhead = dyhead
        self.head = head
        self.input_format = input_format
        # mean/std are in the backbone's channel order (BGR for caffe models), as in detectron2.
        self.register_buffer("pixel_mean", torch.tensor(pixel_mean).float().view(1, 3, 1, 1), persistent=False)
        self.register_buffer("pixel_std", torch.tensor(pixel_std).float().view(1, 3, 1, 1), persistent=False)

    def keep_only(self, labels: list[int] | None) -> None:
        """Detect only these labels, 0..K-1 (None: all), as the head's post-processing candidates: the
        wanted classes fill ``detections_per_img`` instead of what other classes leave of it."""
        self.head.keep_only(labels)

    def normalize(self, images: Tensor) -> Tensor:
        """(B, 3, H, W) 0..255 RGB -> the backbone's input: channel order flipped for BGR, minus mean, over std."""
        if images.dim() != 4 or images.shape[1] != 3:
            raise DyheadError(f"images must be a (B, 3, H, W) batch, got shape {tuple(images.shape)}")
        if self.input_format == "BGR":
            images = images.flip(1)
        return (images - self.pixel_mean) / self.pixel_std

    def features(self, images: Tensor, image_sizes: list[tuple[int, int]] | None = None) -> list[Tensor]:
        """The DyHead tower's outputs, P3..P7 (B, C, H/s, W/s): what the head sees.

        image_sizes: the (h, w) of each image inside the padded batch; everything outside is zeroed after
        normalising. None: every image fills the batch (nothing is padding).
        """
        x = self.normalize(images)
        if image_sizes is not None:
            x = zero_padding(x, image_sizes)
        return self.dyhead(self.fpn(self.backbone(x)))

    def forward(
        self,
        images: Tensor,
        image_sizes: list[tuple[int, int]],
        targets: list[dict[str, Tensor]] | None = None,
        original_sizes: list[tuple[int, int]] | None = None,
    ) -> dict[str, Tensor] | list[dict[str, Tensor]]:
        """Training: named losses (``targets`` required). Eval: per image {"boxes", "scores", "labels"}.

        image_sizes: the (h, w) of each image inside the padded batch. original_sizes: the (h, w) the
        images had before resizing; when given, eval boxes are rescaled to those pixels.
        """
        if len(image_sizes) != images.shape[0]:
            raise DyheadError(f"got {images.shape[0]} images but {len(image_sizes)} image_sizes")
        if self.training and targets is None:
            raise DyheadError("the detector is in training mode and needs targets (boxes, labels); call .eval() first")
        if targets is not None and len(targets) != images.shape[0]:
            raise DyheadError(f"got {images.shape[0]} images but {len(targets)} targets")
        outputs = self.head(self.features(images, image_sizes))
        if self.training:
            return self.head.loss(outputs, targets, image_sizes)
        detections = self.head.postprocess(outputs, image_sizes)
        if original_sizes is not None:
            detections = [rescale_boxes(d, s, o) for d, s, o in zip(detections, image_sizes, original_sizes)]
        return detections


def zero_padding(x: Tensor, image_sizes: list[tuple[int, int]]) -> Tensor:
    """(B, C, H, W) with every pixel outside image i's top-left (h, w) set to 0 (in place; returns ``x``)."""
    for i, (h, w) in enumerate(image_sizes):
        x[i, :, h:, :] = 0
        x[i, :, :h, w:] = 0
    return x


def rescale_boxes(detection: dict[str, Tensor], size: tuple[int, int], original: tuple[int, int]) -> dict[str, Tensor]:
    """Boxes from the resized image (h, w) to the original image's pixels, clipped to it.

    The head's boxes are already inside the resized image (clipped after NMS in the "official"
    post-processing, while decoding in "mmdet"): scaling maps that onto the original image, and the clip
    here only catches rounding.
    """
    (h, w), (oh, ow) = size, original
    boxes = detection["boxes"] * detection["boxes"].new_tensor([ow / w, oh / h, ow / w, oh / h])
    boxes[:, 0::2] = boxes[:, 0::2].clamp(0, ow)
    boxes[:, 1::2] = boxes[:, 1::2].clamp(0, oh)
    return {**detection, "boxes": boxes}
