"""Pictures of what vidtok dropped, merged and kept, and the keep-fraction-vs-PSNR plot.

``overlay`` marks patches on the frames, one mark per stage: skipped by the motion gate (greyed and
hatched, so a skipped patch never looks like a naturally dark one), merged into an earlier token (an
outline), attended (a dot: the token sparse attention sees sits here). ``save_frame_grid`` draws
frames in a grid with selected frames outlined, frames after a scene cut marked, frames left out of
the selection faded and crossed, and a legend of the marks it was told about.
"""

from __future__ import annotations

import torch

# RGB 0-255 of the marks, shared by overlay (pixels) and the legend (matplotlib colours)
HATCH = (150, 150, 150)  # the hatch lines over a skipped patch
MERGED = (0, 220, 255)  # the outline of a token merged into an earlier one
ATTENDED = (40, 255, 40)  # the dot of a token attention sees
FADE = 0.6  # share of white blended into a frame left out of the selection

# legend keys save_frame_grid knows, in the order it lists them
MARKS = ("skipped", "merged", "attended", "selected", "cut", "not selected")


def _hatch_mask(H: int, W: int, period: int, device) -> torch.Tensor:
    """bool [H, W]: diagonal lines, one pixel wide, every ``period`` pixels (continuous across patches)."""
    y = torch.arange(H, device=device)[:, None]
    x = torch.arange(W, device=device)[None, :]
    return (x + y) % period == 0


def _outline_mask(patch: int, width: int, device) -> torch.Tensor:
    """bool [patch, patch]: the ``width``-pixel border of one patch."""
    r = torch.arange(patch, device=device)
    edge = (r < width) | (r >= patch - width)
    return edge[:, None] | edge[None, :]


def _dot_mask(patch: int, device, grow: int = 0) -> torch.Tensor:
    """bool [patch, patch]: a centred square, a quarter of the patch wide (at least 2 pixels), grown
    by ``grow`` pixels on every side (its dark rim)."""
    side = max(2, patch // 4)
    lo = (patch - side) // 2 - grow
    r = torch.arange(patch, device=device)
    inside = (r >= lo) & (r < lo + side + 2 * grow)
    return inside[:, None] & inside[None, :]


def merged_away(groups: torch.Tensor) -> torch.Tensor:
    """bool [T, h, w]: patches whose group has an earlier member in (t, h, w) order -- the members a
    merge folded into another token. The first member of every group (the survivor, where a
    temporal merge places its token) is False, as is every group of one."""
    flat = groups.reshape(-1).long()
    ids, inverse = torch.unique(flat, return_inverse=True)
    first = torch.full((len(ids),), flat.numel(), dtype=torch.long, device=flat.device)
    first = first.scatter_reduce(0, inverse, torch.arange(flat.numel(), device=flat.device), reduce="amin")
    return (first[inverse] != torch.arange(flat.numel(), device=flat.device)).reshape(groups.shape)


def overlay(
    frames: torch.Tensor,
    patch: int,
    *,
    keep: torch.Tensor | None = None,
    groups: torch.Tensor | None = None,
    merged: torch.Tensor | None = None,
    attended: torch.Tensor | None = None,
    dim: float = 0.4,
) -> torch.Tensor:
    """Mark patches on uint8 frames [T, 3, H, W]; returns uint8 [T, 3, H, W].

    keep: bool [T, h, w]; False patches (skipped by a gate) turn grey, dimmed to ``dim`` of their
        brightness, under light diagonal hatch lines: a skipped patch stays tellable from a kept one
        that is dark by itself.
    merged: bool [T, h, w]; True patches (tokens a merge folded into an earlier token) get a
        coloured outline (``MERGED``). Survivors are left unmarked.
    groups: int [T, h, w] group id of every patch (e.g. ``merged.index`` of a temporal merge
        reshaped), a shorthand for ``merged=merged_away(groups)``: every member but the first of its
        group is outlined. Give groups of the whole clip (a subset of frames loses earlier members).
    attended: bool [T, h, w]; True patches get a centred dot (``ATTENDED``, with a black rim on
        patches of 8 pixels or more): the token attention sees sits at this patch.
    """
    if frames.dtype != torch.uint8 or frames.dim() != 4 or frames.shape[1] != 3:
        raise ValueError(f"frames must be uint8 [T, 3, H, W], got {frames.dtype} {tuple(frames.shape)}")
    if groups is not None and merged is not None:
        raise ValueError("pass groups or merged, not both (groups is a shorthand for merged=merged_away(groups))")
    T, _, H, W = frames.shape
    h, w = H // patch, W // patch
    for name, m in (("keep", keep), ("groups", groups), ("merged", merged), ("attended", attended)):
        if m is not None and tuple(m.shape) != (T, h, w):
            raise ValueError(f"{name} must be [T, h, w] = {(T, h, w)} for patch {patch}, got {tuple(m.shape)}")
    if groups is not None:
        merged = merged_away(groups)
    out = frames[:, :, : h * patch, : w * patch].float()
    dev = out.device

    def per_pixel(mask: torch.Tensor) -> torch.Tensor:  # [T, h, w] -> [T, 1, h*patch, w*patch]
        return mask.bool().to(dev).repeat_interleave(patch, 1).repeat_interleave(patch, 2).unsqueeze(1)

    def within(mask: torch.Tensor, shape: torch.Tensor) -> torch.Tensor:  # patches' mask x a per-patch shape
        return per_pixel(mask) & shape.repeat(h, w)[None, None]

    def paint(where: torch.Tensor, rgb) -> torch.Tensor:
        return torch.where(where, torch.tensor(rgb, dtype=out.dtype, device=dev)[None, :, None, None], out)

    if keep is not None:
        skipped = per_pixel(~keep.bool())
        grey = out.mul(torch.tensor([0.299, 0.587, 0.114], device=dev)[None, :, None, None]).sum(1, keepdim=True)
        out = torch.where(skipped, (grey * dim).expand_as(out), out)
        out = paint(skipped & _hatch_mask(h * patch, w * patch, max(4, patch // 2), dev), HATCH)
    if merged is not None:
        out = paint(within(merged, _outline_mask(patch, 1 if patch < 12 else 2, dev)), MERGED)
    if attended is not None:  # a green dot with a dark rim, visible on green and on dark patches alike
        if patch >= 8:
            out = paint(within(attended, _dot_mask(patch, dev, grow=1)), (0, 0, 0))
        out = paint(within(attended, _dot_mask(patch, dev)), ATTENDED)
    return out.round().clamp(0, 255).to(torch.uint8)


def fade(frames: torch.Tensor, amount: float = FADE) -> torch.Tensor:
    """uint8 [..., 3, H, W] blended ``amount`` of the way to white: a frame left out of a selection."""
    return (frames.float() * (1 - amount) + 255 * amount).round().clamp(0, 255).to(torch.uint8)


def _legend_handles(keys, labels):
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch

    def rgb(c):
        return tuple(v / 255 for v in c)

    style = {
        "skipped": lambda: Patch(facecolor=(0.25, 0.25, 0.25), edgecolor=rgb(HATCH), hatch="////", linewidth=0),
        "merged": lambda: Patch(facecolor=(0.55, 0.55, 0.55), edgecolor=rgb(MERGED), linewidth=2),
        "attended": lambda: Line2D([], [], marker="s", linestyle="none", markersize=6, markerfacecolor=rgb(ATTENDED),
                                   markeredgecolor="black"),
        "selected": lambda: Patch(facecolor="none", edgecolor="lime", linewidth=3),
        "cut": lambda: Patch(facecolor="none", edgecolor="red", linewidth=3),
        "not selected": lambda: Patch(facecolor=(0.93, 0.93, 0.93), edgecolor=(0.45, 0.45, 0.45), hatch="xx", linewidth=1),
    }
    return [style[k]() for k in keys], [labels[k] for k in keys]


def save_frame_grid(
    path: str,
    frames: torch.Tensor,
    *,
    selected=(),
    cuts=(),
    faded=(),
    titles=None,
    cols: int = 8,
    suptitle: str | None = None,
    legend: dict | None = None,
    dpi: int = 100,
) -> None:
    """Write a PNG grid of uint8 frames [T, 3, H, W].

    selected: frames with a thick green border. cuts: frames with a red one (the first frame of a
    scene; a frame both selected and after a cut gets the red border and "selected" in its title).
    faded: frames drawn faded toward white and crossed out (e.g. the frames a selection left out).
    legend: mark key -> label, for keys in ``MARKS`` ("skipped", "merged", "attended" as ``overlay``
    draws them; "selected", "cut", "not selected" as this function does); drawn under the suptitle.
    """
    unknown = set(legend or ()) - set(MARKS)
    if unknown:
        raise ValueError(f"legend keys must be among {MARKS}, got {sorted(unknown)}")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    T = frames.shape[0]
    rows = (T + cols - 1) // cols
    H, W = frames.shape[2], frames.shape[3]
    # inches: panels about one image pixel per PNG pixel for small frames, at most 2.4 wide; a title
    # line over each panel; a header with the suptitle and the legend
    panel_w = min(max(1.6, W / dpi), 2.4)
    panel_h = panel_w * H / W
    gap_w, title_h, pad = 0.08, 0.2, 0.06
    ncol = min(len(legend), 6) if legend else 1
    header = 0.08 + (0.25 if suptitle else 0) + (0.25 * -(-len(legend) // ncol) if legend else 0)
    fig_w = cols * panel_w + (cols + 1) * gap_w
    fig_h = header + rows * (title_h + panel_h + pad) + pad
    fig, axes = plt.subplots(rows, cols, figsize=(fig_w, fig_h), squeeze=False)
    fig.subplots_adjust(left=gap_w / fig_w, right=1 - gap_w / fig_w, top=1 - (header + title_h) / fig_h,
                        bottom=pad / fig_h, wspace=gap_w / panel_w, hspace=(title_h + pad) / panel_h)
    selected, cuts, faded = set(int(s) for s in selected), set(int(c) for c in cuts), set(int(f) for f in faded)
    for i, ax in enumerate(axes.flat):
        ax.set_xticks([])
        ax.set_yticks([])
        if i >= T:
            ax.axis("off")
            continue
        image = fade(frames[i]) if i in faded else frames[i]
        ax.imshow(image.permute(1, 2, 0).cpu().numpy(), interpolation="nearest")
        label = titles[i] if titles else f"t={i}"
        color, width = "none", 0
        if i in cuts:
            color, width, label = "red", 4, label + " cut" + (" selected" if i in selected else "")
        elif i in selected:
            color, width, label = "lime", 4, label + " selected"
        if i in faded:
            ax.plot([0, W - 1], [0, H - 1], color=(0.45, 0.45, 0.45), linewidth=1)
            ax.plot([0, W - 1], [H - 1, 0], color=(0.45, 0.45, 0.45), linewidth=1)
            ax.set_xlim(-0.5, W - 0.5)
            ax.set_ylim(H - 0.5, -0.5)
        for spine in ax.spines.values():
            spine.set_edgecolor(color)
            spine.set_linewidth(width)
        ax.set_title(label, fontsize=7, color=(0.45, 0.45, 0.45) if i in faded else "black")
    if suptitle:
        fig.suptitle(suptitle, fontsize=9, y=1 - 0.06 / fig_h, va="top")
    if legend:
        handles, labels = _legend_handles([k for k in MARKS if k in legend], legend)
        fig.legend(handles, labels, loc="upper center", ncol=ncol, fontsize=8, frameon=False,
                   bbox_to_anchor=(0.5, 1 - (0.33 if suptitle else 0.06) / fig_h), handlelength=2.2, borderaxespad=0)
    _save_png(fig, path, dpi)


def _save_png(fig, path: str, dpi: int) -> None:
    """Save ``fig`` as a PNG of at most 256 colours when Pillow is there (matplotlib needs it): a grid
    of video frames compresses 2-3x smaller and looks the same at this size. The palette holds the
    marks' colours exactly (a median cut of the frames alone can turn a lone red border olive)."""
    import io

    import matplotlib.pyplot as plt

    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=dpi)
    plt.close(fig)
    try:
        from PIL import Image
    except ImportError:
        with open(path, "wb") as f:
            f.write(buffer.getvalue())
        return
    fixed = [HATCH, MERGED, ATTENDED, (0, 255, 0), (255, 0, 0), (0, 0, 0), (255, 255, 255), (115, 115, 115)]
    with Image.open(buffer) as image:
        rgb = image.convert("RGB")
    cut = rgb.quantize(256 - len(fixed), method=Image.Quantize.MEDIANCUT, dither=Image.Dither.NONE)
    colours = cut.getpalette()[: 3 * (256 - len(fixed))]
    palette = Image.new("P", (1, 1))
    palette.putpalette(colours + [v for c in fixed for v in c])
    rgb.quantize(palette=palette, dither=Image.Dither.NONE).save(path, optimize=True)


def save_curve_plot(path: str, curves: dict, *, xlabel: str, ylabel: str, title: str = "") -> None:
    """Write a PNG line plot; curves maps a label to (xs, ys)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for label, (xs, ys) in curves.items():
        ax.plot(xs, ys, marker="o", markersize=3, label=label)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    if title:
        ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
