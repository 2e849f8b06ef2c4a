"""TRACER TE-5 salient-object network (EfficientNet-B5 backbone, 512 px), re-implemented.

Written from a description of the authors' model (Lee, Shin & Han, "TRACER: Extreme Attention
Guided Salient Object Tracing Network", AAAI 2022), not copied from their code. Submodule names
are chosen so that ``TracerTE5().state_dict()`` has exactly the keys of the authors' bare
``TRACER`` module, so their released checkpoint loads strictly (after dropping the ``module.``
prefix that ``nn.DataParallel`` added when it was saved).

``forward`` returns ``(saliency, edge, (ds0, ds1, ds2))``, every map already passed through a
sigmoid and at the input resolution; ``saliency`` is the map to use.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

#: EfficientNet-B5's native resolution. The authors' backbone freezes its "same" padding for this
#: size at construction time, whatever the actual input size is.
NATIVE_SIZE = 456
#: B5 stages after width (1.6) / depth (2.2) scaling: (repeats, kernel, stride, expand, c_in, c_out)
B5_STAGES = ((3, 3, 1, 1, 48, 24), (5, 3, 2, 6, 24, 40), (5, 5, 2, 6, 40, 64), (7, 3, 2, 6, 64, 128),
             (7, 5, 1, 6, 128, 176), (9, 5, 2, 6, 176, 304), (3, 3, 1, 6, 304, 512))
#: blocks whose outputs feed the decoder (strides 4, 8, 16, 32; channels 40, 64, 176, 512)
TAP_BLOCKS = (7, 12, 26, 38)
EDGE_BLOCK = 7


def _backbone_bn(c: int) -> nn.BatchNorm2d:
    """Backbone BNs use TF's eps/momentum (1e-3 / 0.01), not PyTorch's defaults."""
    return nn.BatchNorm2d(c, eps=1e-3, momentum=0.01)


def same_padding(size: int, kernel: int, stride: int) -> tuple[int, int]:
    """TF "same" padding (before, after) for one axis of length ``size``."""
    total = max((math.ceil(size / stride) - 1) * stride + kernel - size, 0)
    return total // 2, total - total // 2


class StaticSameConv2d(nn.Conv2d):
    """Conv2d with TF "same" padding computed once for a fixed feature size ``size``.

    Why not from the real input: the checkpoint was trained with padding derived from the 456-px
    native size propagated through the strides (456, 228, 114, 57, 29, 15). At 512 px this differs
    from true "same" padding in the stride-2 depthwise convs of blocks 13 and 27 (symmetric instead
    of bottom/right-heavy), and reproducing the trained network needs the 456-based choice.
    """

    def __init__(self, c_in: int, c_out: int, kernel: int, stride: int = 1, groups: int = 1,
                 size: int = NATIVE_SIZE) -> None:
        lo, hi = same_padding(size, kernel, stride)
        super().__init__(c_in, c_out, kernel, stride, padding=lo if lo == hi else 0, groups=groups, bias=False)
        self.extra_pad = None if lo == hi else (lo, hi, lo, hi)  # asymmetric: pad explicitly

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x if self.extra_pad is None else F.pad(x, self.extra_pad))


class MBConv(nn.Module):
    """EfficientNet inverted-residual block: expand, depthwise, squeeze-excite, project (+ skip)."""

    def __init__(self, c_in: int, c_out: int, kernel: int, stride: int, expand: int, size: int) -> None:
        super().__init__()
        mid = c_in * expand
        if expand != 1:
            self._expand_conv = nn.Conv2d(c_in, mid, 1, bias=False)
            self._bn0 = _backbone_bn(mid)
        self._depthwise_conv = StaticSameConv2d(mid, mid, kernel, stride, groups=mid, size=size)
        self._bn1 = _backbone_bn(mid)
        n_se = max(1, int(c_in * 0.25))  # SE width follows the block *input*, not the expanded width
        self._se_reduce = nn.Conv2d(mid, n_se, 1)
        self._se_expand = nn.Conv2d(n_se, mid, 1)
        self._project_conv = nn.Conv2d(mid, c_out, 1, bias=False)
        self._bn2 = _backbone_bn(c_out)
        self.residual = stride == 1 and c_in == c_out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.silu(self._bn0(self._expand_conv(x))) if hasattr(self, "_expand_conv") else x
        h = F.silu(self._bn1(self._depthwise_conv(h)))
        s = self._se_expand(F.silu(self._se_reduce(F.adaptive_avg_pool2d(h, 1))))
        h = self._bn2(self._project_conv(torch.sigmoid(s) * h))
        return h + x if self.residual else h  # drop-connect is identity at inference


# ----------------------------------------------------------------------------- decoder parts
class BasicConv2d(nn.Module):
    """Conv (no bias) + BN + SELU; TRACER uses SELU where most decoders use ReLU."""

    def __init__(self, c_in: int, c_out: int, kernel: int | tuple[int, int] = 1,
                 padding: int | tuple[int, int] = 0, dilation: int = 1) -> None:
        super().__init__()
        self.conv = nn.Conv2d(c_in, c_out, kernel, padding=padding, dilation=dilation, bias=False)
        self.bn = nn.BatchNorm2d(c_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.selu(self.bn(self.conv(x)))


class DWConv(nn.Module):
    """Depthwise conv + BN + SELU (channel count unchanged)."""

    def __init__(self, c: int, kernel: int, padding: int, dilation: int = 1) -> None:
        super().__init__()
        self.DWConv = nn.Conv2d(c, c, kernel, padding=padding, dilation=dilation, groups=c, bias=False)
        self.bn = nn.BatchNorm2d(c)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.selu(self.bn(self.DWConv(x)))


class DWSConv(nn.Module):
    """Depthwise-separable conv: dw 3x3 + BN + SELU, then pointwise ``c_in -> c_out`` + BN + SELU."""

    def __init__(self, c_in: int, c_out: int) -> None:
        super().__init__()
        self.DWConv = nn.Conv2d(c_in, c_in, 3, padding=1, groups=c_in, bias=False)
        self.bn = nn.BatchNorm2d(c_in)
        self.PWConv = nn.Conv2d(c_in, c_out, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.selu(self.bn2(self.PWConv(F.selu(self.bn(self.DWConv(x))))))


class _DilatedBranches(nn.Module):
    """Shared tail of the edge and object-attention modules: DWSConv, then four depthwise branches
    with growing dilation (1x1, 3x3 d1, d3, d5) reduced to c/4 each, concatenated, plus a skip."""

    def _build_branches(self, c_in: int, c: int) -> None:
        self.DWSConv = DWSConv(c_in, c)
        for i, (k, d) in enumerate(((1, 1), (3, 1), (3, 3), (3, 5)), start=1):
            setattr(self, f"DWConv{i}", nn.Sequential(DWConv(c, k, padding=d * (k // 2), dilation=d),
                                                      BasicConv2d(c, c // 4, 1)))

    def _branches(self, x: torch.Tensor) -> torch.Tensor:
        x = self.DWSConv(x)
        return torch.cat([self.DWConv1(x), self.DWConv2(x), self.DWConv3(x), self.DWConv4(x)], 1) + x


class UnionAttentionModule(nn.Module):
    """UAM: channel attention (self-attention over globally pooled channels), then spatial
    attention on the channel-gated features with the least-confident channels (the ``gamma``
    quantile of the channel attention) switched off."""

    def __init__(self, c: int, gamma: float = 0.1, only_channel: bool = False) -> None:
        super().__init__()
        self.gamma = gamma
        self.bn = nn.BatchNorm2d(c)
        self.norm = nn.Sequential(nn.BatchNorm2d(c), nn.Dropout(gamma))  # dropout: identity at eval
        self.channel_q, self.channel_k, self.channel_v, self.fc = (nn.Conv2d(c, c, 1, bias=False) for _ in range(4))
        if not only_channel:
            self.spatial_q, self.spatial_k, self.spatial_v = (nn.Conv2d(c, 1, 1, bias=False) for _ in range(3))

    def channel_tracer(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Return ``(x * att + x, att)`` with ``att`` of shape ``(B, C, 1, 1)``."""
        p = self.norm(F.adaptive_avg_pool2d(x, 1))
        q, k, v = (conv(p).flatten(1).unsqueeze(-1) for conv in (self.channel_q, self.channel_k, self.channel_v))
        alpha = torch.softmax(q @ k.transpose(1, 2), dim=-1)  # (B, C, C)
        att = torch.sigmoid(self.fc((alpha @ v).unsqueeze(-1)))
        return x * att + x, att

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x_c, att = self.channel_tracer(x)
        att = att.flatten(1)
        # scale by the attention values themselves (not a 0/1 mask), zeroing those <= the quantile
        att = att.masked_fill(att <= torch.quantile(att, self.gamma, dim=-1, keepdim=True), 0.0)
        x_drop = self.bn(x_c) * att[:, :, None, None]
        q, k, v = (conv(x_drop).squeeze(1) for conv in (self.spatial_q, self.spatial_k, self.spatial_v))
        alpha = torch.softmax(q @ k.transpose(1, 2), dim=-1)  # (B, H, H): product over the width axis
        return (alpha @ v + v).unsqueeze(1)


class FrequencyEdgeModule(_DilatedBranches):
    """Edge map from the high frequencies of a feature map, added back to that feature map.

    The 2-D spectrum is centred (fftshift), the disc of radius ``radius`` around the centre (low
    frequencies) removed, and the magnitude of the inverse transform kept. Returns ``(x + edge, edge)``.
    """

    def __init__(self, c: int, radius: float = 16, gamma: float = 0.1) -> None:
        super().__init__()
        self.radius = radius
        self.UAM = UnionAttentionModule(c, gamma, only_channel=True)  # its .bn is never used
        self._build_branches(c, c)
        self.conv = BasicConv2d(c, 1, 1)

    def high_pass(self, x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[-2:]
        # the reference measures both axes from rows/2 (square maps in practice)
        i = torch.arange(h, device=x.device, dtype=torch.float64)[:, None]
        j = torch.arange(w, device=x.device, dtype=torch.float64)[None, :]
        keep = (((i - h / 2) ** 2 + (j - h / 2) ** 2).sqrt() >= self.radius).to(x.dtype)
        spec = torch.fft.fftshift(torch.fft.fft2(x), dim=(-2, -1)) * keep
        return torch.fft.ifft2(torch.fft.ifftshift(spec, dim=(-2, -1))).abs()

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h, _ = self.UAM.channel_tracer(self.high_pass(x))
        edge = F.relu(self.conv(self._branches(h)))
        return x + edge, edge


class RFB(nn.Module):
    """Receptive-field block: four branches of growing dilation, concatenated, plus a 1x1 residual."""

    def __init__(self, c_in: int, c: int) -> None:
        super().__init__()
        self.branch0 = nn.Sequential(BasicConv2d(c_in, c, 1))
        for i, k in enumerate((3, 5, 7), start=1):
            setattr(self, f"branch{i}", nn.Sequential(
                BasicConv2d(c_in, c, 1),
                BasicConv2d(c, c, (1, k), padding=(0, k // 2)),
                BasicConv2d(c, c, (k, 1), padding=(k // 2, 0)),
                BasicConv2d(c, c, 3, padding=k, dilation=k)))
        self.conv_cat = BasicConv2d(4 * c, c, 3, padding=1)
        self.conv_res = BasicConv2d(c_in, c, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        cat = torch.cat([self.branch0(x), self.branch1(x), self.branch2(x), self.branch3(x)], 1)
        return F.relu(self.conv_cat(cat) + self.conv_res(x))


class Aggregation(nn.Module):
    """CPD-style cascaded fusion of the three RFB outputs into one map at 1/8, then a UAM -> 1 ch."""

    def __init__(self, ch: tuple[int, int, int] = (32, 64, 128), gamma: float = 0.1) -> None:
        super().__init__()
        c2, c3, c4 = ch
        self.conv_upsample1 = BasicConv2d(c4, c3, 3, padding=1)
        self.conv_upsample2 = BasicConv2d(c4, c2, 3, padding=1)
        self.conv_upsample3 = BasicConv2d(c3, c2, 3, padding=1)
        self.conv_upsample4 = BasicConv2d(c4, c4, 3, padding=1)
        self.conv_upsample5 = BasicConv2d(c4 + c3, c4 + c3, 3, padding=1)
        self.conv_concat2 = BasicConv2d(c4 + c3, c4 + c3, 3, padding=1)
        self.conv_concat3 = BasicConv2d(c2 + c3 + c4, c2 + c3 + c4, 3, padding=1)
        self.UAM = UnionAttentionModule(c2 + c3 + c4, gamma)

    @staticmethod
    def up(x: torch.Tensor) -> torch.Tensor:
        # align_corners=True as in the trained model (False shifts the output noticeably)
        return F.interpolate(x, scale_factor=2, mode="bilinear", align_corners=True)

    def forward(self, e4: torch.Tensor, e3: torch.Tensor, e2: torch.Tensor) -> torch.Tensor:
        up = self.up
        e3_1 = self.conv_upsample1(up(e4)) * e3
        e2_1 = self.conv_upsample2(up(up(e4))) * self.conv_upsample3(up(e3)) * e2
        e3_2 = self.conv_concat2(torch.cat([e3_1, self.conv_upsample4(up(e4))], 1))
        x = self.conv_concat3(torch.cat([e2_1, self.conv_upsample5(up(e3_2))], 1))
        return self.UAM(x)


class ObjectAttention(_DilatedBranches):
    """Refines a decoder logit map with an encoder feature map, residually."""

    def __init__(self, c: int, denoise: float = 0.93) -> None:
        super().__init__()
        self.denoise = denoise
        self._build_branches(c, c // 2)
        self.conv1 = BasicConv2d(c // 2, 1, 1)

    def forward(self, d: torch.Tensor, e: torch.Tensor) -> torch.Tensor:
        fg = torch.sigmoid(d)
        bg = 1 - fg
        bg = bg.masked_fill(bg > self.denoise, 0.0)  # drop confident background
        x = self._branches(fg * e + bg * e)
        return F.relu(self.conv1(x)) + d


# ----------------------------------------------------------------------------- full network
class EfficientNetB5Backbone(nn.Module):
    """EfficientNet-B5 trunk (no head) with TRACER's edge module after block 7.

    Key names (``_conv_stem``, ``_blocks.N._bn1``, ...) follow the checkpoint.
    """

    def __init__(self, radius: float = 16, gamma: float = 0.1) -> None:
        super().__init__()
        self.Frequency_Edge_Module1 = FrequencyEdgeModule(40, radius, gamma)
        self._conv_stem = StaticSameConv2d(3, 48, 3, stride=2, size=NATIVE_SIZE)
        self._bn0 = _backbone_bn(48)
        blocks, size = [], math.ceil(NATIVE_SIZE / 2)
        for repeats, k, s, e, c_in, c_out in B5_STAGES:
            for r in range(repeats):
                stride = s if r == 0 else 1
                blocks.append(MBConv(c_in if r == 0 else c_out, c_out, k, stride, e, size))
                size = math.ceil(size / stride)
        self._blocks = nn.ModuleList(blocks)

    def forward(self, x: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
        """Return the four tapped features and the edge map at the input resolution (logits)."""
        h, w = x.shape[-2:]
        x = F.silu(self._bn0(self._conv_stem(x)))
        feats, edge = [], None
        for i, block in enumerate(self._blocks):
            x = block(x)
            if i == EDGE_BLOCK:
                x, edge = self.Frequency_Edge_Module1(x)
            if i in TAP_BLOCKS:
                feats.append(x)
        return feats, F.interpolate(edge, size=(h, w), mode="bilinear", align_corners=False)


class TracerTE5(nn.Module):
    """TRACER with the EfficientNet-B5 encoder (TE-5), meant for 512x512 normalised RGB input.

    ``forward(x)`` returns ``(saliency, edge, (ds0, ds1, ds2))``, all sigmoids in [0, 1] of shape
    ``(B, 1, H, W)``; ``saliency`` is the sigmoid of the mean of the three deep-supervision logits.
    """

    def __init__(self, rfb_channels: tuple[int, int, int] = (32, 64, 128), radius: float = 16,
                 gamma: float = 0.1, denoise: float = 0.93) -> None:
        super().__init__()
        self.model = EfficientNetB5Backbone(radius, gamma)
        self.rfb2 = RFB(64, rfb_channels[0])
        self.rfb3 = RFB(176, rfb_channels[1])
        self.rfb4 = RFB(512, rfb_channels[2])
        self.agg = Aggregation(rfb_channels, gamma)
        self.ObjectAttention2 = ObjectAttention(64, denoise)
        self.ObjectAttention1 = ObjectAttention(40, denoise)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, tuple[torch.Tensor, ...]]:
        (f1, f2, f3, f4), edge = self.model(x)
        d0 = self.agg(self.rfb4(f4), self.rfb3(f3), self.rfb2(f2))
        d1 = self.ObjectAttention2(d0, f2)
        d2 = self.ObjectAttention1(_upsample(d1, 2), f1)
        ds = (_upsample(d0, 8), _upsample(d1, 8), _upsample(d2, 4))
        final = (ds[2] + ds[1] + ds[0]) / 3  # average the logits, then squash
        return torch.sigmoid(final), torch.sigmoid(edge), tuple(torch.sigmoid(m) for m in ds)


def _upsample(x: torch.Tensor, factor: int) -> torch.Tensor:
    return F.interpolate(x, scale_factor=factor, mode="bilinear", align_corners=False)
