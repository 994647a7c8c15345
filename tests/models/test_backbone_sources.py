"""Backbone names timm resolves itself (hf-hub:, local-dir:) and local ImageNet weight files."""

from __future__ import annotations

import json
import logging
from unittest import mock

import pytest
import timm
import timm.models._hub as timm_hub
import torch
from safetensors.torch import save_file

from dyhead_cli.errors import DyheadError
from dyhead_cli.models.backbone import TimmBackbone

pytestmark = pytest.mark.usefixtures("one_thread")


def test_hf_hub_names_go_to_timm_without_the_network(tmp_path):
    config = tmp_path / "config.json"
    config.write_text(
        json.dumps({"architecture": "test_resnet", "num_classes": 1000, "pretrained_cfg": {"input_size": [3, 160, 160]}})
    )
    asked = []

    def fake_download(model_id, filename, cache_dir=None, **kwargs):
        asked.append((model_id, filename))
        return str(config)

    with mock.patch.object(timm_hub, "download_from_hf", fake_download):
        backbone = TimmBackbone("hf-hub:timm/test_resnet.r160_in1k")
    assert asked and set(asked) == {("timm/test_resnet.r160_in1k", "config.json")}
    local = TimmBackbone("test_resnet")
    assert backbone.out_channels == local.out_channels
    with torch.no_grad():
        assert [f.shape for f in backbone(torch.zeros(1, 3, 64, 64))] == [f.shape for f in local(torch.zeros(1, 3, 64, 64))]

    def offline(model_id, filename, cache_dir=None, **kwargs):
        raise ConnectionError("no network here")

    with (
        mock.patch.object(timm_hub, "download_from_hf", offline),
        pytest.raises(DyheadError, match="could not fetch timm model 'hf-hub:timm/x'"),
    ):
        TimmBackbone("hf-hub:timm/x")
    with pytest.raises(DyheadError, match="unknown timm model 'resnet5O'.*did you mean"):
        TimmBackbone("resnet5O")  # plain names keep the suggestion


def test_pretrained_file_drops_classifier_keys_quietly_and_refuses_files_that_do_not_fit(tmp_path, caplog):
    state = {k: v.contiguous() for k, v in timm.create_model("test_resnet").state_dict().items()}
    assert "fc.weight" in state
    save_file(state, tmp_path / "imagenet.safetensors")
    save_file(
        {**state, "head.fc.weight": torch.zeros(5, 3), "classifier.bias": torch.zeros(5)}, tmp_path / "other_head.safetensors"
    )
    save_file({**state, "extra.weight": torch.zeros(2)}, tmp_path / "extra.safetensors")
    save_file({k: v for k, v in state.items() if not k.startswith("layer4.")}, tmp_path / "partial.safetensors")

    for name in ("imagenet", "other_head"):
        with caplog.at_level(logging.INFO):
            caplog.clear()
            backbone = TimmBackbone("test_resnet", pretrained_file=str(tmp_path / f"{name}.safetensors"))
        assert not [r for r in caplog.records if "keys" in r.getMessage()], name  # no "Unexpected keys" warning
        assert torch.equal(backbone.body.layer4[0].conv1.weight, state["layer4.0.conv1.weight"])
    with pytest.raises(DyheadError, match=r"do not fit the backbone: keys 1 unexpected \(extra.weight\)"):
        TimmBackbone("test_resnet", pretrained_file=str(tmp_path / "extra.safetensors"))
    with pytest.raises(DyheadError, match=r"keys \d+ missing \(layer4\."):
        TimmBackbone("test_resnet", pretrained_file=str(tmp_path / "partial.safetensors"))
    assert logging.getLogger("timm.models._builder").propagate  # timm's logger is left as it was


@pytest.mark.parametrize(
    ("name", "file"),
    [
        ("mobilenetv2_100", "mobilenetv2_100.tv_in1k.safetensors"),
        ("tf_efficientnet_lite0", "tf_efficientnet_lite0.in1k_tfport.safetensors"),
    ],
)
def test_shared_imagenet_files_load_into_their_features_backbone(name, file, tmp_path):
    """The ImageNet files in ../shared/weights (whole timm models): a features_only EfficientNet/MobileNet
    also drops conv_head and bn2 after its last stage; those keys were refused as "unexpected"."""
    from helpers_fixtures import SHARED
    from safetensors.torch import load_file

    path = SHARED / "weights" / file
    if not path.is_file():
        pytest.skip(f"{path} is not available (../shared is absent)")
    backbone = TimmBackbone(name, pretrained_file=str(path))
    state = load_file(str(path))
    assert {k for k in state if k.startswith(("conv_head.", "bn2."))}  # the keys the fix forgives are there
    loaded = backbone.body.state_dict()
    assert all(torch.equal(v, state[k]) for k, v in loaded.items() if not k.endswith("num_batches_tracked"))
    save_file({**state, "extra.weight": torch.zeros(2)}, tmp_path / "extra.safetensors")
    with pytest.raises(DyheadError, match=r"unexpected \(extra.weight\)"):  # still refused: a key of no model
        TimmBackbone(name, pretrained_file=str(tmp_path / "extra.safetensors"))
