"""Every data-free method written the plain way the papers state it: an oracle and a teaching aid.

Each model is flattened into one vector (θ0: (N,), the task vectors stacked: (T, N)), and each
method is a few lines of torch.topk / sign / masks over those vectors, with no chunking and no
kernels. Notebooks show these beside each formula before calling the fast versions in
`byom_lab.merging`, and the tests check the fast versions against them. Nothing here imports the
fast code, and nothing here is a registered method.

Symbols as in DESIGN.md: θ0 pretrained, θ_t fine-tuned on task t, v_t = θ_t − θ0, λ scale,
γ elected sign, τ merged task vector, θ* merged model, u_t = θ_t − θ*, m = density, q = rank.
"""
from typing import Mapping, Sequence

import torch
from torch import Tensor

StateDict = Mapping[str, Tensor]


def flatten(state_dict: StateDict, like: StateDict | None = None) -> Tensor:
    """All entries of a state dict as one 1-D vector, tensors in the key order of `like` (default: its own).

    Models read from different files may list their keys in different orders; flattening every one
    in θ0's order keeps entry i the same weight in every vector.
    """
    keys = (like if like is not None else state_dict).keys()
    return torch.cat([state_dict[k].reshape(-1) for k in keys])  # (N,)


def unflatten(vector: Tensor, like: StateDict) -> dict[str, Tensor]:
    """Inverse of `flatten`: a dict with the keys, shapes and dtypes of `like`."""
    pieces = vector.split([t.numel() for t in like.values()])
    return {k: p.reshape(t.shape).to(t.dtype) for (k, t), p in zip(like.items(), pieces, strict=True)}


def _flat_vectors(pretrained: StateDict, finetuned: Sequence[StateDict]) -> tuple[Tensor, Tensor]:
    """θ0 as a vector (N,) and the task vectors v_t = θ_t − θ0 stacked (T, N)."""
    theta0 = flatten(pretrained)  # (N,)
    return theta0, torch.stack([flatten(ft, like=pretrained) for ft in finetuned]) - theta0  # (T, N)


def task_vectors(pretrained: StateDict, finetuned: Sequence[StateDict]) -> list[dict[str, Tensor]]:
    """Task vectors v_t = θ_t − θ0, one dict per task (arXiv 2212.04089, "Task vectors")."""
    return [{k: ft[k] - pretrained[k] for k in pretrained} for ft in finetuned]


def top(x: Tensor, density: float) -> Tensor:
    """top(x, m): keep the k = round(m·n) (at least 1) entries of largest |x| of a 1-D x, zero the rest.

    Exactly k entries survive: torch.topk breaks ties at the threshold arbitrarily (the fast
    `merging.top` keeps every tied entry instead; with no ties the two agree).
    """
    k = max(1, round(density * x.numel()))
    keep = torch.zeros_like(x, dtype=torch.bool)  # (n,)
    keep[x.abs().topk(k).indices] = True  # the k largest magnitudes
    return torch.where(keep, x, torch.zeros_like(x))


def simple_average(pretrained: StateDict, finetuned: Sequence[StateDict]) -> dict[str, Tensor]:
    """Simple averaging θ0 + (1/T) Σ_t v_t = (1/T) Σ_t θ_t (model soups, arXiv 2203.05482, uniform soup)."""
    theta0, v = _flat_vectors(pretrained, finetuned)  # (N,), (T, N)
    return unflatten(theta0 + (1 / len(finetuned)) * v.sum(0), pretrained)


def task_arithmetic(pretrained: StateDict, finetuned: Sequence[StateDict], lam: float = 0.3) -> dict[str, Tensor]:
    """Task arithmetic θ0 + λ Σ_t v_t (arXiv 2212.04089, "Task vectors": addition)."""
    theta0, v = _flat_vectors(pretrained, finetuned)  # (N,), (T, N)
    return unflatten(theta0 + lam * v.sum(0), pretrained)


def ties(pretrained: StateDict, finetuned: Sequence[StateDict], density: float = 0.2, lam: float = 1.0,
         merge: str = "mean") -> dict[str, Tensor]:
    """TIES-Merging, global scope (arXiv 2306.01708, "TIES-Merging: trim, elect sign & merge").

        v̂_t = top(v_t, density)                            trim: rank over the whole task vector
        γ   = sign(Σ_t v̂_t), +1 where the sum is 0          elect
        τ   = Σ_t v̂_t·[sign v̂_t = γ] / max(1, #agreeing)    disjoint merge ("sum": no division)
        θ   = θ0 + λτ
    """
    theta0, v = _flat_vectors(pretrained, finetuned)  # (N,), (T, N)
    v_hat = torch.stack([top(v_t, density) for v_t in v])  # (T, N)
    total = v_hat.sum(0)  # (N,)
    gamma = torch.where(total >= 0, 1.0, -1.0)  # (N,)
    agree = v_hat.sign() == gamma  # (T, N): zeros never agree
    tau = (v_hat * agree).sum(0)  # (N,)
    if merge == "mean":
        tau = tau / agree.sum(0).clamp_min(1)
    return unflatten(theta0 + lam * tau, pretrained)


def dare(pretrained: StateDict, finetuned: Sequence[StateDict], drop: float = 0.5, lam: float = 0.3,
         seed: int = 0) -> dict[str, Tensor]:
    """DARE then task arithmetic (arXiv 2311.03099, "DARE: drop and rescale").

        ṽ_t = v_t ⊙ keep_t / (1 − p),  keep_t ~ Bernoulli(1 − p) per entry   (so E[ṽ_t] = v_t)
        θ   = θ0 + λ Σ_t ṽ_t

    The masks come from this function's own torch.Generator(seed): the fast `merging.dare` draws
    its masks per task, per tensor and chunk by chunk from other generators, so the two cannot
    agree bit for bit; they agree in distribution, and exactly at p = 0.
    """
    theta0, v = _flat_vectors(pretrained, finetuned)  # (N,), (T, N)
    gen = torch.Generator().manual_seed(seed)
    keep = torch.rand(v.shape, generator=gen) >= drop  # (T, N): each entry survives with prob 1 − p
    v_tilde = v * keep / (1 - drop)  # (T, N)
    return unflatten(theta0 + lam * v_tilde.sum(0), pretrained)


def post_pruning(pretrained: StateDict, finetuned: Sequence[StateDict],
                 density: float = 0.1) -> list[dict[str, Tensor]]:
    """Post-pruning, per task θ0 + top(v_t, m), no merging (arXiv 2310.01886, BYOM's prune-then-merge baseline).

    The fast path writes θ_t's own values at kept entries; θ0 + (θ_t − θ0) can differ from θ_t
    by float rounding there (about one ulp).
    """
    theta0, v = _flat_vectors(pretrained, finetuned)  # (N,), (T, N)
    return [unflatten(theta0 + top(v_t, density), pretrained) for v_t in v]


def byom_fft(pretrained: StateDict, finetuned: Sequence[StateDict], density: float = 0.1,
             lam: float = 0.3) -> tuple[dict[str, Tensor], list[dict[str, Tensor]]]:
    """BYOM-FFT on task arithmetic (arXiv 2310.01886, "BYOM-FFT").

        θ*  = θ0 + λ Σ_t v_t            merge (any merger; here task arithmetic)
        u_t = θ_t − θ*                  what the merge lost for task t
        θ_t ≈ θ* + top(u_t, m)          keep its m largest-magnitude entries per task

    Returns (θ*, [θ* + top(u_t, m) for each task]). As for post-pruning, the fast path writes
    θ_t's values at kept entries, which θ* + u_t matches up to float rounding.
    """
    merged = task_arithmetic(pretrained, finetuned, lam)  # θ*
    theta_star = flatten(merged)  # (N,)
    u = torch.stack([flatten(ft, like=pretrained) for ft in finetuned]) - theta_star  # (T, N)
    return merged, [unflatten(theta_star + top(u_t, density), pretrained) for u_t in u]


def emr(pretrained: StateDict, finetuned: Sequence[StateDict]) -> list[dict[str, Tensor]]:
    """EMR-Merging: elect, mask & rescale, per task θ0 + s_t·M_t·τ (arXiv 2405.17461, "EMR-Merging").

        γ   = sign(Σ_t v_t)                          0 where the sum is 0 (unlike TIES)
        ε   = max_t |v_t| over tasks with sign v_t = γ
        τ   = γ·ε                                    unified task vector
        M_t = [v_t·τ > 0]                            task t's mask
        s_t = Σ|v_t| / Σ|M_t·τ|                      task t's rescaler, sums over all N parameters

    A task whose mask is empty gets s_t = 0 (θ0 itself), as in the fast path.
    """
    theta0, v = _flat_vectors(pretrained, finetuned)  # (N,), (T, N)
    gamma = v.sum(0).sign()  # (N,)
    agree = v * gamma > 0  # (T, N)
    tau = gamma * (v.abs() * agree).amax(0)  # (N,)
    masks = v * tau > 0  # (T, N): M_t
    masked = (masks * tau).abs().sum(1)  # (T,): Σ|M_t·τ|
    scales = torch.where(masked > 0, v.abs().sum(1) / masked, 0.0)  # (T,): s_t, 0 for an empty mask
    return [unflatten(theta0 + s * m * tau, pretrained) for s, m in zip(scales, masks, strict=True)]


def byom_lora(pretrained: StateDict, lora: Sequence[Mapping[str, tuple[Tensor, Tensor]]],
              rank: int = 4) -> list[dict[str, Tensor]]:
    """BYOM-LoRA, per task θ0 + U_q Σ_q V_qᵀ on each adapted matrix (arXiv 2310.01886, "BYOM-LoRA").

        ΔW_t = B_t A_t = U Σ Vᵀ      (SVD)
        θ_t ≈ θ0 + U_q Σ_q V_qᵀ       the top-q singular triplets

    Done the plain way, from the dense d_out×d_in product; the fast path gets the same triplets
    from the thin factors (QR of each, then the SVD of an r×r core), so they agree up to float
    rounding in the SVD.
    """
    out = []
    for task in lora:
        state = {k: t.clone() for k, t in pretrained.items()}
        for name, (B, A) in task.items():
            U, S, Vh = torch.linalg.svd(B @ A, full_matrices=False)  # (d_out, k), (k,), (k, d_in)
            state[name] = pretrained[name] + U[:, :rank] @ torch.diag(S[:rank]) @ Vh[:rank]
        out.append(state)
    return out
