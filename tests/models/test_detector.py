"""Detector: normalisation, BGR flip, training losses, detections in original pixels, errors."""

import pytest
import torch
from helpers_detection import synthetic_batch, tiny_config

from dyhead_cli.errors import DyheadError
from dyhead_cli.models.build import build_model


def detector(head: str = "atss", **cfg_changes):
    torch.manual_seed(0)
    cfg = tiny_config(head, 1, score_thresh=0.0)  # keep every candidate: an untrained model still detects
    for key, value in cfg_changes.items():
        setattr(cfg, key, value)
    return build_model(cfg)


def test_state_dict_is_four_named_parts_without_pixel_statistics():
    model = detector()
    prefixes = {key.split(".")[0] for key in model.state_dict()}
    assert prefixes == {"backbone", "fpn", "dyhead", "head"}
    assert "pixel_mean" not in model.state_dict() and model.pixel_mean.shape == (1, 3, 1, 1)


@pytest.mark.parametrize(
    "head, names", [("atss", {"loss_cls", "loss_box", "loss_centerness"}), ("retinanet", {"loss_cls", "loss_box"})]
)
def test_training_mode_returns_named_finite_losses(head, names):
    model = detector(head).train()
    images, targets = synthetic_batch(2)
    losses = model(images, [(128, 128)] * 2, targets)
    assert set(losses) == names
    assert all(v.dim() == 0 and torch.isfinite(v) and v.requires_grad for v in losses.values())


def test_training_mode_without_targets_is_a_clear_error():
    model = detector().train()
    with pytest.raises(DyheadError, match="needs targets"):
        model(torch.rand(1, 3, 64, 64) * 255, [(64, 64)])


def test_image_sizes_must_match_the_batch():
    model = detector().eval()
    with pytest.raises(DyheadError, match="2 images but 1 image_sizes"):
        model(torch.rand(2, 3, 64, 64) * 255, [(64, 64)])


def test_eval_boxes_are_clipped_to_image_size_and_rescaled_to_original_pixels():
    model = detector().eval()
    images, _ = synthetic_batch(2)
    sizes = [(96, 128), (128, 112)]  # real content inside the 128 x 128 padded batch
    originals = [(192, 384), (64, 56)]  # (h, w) before resizing: x2 / x3, and x0.5 / x0.5
    with torch.no_grad():
        plain = model(images, sizes)
        rescaled = model(images, sizes, original_sizes=originals)
    for det, (h, w) in zip(plain, sizes):
        assert len(det["boxes"]) == 100 and det["labels"].dtype == torch.int64
        assert det["boxes"][:, 2].max() <= w and det["boxes"][:, 3].max() <= h and det["boxes"].min() >= 0
        assert torch.all(det["scores"][:-1] >= det["scores"][1:])
    factors = [torch.tensor([3.0, 2.0, 3.0, 2.0]), torch.tensor([0.5, 0.5, 0.5, 0.5])]
    for det, out, factor in zip(plain, rescaled, factors):
        assert torch.allclose(out["boxes"], det["boxes"] * factor, atol=1e-4)
        assert torch.equal(out["scores"], det["scores"]) and torch.equal(out["labels"], det["labels"])


def test_bgr_input_format_flips_channels_before_normalising():
    rgb = detector(input_format="RGB").eval()
    bgr = detector(input_format="BGR").eval()
    bgr.load_state_dict(rgb.state_dict())
    images = torch.rand(1, 3, 64, 64) * 255
    mean, std = rgb.pixel_mean, rgb.pixel_std
    assert torch.allclose(bgr.normalize(images), (images.flip(1) - mean) / std)
    with torch.no_grad():
        flipped = bgr.features(images)
        reference = rgb.features(images.flip(1))
        unflipped = rgb.features(images)
    assert len(flipped) == 5 and [f.shape[1] for f in flipped] == [32] * 5
    assert all(torch.allclose(a, b, atol=1e-5) for a, b in zip(flipped, reference))
    assert not torch.allclose(flipped[0], unflipped[0], atol=1e-5)


def test_padding_is_zero_after_normalising_whatever_its_pixels():
    """Both references normalise, then pad with zeros: the backbone sees 0 outside each image's (h, w)."""
    model = detector().eval()
    images, _ = synthetic_batch(2)
    sizes = [(96, 128), (128, 112)]
    black, white = images.clone(), images.clone()
    for i, (h, w) in enumerate(sizes):
        black[i, :, h:], black[i, :, :, w:] = 0.0, 0.0
        white[i, :, h:], white[i, :, :, w:] = 255.0, 255.0
    seen = []
    hook = model.backbone.register_forward_pre_hook(lambda m, args: seen.append(args[0].clone()))
    with torch.no_grad():
        from_black, from_white = model(black, sizes), model(white, sizes)
        unmasked = model.features(black)  # no image_sizes: the pixel-space zeros become -mean/std
    hook.remove()
    normalized = model.normalize(black)
    for x in seen[:2]:
        assert x[0, :, 96:].abs().max() == 0 and x[1, :, :, 112:].abs().max() == 0
        assert torch.equal(x[0, :, :96], normalized[0, :, :96]) and torch.equal(x[1, :, :, :112], normalized[1, :, :, :112])
    assert (seen[2][0, :, 96:] != 0).all()
    for a, b in zip(from_black, from_white):
        assert torch.equal(a["boxes"], b["boxes"]) and torch.equal(a["scores"], b["scores"])
    with torch.no_grad():
        masked = model.features(black, sizes)
    assert not torch.allclose(masked[0], unmasked[0], atol=1e-4)


@pytest.mark.parametrize("mode", ["official", "mmdet"])
def test_postprocess_mode_reaches_the_head_and_boxes_stay_in_the_original_image(mode):
    model = detector(head_options=tiny_config("atss", 1, score_thresh=0.0, postprocess=mode).head_options).eval()
    assert model.head.post.mode == mode
    images, _ = synthetic_batch(1)
    with torch.no_grad():
        (det,) = model(images, [(96, 120)], original_sizes=[(48, 60)])
    assert len(det["boxes"]) == 100 and torch.all(det["scores"][:-1] >= det["scores"][1:])
    assert det["boxes"].min() >= 0 and det["boxes"][:, 2].max() <= 60 and det["boxes"][:, 3].max() <= 48
