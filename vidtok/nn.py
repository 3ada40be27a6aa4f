"""torch.nn modules over vidtok's ops.

LearnableSparseMask: SwinBERT's learnable sparse attention mask (Lin et al. 2022,
microsoft/SwinBERT), per frame pair, made useful for speed: train a soft gate, then harden it into a
SparsePlan that sparse_attention runs on the kept frame pairs only.
"""

from __future__ import annotations

import torch
from torch import nn

from vidtok import masks
from vidtok.sparse import SparsePlan, VideoLayout, build_plan

__all__ = ["LearnableSparseMask"]


class LearnableSparseMask(nn.Module):
    """A learnable gate m[t, s] = sigmoid(w[t, s]) on how much frame t's queries attend to frame s's keys.

    Training adds the bias log m[t_q, t_k] to the attention logits (``attention_bias``/``forward``):
    unlike SwinBERT's -10000 (1 - m), whose m = 0.999 already means a -10 logit, log m keeps soft
    values meaningful (m = 0.5 halves a key's weight). Every frame attends to itself (m[t, t] = 1, as
    SwinBERT forces its diagonal). ``sparsity_loss()`` is SwinBERT's L1 penalty, the mean of the
    off-diagonal gates (SwinBERT weighs it 0.5). ``harden(...)`` turns the gate into a SparsePlan of the
    kept frame pairs (plus global tokens) for fast inference; the kept pairs then attend unweighted.

    Args:
        num_frames: T, the frame count of the layouts it is used with.
        init: initial logit of every off-diagonal gate (2.0: m = 0.88).
    """

    def __init__(self, num_frames: int, *, init: float = 2.0):
        super().__init__()
        if isinstance(num_frames, bool) or not isinstance(num_frames, int) or num_frames < 1:
            raise ValueError(f"num_frames must be an int >= 1, got {num_frames!r}")
        self.num_frames = num_frames
        self.logits = nn.Parameter(torch.full((num_frames, num_frames), float(init)))

    def _eye(self) -> torch.Tensor:
        return torch.eye(self.num_frames, dtype=torch.bool, device=self.logits.device)

    def gate(self) -> torch.Tensor:
        """m = sigmoid(w) [T, T] with the diagonal fixed to 1."""
        return torch.where(self._eye(), 1.0, torch.sigmoid(self.logits))

    def log_gate(self) -> torch.Tensor:
        """log m [T, T] = logsigmoid(w) (stable for very negative w), 0 on the diagonal."""
        return torch.where(self._eye(), 0.0, nn.functional.logsigmoid(self.logits))

    def sparsity_loss(self) -> torch.Tensor:
        """Mean off-diagonal gate value (SwinBERT's L1 sparsity regulariser; gates are positive)."""
        if self.num_frames == 1:
            return self.logits.sum() * 0
        off = ~self._eye()
        return torch.sigmoid(self.logits)[off].mean()

    def _check_layout(self, layout: VideoLayout) -> None:
        if not isinstance(layout, VideoLayout):
            raise TypeError(f"layout must be a vidtok.VideoLayout, got {type(layout).__name__}")
        if layout.grid[0] != self.num_frames:
            raise ValueError(f"layout has T = {layout.grid[0]} frames but the mask was made for num_frames = {self.num_frames}")

    def attention_bias(self, layout: VideoLayout) -> torch.Tensor:
        """Float [B, 1, N, N] additive bias: log m[t_q, t_k] between video tokens, 0 for pairs with a
        global token, -inf for padding keys (padding queries attend to every valid key; their outputs
        are meaningless). Dense N^2: the training path, as SwinBERT's."""
        self._check_layout(layout)
        coords = layout.coords.to(self.logits.device).long()
        t = coords[..., 0].clamp_min(0)
        video = layout.kind.to(self.logits.device) == 1
        valid = layout.kind.to(self.logits.device) != 0
        bias = self.log_gate()[t[:, :, None], t[:, None, :]]
        bias = torch.where(video[:, :, None] & video[:, None, :], bias, torch.zeros((), device=bias.device))
        bias = bias.masked_fill(~valid[:, None, :], float("-inf"))
        return bias[:, None]

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layout: VideoLayout) -> torch.Tensor:
        """Soft-masked dense attention for training: SDPA(q, k, v, attn_mask=attention_bias(layout)).
        q, k, v [B, H, N, D] (same head count). Outputs of padding tokens are zero."""
        bias = self.attention_bias(layout).to(q.dtype)
        out = nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=bias)
        valid = (layout.kind != 0).to(out.device)
        return out * valid[:, None, :, None]

    @torch.no_grad()
    def keep(self, *, threshold: float | None = None, topk: int | None = None) -> torch.Tensor:
        """bool [T, T]: the frame pairs that survive hardening (always the diagonal).

        ``threshold``: keep m >= threshold (SwinBERT's soft2hard uses 0.5). ``topk``: keep the k
        largest gates of every query frame (ties: the lower frame index), the diagonal counted first.
        Exactly one of the two.
        """
        if (threshold is None) == (topk is None):
            raise ValueError("harden/keep needs exactly one of threshold=... or topk=...")
        m = self.gate()
        if threshold is not None:
            if not 0.0 <= float(threshold) <= 1.0:
                raise ValueError(f"threshold must be in [0, 1], got {threshold}")
            return (m >= threshold) | self._eye()
        if isinstance(topk, bool) or not isinstance(topk, int) or not 1 <= topk <= self.num_frames:
            raise ValueError(f"topk must be an int in [1, {self.num_frames}], got {topk!r}")
        # the diagonal (m = 1) first, then by gate; a stable sort keeps the lower index on ties
        score = torch.where(self._eye(), 2.0, m)
        order = torch.sort(-score, dim=1, stable=True).indices[:, :topk]
        keep = torch.zeros_like(self._eye())
        keep.scatter_(1, order, True)
        return keep

    def harden(self, layout: VideoLayout, *, threshold: float | None = None, topk: int | None = None,
               block: tuple[int, int] = (64, 64)) -> SparsePlan:
        """The SparsePlan of the kept frame pairs (``keep``), with global tokens attending and attended
        by everything, for ``vidtok.sparse_attention``."""
        self._check_layout(layout)
        allowed = self.keep(threshold=threshold, topk=topk)
        return build_plan(layout, masks.frame_pairs(allowed.cpu()) | masks.global_tokens(), block=block)
