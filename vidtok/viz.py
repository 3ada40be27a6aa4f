"""Pictures of what vidtok dropped: skipped patches dimmed, merge groups coloured, selected frames
outlined, scene cuts marked; and the keep-fraction-vs-PSNR plot."""

from __future__ import annotations

import torch

# Distinct colours (RGB 0-255) for merge groups; a group's colour is picked by its id.
PALETTE = torch.tensor(
    [
        [230, 25, 75], [60, 180, 75], [255, 225, 25], [0, 130, 200], [245, 130, 48], [145, 30, 180],
        [70, 240, 240], [240, 50, 230], [210, 245, 60], [250, 190, 212], [0, 128, 128], [220, 190, 255],
    ],
    dtype=torch.float32,
)


def overlay(
    frames: torch.Tensor,
    patch: int,
    *,
    keep: torch.Tensor | None = None,
    groups: torch.Tensor | None = None,
    dim: float = 0.3,
    tint: float = 0.45,
) -> torch.Tensor:
    """Mark patches on uint8 frames [T, 3, H, W]; returns uint8 [T, 3, H, W].

    keep: bool [T, h, w], False patches are dimmed to ``dim`` of their brightness.
    groups: int [T, h, w] group id of every patch (e.g. merged.index reshaped); patches whose group has
    more than one member are tinted with the group's colour, so a merge across frames shows up as the
    same colour in several frames.
    """
    if frames.dtype != torch.uint8 or frames.dim() != 4 or frames.shape[1] != 3:
        raise ValueError(f"frames must be uint8 [T, 3, H, W], got {frames.dtype} {tuple(frames.shape)}")
    T, _, H, W = frames.shape
    h, w = H // patch, W // patch
    out = frames[:, :, : h * patch, : w * patch].float()

    def per_pixel(mask: torch.Tensor) -> torch.Tensor:  # [T, h, w] -> [T, 1, h*patch, w*patch]
        return mask.repeat_interleave(patch, 1).repeat_interleave(patch, 2).unsqueeze(1)

    for name, m in (("keep", keep), ("groups", groups)):
        if m is not None and tuple(m.shape) != (T, h, w):
            raise ValueError(f"{name} must be [T, h, w] = {(T, h, w)} for patch {patch}, got {tuple(m.shape)}")
    if groups is not None:
        flat = groups.reshape(-1).long()
        counts = torch.bincount(flat - flat.min()).gather(0, flat - flat.min()).reshape(T, h, w)
        colour = PALETTE[flat % len(PALETTE)].reshape(T, h, w, 3).permute(0, 3, 1, 2)  # [T, 3, h, w]
        colour = colour.repeat_interleave(patch, 2).repeat_interleave(patch, 3)
        merged = per_pixel(counts > 1).float()
        out = out * (1 - tint * merged) + colour * (tint * merged)
    if keep is not None:
        out = out * torch.where(per_pixel(keep.bool()), 1.0, dim)
    return out.round().clamp(0, 255).to(torch.uint8)


def save_frame_grid(
    path: str,
    frames: torch.Tensor,
    *,
    selected=(),
    cuts=(),
    titles=None,
    cols: int = 8,
    suptitle: str | None = None,
) -> None:
    """Write a PNG grid of uint8 frames [T, 3, H, W]: selected frames get a thick green border, the
    first frame of each scene after a cut a red one."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    T = frames.shape[0]
    rows = (T + cols - 1) // cols
    aspect = frames.shape[2] / frames.shape[3]
    fig, axes = plt.subplots(rows, cols, figsize=(2 * cols, 2 * aspect * rows + 0.6), squeeze=False)
    selected, cuts = set(int(s) for s in selected), set(int(c) for c in cuts)
    for i, ax in enumerate(axes.flat):
        ax.set_xticks([])
        ax.set_yticks([])
        if i >= T:
            ax.axis("off")
            continue
        ax.imshow(frames[i].permute(1, 2, 0).numpy())
        label = titles[i] if titles else f"t={i}"
        color, width = "none", 0
        if i in cuts:
            color, width, label = "red", 4, label + " cut"
        if i in selected:
            color, width, label = "lime", 4, label + " selected"
        for spine in ax.spines.values():
            spine.set_edgecolor(color)
            spine.set_linewidth(width)
        ax.set_title(label, fontsize=7)
    if suptitle:
        fig.suptitle(suptitle, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


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
