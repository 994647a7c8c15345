"""Any timm model as a detection backbone: its stride 8/16/32 features (C3, C4, C5), channels first.

Two-stage detectors (Faster R-CNN) also take the stride-4 map C2: ``out_strides=(4, 8, 16, 32)``.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import NoReturn

import timm
import torch
from torch import Tensor, nn

from dyhead_cli.errors import DyheadError, first_line, suggest

STRIDES = (8, 16, 32)


# timm names that say where the model comes from (config, and weights with pretrained = true)
SOURCE_PREFIXES = ("hf-hub:", "hf_hub:", "local-dir:")


def check_model_name(name: str) -> None:
    """A one-line error with close names when timm does not know ``name``; hub / folder names go to timm."""
    if name.startswith(SOURCE_PREFIXES):
        if not name.split(":", 1)[1]:
            raise DyheadError(f"backbone name '{name}' names no model after the prefix")
        return
    if not timm.is_model(name):
        raise DyheadError(f"unknown timm model '{name}'{suggest(name, timm.list_models(), n=3)}")


def create_features_model(name: str, pretrained: bool, pretrained_file: str, img_size: list[int]) -> nn.Module:
    check_model_name(name)
    kwargs: dict = {"features_only": True, "pretrained": pretrained or bool(pretrained_file)}
    if pretrained_file:
        if not Path(pretrained_file).is_file():
            what = "is a folder, not a weights file" if Path(pretrained_file).is_dir() else "not found"
            raise DyheadError(f"backbone.pretrained_file {what}: {pretrained_file}")
        kwargs["pretrained_cfg_overlay"] = {"file": str(pretrained_file)}
    if img_size:
        kwargs["img_size"] = tuple(img_size) if len(img_size) == 2 else int(img_size[0])  # [S]: S x S
    try:
        with WeightLoadReport() as report:
            body = create_sized(name, kwargs)
    except DyheadError:
        raise
    except RuntimeError as e:
        text = str(e)
        if "features_only" in text or "feature" in text:
            raise DyheadError(f"timm model '{name}' cannot be used with features_only: {first_line(e)}") from None
        if pretrained_file and "state_dict" in text:  # "Error(s) in loading state_dict for ...": one line per key
            reasons = [line.strip() for line in text.splitlines()[1:] if line.strip()]
            more = f" (and {len(reasons) - 1} more)" if len(reasons) > 1 else ""
            raise DyheadError(
                f"backbone.pretrained_file {pretrained_file} does not fit timm model '{name}': "
                f"{(reasons[0] if reasons else first_line(e))[:300]}{more}"
            ) from None
        if pretrained_file:  # torch.load's refusals (a pickle of other things than tensors)
            raise not_weights(pretrained_file, e) from None
        raise DyheadError(f"could not create timm model '{name}': {first_line(e)}") from None
    except OSError as e:  # no network / missing cache for pretrained=True
        if name.startswith(SOURCE_PREFIXES):
            raise DyheadError(f"could not fetch timm model '{name}': {first_line(e)}") from None
        raise DyheadError(f"could not load pretrained weights for '{name}': {first_line(e)}") from None
    except Exception as e:  # noqa: BLE001 - a file that is no weights file; the Hub client's own errors
        if pretrained_file:  # the safetensors / pickle readers' own errors (a truncated or foreign file)
            raise not_weights(pretrained_file, e) from None
        if not name.startswith(SOURCE_PREFIXES):
            raise
        raise DyheadError(f"could not fetch timm model '{name}': {type(e).__name__}: {first_line(e)}") from None
    if kwargs["pretrained"]:
        report.check(body, pretrained_file or name, name)
    return body


def create_sized(name: str, kwargs: dict) -> nn.Module:
    """``timm.create_model(name, **kwargs)``, with ``dynamic_img_size`` where the model takes it: transformers
    (Swin, ViT-style) then take any input size; CNNs reject the keyword, and ``img_size`` too."""
    try:
        return timm.create_model(name, dynamic_img_size=True, **kwargs)
    except TypeError as e:
        if "dynamic_img_size" not in str(e):
            raise_unsized(name, kwargs, e)
    try:
        return timm.create_model(name, **kwargs)
    except TypeError as e:
        raise_unsized(name, kwargs, e)


def raise_unsized(name: str, kwargs: dict, error: TypeError) -> NoReturn:
    if "img_size" in kwargs and "img_size" in str(error):
        raise DyheadError(
            f"model.backbone.img_size applies to backbones built for one input size (Swin, ViT-style): "
            f"timm model '{name}' takes any size; leave img_size out (= [])"
        ) from None
    raise DyheadError(f"could not create timm model '{name}': TypeError: {first_line(error)}") from None


def not_weights(path: str, error: BaseException) -> DyheadError:
    return DyheadError(
        f"backbone.pretrained_file {path} is not a weights file timm can read ({type(error).__name__}: {first_line(error)[:200]})"
    )


class WeightLoadReport(logging.Handler):
    """Catches timm's "Missing keys (...)" / "Unexpected keys (...)" report while a model loads weights.

    A ``features_only`` backbone has no classifier, so the classifier keys of ImageNet weights are
    expected to go unused: those are dropped quietly. Any other key missing from the file or left over
    in it means the file does not fit the model: ``check`` makes that an error instead of a warning.
    """

    LOGGER = "timm.models._builder"
    PATTERN = re.compile(r"^(Missing|Unexpected) keys \((.*)\) (discovered|found) while loading")

    def __init__(self) -> None:
        super().__init__(level=logging.DEBUG)
        self.missing: list[str] = []
        self.unexpected: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        match = self.PATTERN.match(record.getMessage())
        if match:
            keys = [k.strip() for k in match.group(2).split(",") if k.strip()]
            (self.missing if match.group(1) == "Missing" else self.unexpected).extend(keys)

    def __enter__(self) -> WeightLoadReport:
        self.logger = logging.getLogger(self.LOGGER)
        self.saved = (self.logger.level, self.logger.propagate)
        self.logger.addHandler(self)
        self.logger.setLevel(logging.INFO)
        self.logger.propagate = False  # our report replaces timm's warning
        return self

    def __exit__(self, *exc) -> None:
        self.logger.removeHandler(self)
        self.logger.setLevel(self.saved[0])
        self.logger.propagate = self.saved[1]

    def check(self, body: nn.Module, source: str, name: str = "") -> None:
        cfg = getattr(body, "pretrained_cfg", None) or {}
        heads = cfg.get("classifier") or ()
        heads = (heads,) if isinstance(heads, str) else tuple(heads)
        prefixes = tuple(f"{h}." for h in heads + ("fc", "head", "classifier", "last_linear", "head.fc"))
        beyond = beyond_features(body, name) if self.unexpected else set()

        def real(keys: list[str]) -> list[str]:
            return [k for k in keys if not k.startswith(prefixes) and not k.endswith("num_batches_tracked") and k not in beyond]

        missing, unexpected = real(self.missing), real(self.unexpected)
        if missing or unexpected:
            parts = []
            if missing:
                parts.append(f"{len(missing)} missing ({', '.join(missing[:4])}{', ...' if len(missing) > 4 else ''})")
            if unexpected:
                parts.append(
                    f"{len(unexpected)} unexpected ({', '.join(unexpected[:4])}{', ...' if len(unexpected) > 4 else ''})"
                )
            raise DyheadError(f"pretrained weights {source} do not fit the backbone: keys {' and '.join(parts)}")


def beyond_features(body: nn.Module, name: str) -> set[str]:
    """The keys of timm model ``name`` (whole, built on the meta device: no memory, no init cost) that its
    ``features_only`` version ``body`` does not have: what comes after the last feature stage (EfficientNet's
    and MobileNet's ``conv_head`` and ``bn2``, ConvNeXt's ``head.norm``), unused by a detector. timm's
    feature wrappers write ``layers_0`` for ``layers.0``, so names are compared with dots as underscores."""
    try:
        with torch.device("meta"):
            whole = timm.create_model(name)
    except Exception:  # noqa: BLE001 - a model timm builds only with options: no keys are forgiven
        return set()
    kept = {k.replace(".", "_") for k in body.state_dict()}
    return {k for k in whole.state_dict() if k.replace(".", "_") not in kept}


def move_stride_to_1x1(body: nn.Module, name: str) -> None:
    """MSRA/caffe-style ResNet: each stage's stride moves from the first bottleneck's 3x3 conv to its 1x1 conv1.

    Same parameters (padding unchanged: a 1x1 conv has none, the 3x3 keeps its 1), different features.
    """
    from timm.models.resnet import Bottleneck

    stages = [getattr(body, f"layer{i}", None) for i in range(1, 5)]
    stages = [s for s in stages if s is not None]
    if not stages or not all(isinstance(s[0], Bottleneck) for s in stages):
        raise DyheadError(
            f"backbone.stride_in_1x1 needs a bottleneck ResNet/ResNeXt (timm resnet50, resnext101_32x8d...), got '{name}'"
        )
    for stage in stages:
        block = stage[0]
        if not isinstance(getattr(block, "aa", None), (nn.Identity, type(None))):
            raise DyheadError(f"backbone.stride_in_1x1: '{name}' downsamples with anti-aliasing, not a strided conv")
        stride = block.conv2.stride
        if stride != (1, 1):
            block.conv1.stride, block.conv2.stride = stride, (1, 1)


class TimmBackbone(nn.Module):
    """Wraps ``timm.create_model(name, features_only=True)`` and returns [C3, C4, C5] in NCHW
    (one map per stride of ``out_strides``, finest first: [C2, C3, C4, C5] for (4, 8, 16, 32))."""

    def __init__(
        self,
        name: str,
        pretrained: bool = False,
        pretrained_file: str = "",
        img_size: list[int] | None = None,
        frozen_stages: int = 0,
        norm_eval: bool = False,
        frozen_norm: bool = False,
        stride_in_1x1: bool = False,
        out_norm: bool = False,
        out_strides: tuple[int, ...] = STRIDES,
    ) -> None:
        super().__init__()
        self.out_strides = tuple(out_strides)
        self.body = create_features_model(name, pretrained, pretrained_file, list(img_size or []))
        if stride_in_1x1:
            move_stride_to_1x1(self.body, name)
        info = self.body.feature_info
        reductions = info.reduction()
        missing = [s for s in self.out_strides if s not in reductions]
        if missing:
            *first, last = self.out_strides
            raise DyheadError(
                f"timm model '{name}' has feature strides {reductions}; a detector needs {', '.join(map(str, first))} and {last}"
            )
        self.indices = [reductions.index(s) for s in self.out_strides]
        self.out_channels = [info.channels()[i] for i in self.indices]
        self.channels_last_output = str(getattr(self.body, "output_fmt", "NCHW")).endswith("NHWC")
        # detection Swins' norm1..norm3 (keys backbone.out_norms.{0,1,2}), applied channels-last
        self.out_norms = nn.ModuleList(nn.LayerNorm(c) for c in self.out_channels) if out_norm else None
        self.norm_eval = norm_eval or frozen_norm
        self.freeze(frozen_stages)
        if frozen_norm:  # FrozenBN: statistics (norm_eval) and affine weights fixed in every stage
            for m in self.body.modules():
                if isinstance(m, nn.modules.batchnorm._BatchNorm):
                    for param in m.parameters():
                        param.requires_grad_(False)

    def freeze(self, frozen_stages: int) -> None:
        """Freeze the parameters up to and including the ``frozen_stages``-th feature stage (stem counts).

        For ResNets, 2 freezes the stem and ``layer1`` (detectron2's FREEZE_AT = 2).
        """
        if frozen_stages <= 0:
            return
        names = self.body.feature_info.module_name()
        stop = names[frozen_stages] if frozen_stages < len(names) else None
        prefixes = () if stop is None else (stop + ".", stop.replace(".", "_") + ".")
        for name, param in self.body.named_parameters():
            if prefixes and name.startswith(prefixes):
                break
            param.requires_grad_(False)

    def train(self, mode: bool = True) -> TimmBackbone:
        super().train(mode)
        if mode and self.norm_eval:
            for m in self.modules():
                if isinstance(m, nn.modules.batchnorm._BatchNorm):
                    m.eval()
        return self

    def forward(self, x: Tensor) -> list[Tensor]:
        feats = self.body(x)
        feats = [feats[i] for i in self.indices]
        if self.out_norms is not None:
            if self.channels_last_output:
                feats = [norm(f) for norm, f in zip(self.out_norms, feats)]
            else:
                feats = [norm(f.permute(0, 2, 3, 1)).permute(0, 3, 1, 2) for norm, f in zip(self.out_norms, feats)]
        if self.channels_last_output:
            feats = [f.permute(0, 3, 1, 2) for f in feats]  # (B, H, W, C) -> (B, C, H, W)
        return feats


def load_state_file(path: str | Path) -> dict[str, Tensor]:
    """Read weights without executing pickles: safetensors, or torch files with weights_only=True."""
    path = Path(path)
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    return torch.load(str(path), map_location="cpu", weights_only=True)
