"""Selection quality on synthetic long videos (vidtok.testing.synthetic_video_embeddings): needle recall,
scene coverage, temporal gaps and redundancy of uniform, top-k, MMR, TASS-style, NMS, per-scene and
DPP selection, and boundary F1 of scene_boundaries against the planted hard cuts. Prints the table;
asserts the trade-offs each method exists for."""

import pytest
import torch

import vidtok
from vidtok.testing import synthetic_video_embeddings

B, T, C, K = 6, 3600, 256, 32


@pytest.fixture(scope="module")
def video():
    return synthetic_video_embeddings(B, T, C, seed=2024)


def _metrics(idx, v, xn):
    """Mean over videos of: needle recall, all-needles hit, centroid coverage, max gap, redundancy."""
    recall, all_hit, coverage, gap, redundancy = [], [], [], [], []
    for b in range(B):
        picks = [int(i) for i in idx[b] if i >= 0]
        n_needles = int(v.needle[b].max()) + 1
        hit = {int(v.needle[b, i]) for i in picks} - {-1}
        recall.append(len(hit) / n_needles)
        all_hit.append(float(len(hit) == n_needles))
        coverage.append(len({int(v.centroid[b, i]) for i in picks}) / len(set(v.centroid[b].tolist())))
        edges = [-1] + sorted(picks) + [T]
        gap.append(max(e - s for s, e in zip(edges[:-1], edges[1:])))
        sims = xn[b, picks] @ xn[b, picks].T
        sims.fill_diagonal_(-1)
        redundancy.append(float(sims.max(-1).values.mean()))
    n = len(recall)
    return dict(recall=sum(recall) / n, all_hit=sum(all_hit) / n, coverage=sum(coverage) / n,
                max_gap=sum(gap) / n, redundancy=sum(redundancy) / n)


def _boundary_f1(seg, cuts, tol=1):
    """F1 of predicted cuts against true hard cuts, +-tol frames, greedy one-to-one matching."""
    tp = fp = fn = 0
    for b in range(seg.shape[0]):
        pred = torch.nonzero(seg[b, 1:] != seg[b, :-1]).flatten().tolist()
        true = torch.nonzero(cuts[b]).flatten().tolist()
        used = set()
        for p in pred:
            match = next((t for t in true if abs(t - p) <= tol and t not in used), None)
            if match is None:
                fp += 1
            else:
                used.add(match)
                tp += 1
        fn += len(true) - len(used)
    precision, recall = tp / max(tp + fp, 1), tp / max(tp + fn, 1)
    return 2 * precision * recall / max(precision + recall, 1e-12), precision, recall


def test_selection_tradeoffs(video, record_property):
    v = video
    s = vidtok.frame_scores(v.x, v.query)
    rel = s.relevance
    xn = v.x / v.x.norm(dim=-1, keepdim=True)
    seg = vidtok.scene_boundaries(s.adjacent, method="lowest_k", k=K - 1)
    methods = {
        "uniform": vidtok.uniform_indices(T, K)[None].expand(B, K),
        "top-k": vidtok.greedy_select(rel, K)[:, 0],
        "MMR lam=0.5": vidtok.greedy_select(rel, K, x=v.x, lam=0.5)[:, 0],
        "TASS-style (above mean, gap 20)": vidtok.greedy_select(rel, K, pool="above_mean", min_gap=20)[:, 0],
        "NMS cos>0.85": vidtok.greedy_select(rel, K, x=v.x, sim_thresh=0.85)[:, 0],
        "per-scene top-1 (lowest_k cuts)": vidtok.segment_topk(rel, seg, 1)[:, 0],
        "DPP q=exp(rel/0.1)": vidtok.dpp_select(v.x, K, quality=torch.exp(rel[:, 0] / 0.1))[0],
    }
    results = {name: _metrics(idx, v, xn) for name, idx in methods.items()}
    for name, m in results.items():  # in the JUnit XML: recall / all-hit / coverage / max gap / redundancy
        record_property(f"selection {name}", f"{m['recall']:.2f} / {m['all_hit']:.2f} / {m['coverage']:.2f} / "
                                             f"{m['max_gap']:.1f} / {m['redundancy']:.2f}")
    u, top, mmr, tass, nms, dpp = (results[n] for n in ["uniform", "top-k", "MMR lam=0.5", "TASS-style (above mean, gap 20)",
                                                         "NMS cos>0.85", "DPP q=exp(rel/0.1)"])
    assert top["recall"] == 1.0 and u["recall"] < 0.5  # relevance finds the planted events; uniform misses them
    for m in (mmr, tass, nms, dpp):  # diversity keeps the needles ...
        assert m["recall"] >= 0.9
    for m in (mmr, nms, dpp):  # ... while removing redundancy and covering more of the video than top-k
        assert m["redundancy"] < top["redundancy"]
        assert m["coverage"] > top["coverage"]
    # the DPP's quality exp(rel / 0.1) weighs relevance heavily (as MDP3's 1/lambda exponent); MMR less so
    assert mmr["redundancy"] < top["redundancy"] - 0.2 and mmr["coverage"] > 2 * top["coverage"]
    assert tass["max_gap"] < top["max_gap"]  # the temporal gap spreads picks in time
    assert u["max_gap"] < min(m["max_gap"] for m in results.values() if m is not u)


def test_boundary_f1(video, record_property):
    v = video
    adj = vidtok.frame_scores(v.x).adjacent
    n_true = int(v.cuts.sum()) // B
    cases = {
        "threshold 0.5": dict(method="threshold", threshold=0.5),
        "threshold 0.5, min_len 3": dict(method="threshold", threshold=0.5, min_len=3),
        f"lowest_k k={n_true}": dict(method="lowest_k", k=n_true),
        "mean_std alpha=0.5": dict(method="mean_std"),
        "adaptive (defaults)": dict(method="adaptive"),
    }
    scores = {}
    for name, opts in cases.items():
        f1, p, r = _boundary_f1(vidtok.scene_boundaries(adj, **opts), v.cuts)
        scores[name] = f1
        record_property(f"scene_boundaries {name}", f"F1 {f1:.3f} (precision {p:.3f}, recall {r:.3f})")
    assert scores["threshold 0.5"] > 0.8
    assert scores["threshold 0.5, min_len 3"] > scores["threshold 0.5"]  # min_len drops the flash's second cut
    assert scores["adaptive (defaults)"] > 0.9
