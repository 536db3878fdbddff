"""BYOM-LoRA's SVD from the factors against dense SVD of B @ A (what peft does), one run.

    python benchmarks/bench_lora_svd.py [--scale small|vitb32] [--rank 16] [--threads 1]

LoRA factors of rank r on every attention and MLP matrix of a ViT image tower (attn.in_proj,
attn.out_proj, mlp.c_fc, mlp.c_proj). Factored: QR of B and of Aᵀ, SVD of the r×r core
(byom_lab.merging.factored_svd). Dense: torch.linalg.svd(B @ A, full_matrices=False) — the
cheaper variant of peft's call, so the speedup printed is a lower bound. Targets: >= 50x faster,
rank-r reconstructions equal to 1e-5 relative (Frobenius).
"""
import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing
from byom_lab.merging import factored_svd  # noqa: E402

TARGET_SPEEDUP, TARGET_ERROR = 50.0, 1e-5
SCALES = {"small": (768, 2), "vitb32": (768, 12), "vitl14": (1024, 24)}  # (width, layers)


def lora_matrices(width: int, layers: int, rank: int, seed: int = 0) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Random (B, A) for every attention and MLP weight matrix."""
    gen = torch.Generator().manual_seed(seed)
    shapes = {"attn.in_proj_weight": (3 * width, width), "attn.out_proj.weight": (width, width),
              "mlp.c_fc.weight": (4 * width, width), "mlp.c_proj.weight": (width, 4 * width)}
    return {f"transformer.resblocks.{i}.{name}": (torch.randn(d_out, rank, generator=gen) / rank**0.5,
                                                   torch.randn(rank, d_in, generator=gen) * 0.01)
            for i in range(layers) for name, (d_out, d_in) in shapes.items()}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scale", choices=sorted(SCALES), default="vitb32")
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    lora = lora_matrices(*SCALES[args.scale], args.rank)
    print(f"scale={args.scale} matrices={len(lora)} rank={args.rank} threads={torch.get_num_threads()} "
          f"torch={torch.__version__}")
    factored_svd(*next(iter(lora.values())))  # warm up LAPACK
    start = time.perf_counter()
    factored = {name: factored_svd(B, A) for name, (B, A) in lora.items()}
    t_factored = time.perf_counter() - start
    start = time.perf_counter()
    dense = {name: torch.linalg.svd(B @ A, full_matrices=False) for name, (B, A) in lora.items()}
    t_dense = time.perf_counter() - start
    worst, worst_sv = 0.0, 0.0
    r = args.rank
    for name, (B, A) in lora.items():
        U, S, V = factored[name]
        u, s, vh = dense[name]
        ours = (U * S) @ V.T
        theirs = (u[:, :r] * s[:r]) @ vh[:r]
        scale = torch.linalg.matrix_norm(B.double() @ A.double())
        worst = max(worst, float(torch.linalg.matrix_norm((ours - theirs).double()) / scale))
        worst_sv = max(worst_sv, float(((S - s[:r]).abs() / s[0]).max()))
    speedup = t_dense / t_factored
    print(f"factored SVD {t_factored:.4f} s   dense SVD of B@A {t_dense:.3f} s   speedup {speedup:.0f}x  "
          f"{'PASS' if speedup >= TARGET_SPEEDUP else 'FAIL'} (>= {TARGET_SPEEDUP:.0f}x)")
    print(f"max relative reconstruction difference {worst:.2e} (singular values {worst_sv:.2e})  "
          f"{'PASS' if worst <= TARGET_ERROR else 'FAIL'} (<= {TARGET_ERROR:.0e})")
    return 0 if speedup >= TARGET_SPEEDUP and worst <= TARGET_ERROR else 1


if __name__ == "__main__":
    sys.exit(main())
