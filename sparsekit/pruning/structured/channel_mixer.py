"""A token mixer whose inner channels number the hidden size, cut with it (LFM2's short convolution).

LFM2's convolution block computes ``out_proj(C * conv(B * x))`` where ``B, C, x`` are three runs of
``hidden_size`` rows of ``in_proj``'s output and ``conv`` is depthwise (one filter per channel), so
inner channel ``j`` only ever meets channel ``j`` of each run: dropping it is the same as zeroing
``out_proj``'s column ``j``. The family's code sizes all of it by ``config.hidden_size``, so a
hidden cut must cut these channels too. ``find_channel_mixer`` recognises the shape (a reader whose
output rows are whole runs of the width, a depthwise Conv1d over the width, a writer reading the
width); ``check_channel_independence`` proves the equivalence above on the real module before its
weights change, so a mixer that mixes channels in some other way is refused, not cut wrong.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
from torch import nn

from sparsekit.models import BlockAnatomy, UnsupportedArchitecture, in_out_features, linear_weight

from .layout import select_cols, select_rows


@dataclass
class ChannelMixer:
    """Block-relative names: ``reader``'s output rows are ``chunks`` runs of ``width`` channels,
    ``conv`` is a depthwise Conv1d over ``width`` channels, ``writer``'s input columns are them."""

    path: str
    reader: str
    conv: str
    writer: str
    width: int
    chunks: int


def find_channel_mixer(block: BlockAnatomy, width: int) -> ChannelMixer | None:
    """The block's mixer when it has exactly that shape over ``width`` channels, else None."""
    if block.mixer is None:
        return None
    mixer = block.module.get_submodule(block.mixer)
    convs = [
        (n, m)
        for n, m in mixer.named_modules()
        if isinstance(m, nn.Conv1d) and m.groups == m.in_channels == m.out_channels == width
    ]
    inside = {n: m for n, m in block.linears.items() if n.startswith(block.mixer + ".")}
    readers = [
        n for n, m in inside.items() if in_out_features(m)[1] % width == 0 and in_out_features(m)[1] > width
    ]
    writers = [n for n, m in inside.items() if in_out_features(m)[0] == width and n not in readers]
    if len(convs) != 1 or len(readers) != 1 or len(writers) != 1:
        return None
    out_f = in_out_features(inside[readers[0]])[1]
    conv = f"{block.mixer}.{convs[0][0]}" if convs[0][0] else block.mixer
    return ChannelMixer(block.mixer, readers[0], conv, writers[0], width, out_f // width)


def reader_rows(mixer: ChannelMixer, kept: torch.Tensor) -> torch.Tensor:
    """The reader's output rows of the kept channels, in every run."""
    return torch.cat([kept + c * mixer.width for c in range(mixer.chunks)])


def keep_mixer_channels(block: BlockAnatomy, mixer: ChannelMixer, kept: torch.Tensor) -> None:
    """Keep inner channels ``kept`` (LongTensor) of the block's mixer, in place."""
    cut_mixer(block.module, mixer, kept)
    block.refresh_linears()


def cut_mixer(root: nn.Module, mixer: ChannelMixer, kept: torch.Tensor) -> None:
    """Keep inner channels ``kept`` of the mixer in ``root`` (the block module), in place."""
    kept = kept.sort().values.cpu()
    select_rows(root.get_submodule(mixer.reader), reader_rows(mixer, kept))
    select_cols(root.get_submodule(mixer.writer), kept)
    conv = root.get_submodule(mixer.conv)
    index = kept.to(conv.weight.device)
    conv.weight = nn.Parameter(conv.weight.data[index].contiguous(), requires_grad=conv.weight.requires_grad)
    if conv.bias is not None:
        conv.bias = nn.Parameter(conv.bias.data[index].contiguous(), requires_grad=conv.bias.requires_grad)
    conv.in_channels = conv.out_channels = conv.groups = len(kept)


def check_channel_independence(block: BlockAnatomy, mixer: ChannelMixer, tokens: int = 6) -> None:
    """Refuse unless cutting half the channels of a copy of the mixer gives what zeroing the
    writer's columns of the other half gives (on random input; one mixer call each)."""
    reader = block.linear(mixer.reader)
    weight = linear_weight(reader)
    x = torch.randn(1, tokens, in_out_features(reader)[0], generator=torch.Generator().manual_seed(0))
    x = x.to(device=weight.device, dtype=weight.dtype)
    dropped = torch.arange(1, mixer.width, 2)
    zeroed, cut = _holder(mixer.path, block), _holder(mixer.path, block)
    with torch.no_grad():
        linear_weight(zeroed.get_submodule(mixer.writer))[:, dropped.to(weight.device)] = 0
        cut_mixer(cut, mixer, torch.arange(0, mixer.width, 2))
        want, got = (_first(m.get_submodule(mixer.path)(x)) for m in (zeroed, cut))
    if not torch.allclose(want.float(), got.float(), atol=1e-4, rtol=1e-3):
        raise UnsupportedArchitecture(
            f"the mixer {mixer.path} has {mixer.width} inner channels sized by hidden_size, and they "
            "are not independent (cutting some is not zeroing them), so a hidden cut cannot follow them. "
            "Cut axes='mlp,heads' instead"
        )


def _first(out):
    return out[0] if isinstance(out, tuple) else out


def _holder(path: str, block: BlockAnatomy) -> nn.Module:
    """A copy of the block's mixer, held at ``path`` in an otherwise empty module tree."""
    root = parent = nn.Module()
    *parents, leaf = path.split(".")
    for name in parents:
        child = nn.Module()
        parent.add_module(name, child)
        parent = child
    parent.add_module(leaf, copy.deepcopy(block.module.get_submodule(path)))
    return root
