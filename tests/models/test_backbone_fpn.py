import pytest
import torch

from dyhead_cli.errors import DyheadError
from dyhead_cli.models.backbone import TimmBackbone, check_model_name
from dyhead_cli.models.fpn import FPN

H, W = 192, 256  # non-square, divisible by 32


@pytest.mark.parametrize(
    "name, img_size",
    [
        ("resnet50", None),
        ("resnext50_32x4d", None),
        ("swin_tiny_patch4_window7_224", [H, W]),
        ("convnext_tiny", None),
    ],
)
def test_backbone_and_fpn_shapes(name, img_size):
    backbone = TimmBackbone(name, pretrained=False, img_size=img_size).eval()
    x = torch.randn(1, 3, H, W)
    with torch.no_grad():
        feats = backbone(x)
        assert [f.shape[1] for f in feats] == backbone.out_channels
        assert [tuple(f.shape[-2:]) for f in feats] == [(H // s, W // s) for s in (8, 16, 32)]
        levels = FPN(backbone.out_channels, 64)(feats)
    expected = [(H // 8, W // 8), (H // 16, W // 16), (H // 32, W // 32), (3, 4), (2, 2)]
    assert [tuple(p.shape) for p in levels] == [(1, 64, h, w) for h, w in expected]


def test_swin_without_img_size_takes_other_sizes():
    backbone = TimmBackbone("swin_tiny_patch4_window7_224").eval()
    with torch.no_grad():
        feats = backbone(torch.randn(1, 3, 128, 224))
    assert [tuple(f.shape[-2:]) for f in feats] == [(16, 28), (8, 14), (4, 7)]


def test_unknown_model_name_suggests_close_names():
    with pytest.raises(DyheadError, match=r"unknown timm model 'resnet5O'.*resnet50"):
        check_model_name("resnet5O")


def test_model_without_stride_32_is_refused():
    with pytest.raises(DyheadError, match="needs 8, 16 and 32"):
        TimmBackbone("test_vit")


def test_frozen_stages_freeze_stem_and_first_stage_only():
    backbone = TimmBackbone("resnet18", frozen_stages=2)
    frozen = {n.split(".")[1] for n, p in backbone.named_parameters() if not p.requires_grad}
    trainable = {n.split(".")[1] for n, p in backbone.named_parameters() if p.requires_grad}
    assert frozen == {"conv1", "bn1", "layer1"}
    assert trainable == {"layer2", "layer3", "layer4"}


def test_norm_eval_keeps_batchnorm_statistics():
    backbone = TimmBackbone("resnet18", norm_eval=True).train()
    before = backbone.body.bn1.running_mean.clone()
    backbone(torch.randn(2, 3, 64, 64))
    assert torch.equal(before, backbone.body.bn1.running_mean)
    assert not backbone.body.bn1.training


def test_frozen_norm_is_frozen_batchnorm_in_every_stage():
    """detectron2's FrozenBN (the official DyHead's backbone norm): statistics and affine weights fixed,
    convs still trained (frozen_stages = 0, the official FREEZE_AT = -1)."""
    backbone = TimmBackbone("resnet18", frozen_norm=True).train()
    bns = [m for m in backbone.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert len(bns) > 10 and all(not m.training and not m.weight.requires_grad and not m.bias.requires_grad for m in bns)
    assert backbone.body.conv1.weight.requires_grad and backbone.body.layer4[1].conv2.weight.requires_grad
    before = backbone.body.layer2[0].bn1.running_var.clone()
    backbone(torch.randn(2, 3, 64, 64)).__getitem__(0).sum().backward()
    assert torch.equal(before, backbone.body.layer2[0].bn1.running_var) and backbone.body.layer2[0].bn1.weight.grad is None
    assert backbone.body.conv1.weight.grad is not None


def test_pretrained_file_loads_local_weights(tmp_path):
    import timm
    from safetensors.torch import save_file

    src = timm.create_model("resnet18", pretrained=False)
    path = tmp_path / "r18.safetensors"
    save_file({k: v.contiguous() for k, v in src.state_dict().items()}, str(path))
    backbone = TimmBackbone("resnet18", pretrained_file=str(path))
    assert torch.equal(backbone.body.layer3[0].conv1.weight, src.layer3[0].conv1.weight)


def test_missing_pretrained_file_is_a_clear_error(tmp_path):
    with pytest.raises(DyheadError, match="pretrained_file not found"):
        TimmBackbone("resnet18", pretrained_file=str(tmp_path / "nope.safetensors"))


def test_fpn_p6_from_c5_for_retinanet():
    fpn = FPN([32, 64, 128], 64, extra_from="c5")
    assert fpn.fpn.extra_blocks.p6.in_channels == 128
    levels = fpn([torch.randn(1, 32, 16, 16), torch.randn(1, 64, 8, 8), torch.randn(1, 128, 4, 4)])
    assert [p.shape[-1] for p in levels] == [16, 8, 4, 2, 1]


def test_weights_files_that_do_not_fit_are_one_line_naming_the_file(tmp_path):
    """A file that is no weights file, weights of another width, and ``img_size`` for a CNN: each a
    DyheadError naming what is wrong (were internal errors, or a message cut before its reason)."""
    import timm
    from safetensors.torch import save_file

    garbage, text = tmp_path / "g.safetensors", tmp_path / "notes.pth"
    garbage.write_bytes(b"garbage")
    text.write_text("name = 'not weights'\n")
    for path in (garbage, text):
        with pytest.raises(DyheadError, match=rf"pretrained_file {path} is not a weights file timm can read \("):
            TimmBackbone("resnet18", pretrained_file=str(path))
    narrow = tmp_path / "mobilenetv2_050.safetensors"
    state = timm.create_model("mobilenetv2_050", pretrained=False).state_dict()
    save_file({k: v.contiguous() for k, v in state.items()}, str(narrow))
    with pytest.raises(
        DyheadError, match=rf"pretrained_file {narrow} does not fit timm model 'mobilenetv2_100': size mismatch for "
    ):
        TimmBackbone("mobilenetv2_100", pretrained_file=str(narrow))
    with pytest.raises(DyheadError, match=r"img_size applies to backbones built for one input size .* 'resnet18' takes any size"):
        TimmBackbone("resnet18", pretrained=False, img_size=[224, 224])
    with pytest.raises(DyheadError, match="pretrained_file is a folder"):
        TimmBackbone("resnet18", pretrained_file=str(tmp_path))


def test_a_single_img_size_is_a_square():
    backbone = TimmBackbone("swin_tiny_patch4_window7_224", pretrained=False, img_size=[96]).eval()
    with torch.no_grad():
        assert [f.shape[-1] for f in backbone(torch.randn(1, 3, 96, 96))] == [12, 6, 3]
