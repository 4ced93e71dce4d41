"""Face-recognition backbones: IResNet (r18 … r200), MobileFaceNet and tiny variants for CPU demos.

Every backbone maps RGB images normalised as ``(x / 255 - 0.5) / 0.5`` (``float[B, 3, H, W]``) to an
*unnormalised* embedding ``float[B, embedding_size]``; the classification layer and
:meth:`FaceRecognitionModule.embed` normalise it.

The IResNet follows InsightFace's ``arcface_torch`` (docs/models.md) layer for layer, so parameter counts
are identical: r18 24.03M, r34 34.14M, r50 43.59M, r100 65.16M, r200 118.83M at 112×112 input and embedding
512. Those counts include the frozen weight of the final ``BatchNorm1d`` (512 parameters that never train),
as ``sum(p.numel() for p in model.parameters())`` does.

Example::

    from fastface_pl.models import build_backbone
    r100 = build_backbone("r100")                              # the paper's backbone
    tiny = build_backbone("tiny", embedding_size=64, input_size=32)  # trains in seconds on a CPU
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from fastface_pl.errors import ConfigurationError
from fastface_pl.argument_checks import check_int

__all__ = ["IResNet", "MobileFaceNet", "build_backbone", "BACKBONES", "count_parameters"]

IRESNET_DEPTHS: dict[str, tuple[int, int, int, int]] = {
    "r18": (2, 2, 2, 2),
    "r34": (3, 4, 6, 3),
    "r50": (3, 4, 14, 3),
    "r100": (3, 13, 30, 3),
    "r200": (6, 26, 60, 6),
}
IRESNET_WIDTHS: tuple[int, int, int, int] = (64, 128, 256, 512)
BN_EPS = 1e-5


def count_parameters(model: nn.Module, trainable_only: bool = False) -> int:
    """Number of parameters of ``model`` (all of them, or only those with ``requires_grad``)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)


def _check_input_size(input_size: int) -> int:
    if not isinstance(input_size, int) or isinstance(input_size, bool) or input_size < 16 or input_size % 16:
        raise ConfigurationError(
            f"input_size must be a positive multiple of 16 (the backbones downsample 16 times), got {input_size!r}; "
            "use 112 for InsightFace crops or 32 for quick CPU demos"
        )
    return input_size


class IBasicBlock(nn.Module):
    """IResNet residual block: BN → conv3×3 → BN → PReLU → conv3×3 (stride) → BN, plus the shortcut.

    There is no activation after the addition (the "improved" residual unit of ArcFace).
    """

    def __init__(self, in_channels: int, channels: int, stride: int = 1) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_channels, eps=BN_EPS)
        self.conv1 = nn.Conv2d(in_channels, channels, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(channels, eps=BN_EPS)
        self.prelu = nn.PReLU(channels)
        self.conv2 = nn.Conv2d(channels, channels, 3, stride=stride, padding=1, bias=False)
        self.bn3 = nn.BatchNorm2d(channels, eps=BN_EPS)
        self.downsample: nn.Module | None = None
        if stride != 1 or in_channels != channels:
            self.downsample = nn.Sequential(
                nn.Conv2d(in_channels, channels, 1, stride=stride, bias=False),
                nn.BatchNorm2d(channels, eps=BN_EPS),
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.bn3(self.conv2(self.prelu(self.bn2(self.conv1(self.bn1(x))))))
        return out + identity


class IResNet(nn.Module):
    """The IResNet of ArcFace / InsightFace ``arcface_torch`` (docs/models.md).

    Stem conv3×3 (3→w₀, no bias) → BN → PReLU; four stages whose first block has stride 2 and a
    1×1 stride-2 conv + BN shortcut (H → H/16); head BN2d → flatten → dropout → Linear → BatchNorm1d whose
    weight is fixed at 1 (``requires_grad=False``; only its bias trains).

    Args:
        depths: blocks per stage, e.g. ``(3, 13, 30, 3)`` for r100.
        embedding_size: output dimension (512 in the paper).
        input_size: height = width of the input, a multiple of 16; the head Linear has
            ``widths[3] · (input_size / 16)²`` inputs (25,088 at 112).
        widths: channels of the four stages, ``(64, 128, 256, 512)`` by default.
        width_multiplier: scales ``widths`` (rounded, at least 1 channel): 0.25 gives (16, 32, 64, 128).
        dropout: dropout probability before the Linear (0 in the paper's runs).
        zero_init_residual: start every block's last BN at weight 0 (arcface_torch's option; off by default).
    """

    def __init__(
        self,
        depths: Sequence[int],
        embedding_size: int = 512,
        input_size: int = 112,
        widths: Sequence[int] = IRESNET_WIDTHS,
        width_multiplier: float = 1.0,
        dropout: float = 0.0,
        zero_init_residual: bool = False,
    ) -> None:
        super().__init__()
        if len(depths) != 4 or any(not isinstance(d, int) or d < 1 for d in depths):
            raise ConfigurationError(f"depths must be four positive integers (blocks per stage), got {tuple(depths)!r}")
        if len(widths) != 4 or any(not isinstance(w, int) or w < 1 for w in widths):
            raise ConfigurationError(f"widths must be four positive integers (channels per stage), got {tuple(widths)!r}")
        if not width_multiplier > 0:
            raise ConfigurationError(f"width_multiplier must be > 0, got {width_multiplier!r}")
        if not 0.0 <= dropout < 1.0:
            raise ConfigurationError(f"dropout must be in [0, 1), got {dropout!r}")
        check_int("embedding_size", embedding_size, 1)
        self.input_size = _check_input_size(input_size)
        self.embedding_size = embedding_size
        self.depths = tuple(depths)
        self.widths = tuple(max(1, round(w * width_multiplier)) for w in widths)

        w = self.widths
        self.conv1 = nn.Conv2d(3, w[0], 3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(w[0], eps=BN_EPS)
        self.prelu = nn.PReLU(w[0])
        in_channels = w[0]
        stages = []
        for channels, depth in zip(w, self.depths):
            blocks = [IBasicBlock(in_channels, channels, stride=2)]
            blocks += [IBasicBlock(channels, channels, stride=1) for _ in range(depth - 1)]
            stages.append(nn.Sequential(*blocks))
            in_channels = channels
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.bn2 = nn.BatchNorm2d(w[3], eps=BN_EPS)
        self.dropout = nn.Dropout(p=dropout, inplace=True)
        feature_map = input_size // 16
        self.fc = nn.Linear(w[3] * feature_map * feature_map, embedding_size)
        self.features = nn.BatchNorm1d(embedding_size, eps=BN_EPS)
        self._reset_parameters(zero_init_residual)

    def _reset_parameters(self, zero_init_residual: bool) -> None:
        # arcface_torch's initialisation: conv weights N(0, 0.1), BN weight 1 / bias 0.
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.normal_(module.weight, 0.0, 0.1)
            elif isinstance(module, (nn.BatchNorm2d, nn.BatchNorm1d)):
                nn.init.constant_(module.weight, 1.0)
                nn.init.constant_(module.bias, 0.0)
        if zero_init_residual:
            for module in self.modules():
                if isinstance(module, IBasicBlock):
                    nn.init.constant_(module.bn3.weight, 0.0)
        nn.init.constant_(self.features.weight, 1.0)
        self.features.weight.requires_grad = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 4 or x.shape[1] != 3 or x.shape[-1] != self.input_size or x.shape[-2] != self.input_size:
            raise ConfigurationError(
                f"expected images of shape [B, 3, {self.input_size}, {self.input_size}], got {list(x.shape)}; "
                f"resize the images or build the backbone with input_size={x.shape[-1] if x.dim() == 4 else '...'}"
            )
        x = self.prelu(self.bn1(self.conv1(x)))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        x = self.bn2(x)
        x = torch.flatten(x, 1)
        x = self.dropout(x)
        # As arcface_torch: the head Linear (25,088 → 512) and BatchNorm1d run in fp32 under mixed precision.
        with torch.autocast(device_type=x.device.type, enabled=False):
            return self.features(self.fc(x.float()))


class _ConvBlock(nn.Module):
    """Conv (no bias) → BN → PReLU, or Conv → BN with ``activation=False`` (arcface_torch's ``LinearBlock``)."""

    def __init__(self, in_c: int, out_c: int, kernel: int = 1, stride: int = 1, padding: int = 0,
                 groups: int = 1, activation: bool = True) -> None:
        super().__init__()
        layers: list[nn.Module] = [
            nn.Conv2d(in_c, out_c, kernel, stride=stride, padding=padding, groups=groups, bias=False),
            nn.BatchNorm2d(out_c, eps=BN_EPS),
        ]
        if activation:
            layers.append(nn.PReLU(out_c))
        self.layers = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


class _DepthWise(nn.Module):
    """MobileFaceNet bottleneck: 1×1 expand → 3×3 depthwise (stride) → 1×1 linear projection."""

    def __init__(self, in_c: int, out_c: int, hidden: int, stride: int, residual: bool) -> None:
        super().__init__()
        self.residual = residual
        self.layers = nn.Sequential(
            _ConvBlock(in_c, hidden, 1),
            _ConvBlock(hidden, hidden, 3, stride=stride, padding=1, groups=hidden),
            _ConvBlock(hidden, out_c, 1, activation=False),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.layers(x)
        return x + out if self.residual else out


class _Residual(nn.Module):
    """``num_blocks`` residual bottlenecks of ``channels`` channels (arcface_torch's ``Residual``)."""

    def __init__(self, channels: int, num_blocks: int, hidden: int) -> None:
        super().__init__()
        self.layers = nn.Sequential(*(_DepthWise(channels, channels, hidden, 1, True) for _ in range(num_blocks)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


class _GlobalDepthwiseHead(nn.Module):
    """Global depthwise conv (kernel = feature map) + BN → flatten → Linear (no bias) → BatchNorm1d (``GDC``)."""

    def __init__(self, kernel: int, embedding_size: int) -> None:
        super().__init__()
        self.layers = nn.Sequential(
            _ConvBlock(512, 512, kernel, groups=512, activation=False),
            nn.Flatten(),
            nn.Linear(512, embedding_size, bias=False),
            nn.BatchNorm1d(embedding_size, eps=BN_EPS),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


class MobileFaceNet(nn.Module):
    """MobileFaceNet as in ``arcface_torch`` ("mbf"): depthwise bottlenecks and a global depthwise head.

    Stem conv3×3 stride 2 → depthwise 3×3 → three stride-2 bottleneck stages with residual blocks
    (``blocks`` per stage) → 1×1 conv to 512 (``conv_sep``) → global depthwise conv (kernel =
    input_size / 16) → Linear (no bias) → BatchNorm1d. With ``scale=2`` and ``blocks=(1, 4, 6, 2)`` (the
    default, as in arcface_torch) it costs 0.44 G multiply-adds at 112×112 (the "0.45 GFLOPs" usually
    quoted) and has 2.06M parameters.

    Its ``state_dict`` keys and shapes are those of arcface_torch's ``get_mbf(fp16, num_features=512)``
    (``layers.0 … layers.7``, ``conv_sep``, ``features``; 333 entries), so a published ``backbone.pth``
    loads with ``load_state_dict(strict=True)`` and gives the same embeddings. As there, ``conv_sep`` and the
    head run in fp32 under mixed precision.

    Args:
        embedding_size: output dimension.
        input_size: a multiple of 16.
        blocks: residual blocks in the four stages (the first stage uses 1 plain depthwise conv when 1).
        scale: channel multiplier of the bottlenecks (64·scale, 128·scale channels).
    """

    def __init__(self, embedding_size: int = 512, input_size: int = 112, blocks: Sequence[int] = (1, 4, 6, 2),
                 scale: int = 2) -> None:
        super().__init__()
        check_int("embedding_size", embedding_size, 1)
        check_int("scale", scale, 1)
        if len(blocks) != 4 or any(not isinstance(b, int) or b < 1 for b in blocks):
            raise ConfigurationError(f"blocks must be four positive integers, got {tuple(blocks)!r}")
        self.input_size = _check_input_size(input_size)
        self.embedding_size = embedding_size
        c1, c2 = 64 * scale, 128 * scale
        self.layers = nn.Sequential(
            _ConvBlock(3, c1, 3, stride=2, padding=1),
            _ConvBlock(c1, c1, 3, padding=1, groups=64) if blocks[0] == 1 else _Residual(c1, blocks[0], 128),
            _DepthWise(c1, c1, 128, stride=2, residual=False),
            _Residual(c1, blocks[1], 128),
            _DepthWise(c1, c2, 256, stride=2, residual=False),
            _Residual(c2, blocks[2], 256),
            _DepthWise(c2, c2, 512, stride=2, residual=False),
            _Residual(c2, blocks[3], 256),
        )
        self.conv_sep = _ConvBlock(c2, 512, 1)
        self.features = _GlobalDepthwiseHead(input_size // 16, embedding_size)
        for module in self.modules():  # arcface_torch's initialisation
            if isinstance(module, (nn.Conv2d, nn.Linear)):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 4 or x.shape[1] != 3 or x.shape[-1] != self.input_size or x.shape[-2] != self.input_size:
            raise ConfigurationError(
                f"expected images of shape [B, 3, {self.input_size}, {self.input_size}], got {list(x.shape)}; "
                "resize the images or build the backbone with a matching input_size"
            )
        x = self.layers(x)
        # As arcface_torch: conv_sep, the global depthwise head, Linear and BatchNorm1d run in fp32.
        with torch.autocast(device_type=x.device.type, enabled=False):
            return self.features(self.conv_sep(x.float()))


def _iresnet(depths: tuple[int, int, int, int], **defaults: Any):
    def build(embedding_size: int = 512, **kwargs: Any) -> IResNet:
        return IResNet(depths=kwargs.pop("depths", depths), embedding_size=embedding_size, **{**defaults, **kwargs})

    return build


BACKBONES = {
    **{name: _iresnet(depths) for name, depths in IRESNET_DEPTHS.items()},
    "mbf": lambda embedding_size=512, **kw: MobileFaceNet(embedding_size=embedding_size, **kw),
    # Tiny IResNets for tests and CPU demos (use input_size=32): widths (8, 16, 32, 64), one block per stage;
    # r18_tiny is r18 at a quarter of the width (16, 32, 64, 128).
    "tiny": _iresnet((1, 1, 1, 1), widths=(8, 16, 32, 64)),
    "r18_tiny": _iresnet(IRESNET_DEPTHS["r18"], widths=(16, 32, 64, 128)),
}


def build_backbone(name: str, embedding_size: int = 512, **kwargs: Any) -> nn.Module:
    """Builds a backbone by name.

    Args:
        name: one of ``r18 r34 r50 r100 r200`` (IResNet), ``mbf`` (MobileFaceNet), ``tiny``, ``r18_tiny``.
        embedding_size: output dimension.
        **kwargs: passed to :class:`IResNet` (``input_size``, ``widths``, ``width_multiplier``, ``depths``,
            ``dropout``, ``zero_init_residual``) or :class:`MobileFaceNet` (``input_size``, ``blocks``, ``scale``).

    Raises:
        ValueError: for an unknown name (the message lists the valid ones) or an invalid argument.

    Any ``nn.Module`` mapping ``float[B, 3, H, W]`` to ``float[B, embedding_size]`` can be passed to
    :class:`~fastface_pl.models.module.FaceRecognitionModule` instead of a name.
    """
    if name not in BACKBONES:
        raise ConfigurationError(f"unknown backbone {name!r}; valid names: {', '.join(BACKBONES)}")
    try:
        return BACKBONES[name](embedding_size=embedding_size, **kwargs)
    except TypeError as error:  # unexpected keyword: say which backbone accepts what
        raise ConfigurationError(f"invalid arguments for backbone {name!r}: {error}") from error
