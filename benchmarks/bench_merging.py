"""Merging speed at real layer shapes: each method against a memory floor and a naive reference.

    python benchmarks/bench_merging.py [--scale small|vitb32|vitl14] [--device cpu|cuda] [--threads 1]

Random weights with the shapes of an open_clip image tower, T = 8 tasks. Every ratio compares
timings taken in this run, on this device, with the same thread count:
  floor  one pass that reads the T+1 models and writes one (θ0 + Σ θ_t, tensor by tensor);
  naive  the reference style: every task vector flattened into one row, `kthvalue` thresholds.
Target: each method <= 5x the floor in wall time (on CPU at ViT-B/32 scale; on GPU at ViT-L/14
scale). Process CPU time ratios are printed too: on a shared machine they are less noisy.
On CPU our methods use the fused kernels when a C compiler is found; BYOM_LAB_NATIVE=0 times the
eager torch path instead. The line "kernels:" says which ran.

On Linux the first touch of freshly mapped memory costs page faults, and whether glibc hands a
freed block back to the kernel or reuses it varies from call to call: the same floor measured
0.3 s or 1.1 s at ViT-B/32 in one session. `--allocator warm` (the default) re-runs the script
with glibc told to keep freed memory (MALLOC_MMAP_THRESHOLD_, MALLOC_TRIM_THRESHOLD_), so every
timing, floor included, sees the same warm heap: the floor is then the memory-bandwidth one.
`--allocator default` leaves glibc alone (timings include page faults, noisily).
"""
import argparse
import gc
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing
from byom_lab import merging  # noqa: E402, I001
from byom_lab.merging import native  # noqa: E402

TARGET = 5.0
WARM_HEAP = {"MALLOC_MMAP_THRESHOLD_": str(32 << 20), "MALLOC_TRIM_THRESHOLD_": str(1 << 40)}


def ensure_allocator(mode: str) -> None:
    """Re-execute this script with glibc keeping freed memory, unless already done or not asked."""
    if mode != "warm" or not sys.platform.startswith("linux"):
        return
    if all(os.environ.get(k) == v for k, v in WARM_HEAP.items()):
        return
    os.execve(sys.executable, [sys.executable, *sys.argv], {**os.environ, **WARM_HEAP})


def vit_shapes(width: int, layers: int, patch: int, grid: int, out_dim: int) -> dict[str, tuple[int, ...]]:
    """Parameter shapes of an open_clip VisionTransformer image tower."""
    shapes = {
        "conv1.weight": (width, 3, patch, patch),
        "class_embedding": (width,),
        "positional_embedding": (grid * grid + 1, width),
        "ln_pre.weight": (width,),
        "ln_pre.bias": (width,),
    }
    for i in range(layers):
        p = f"transformer.resblocks.{i}."
        shapes.update({
            p + "ln_1.weight": (width,), p + "ln_1.bias": (width,),
            p + "attn.in_proj_weight": (3 * width, width), p + "attn.in_proj_bias": (3 * width,),
            p + "attn.out_proj.weight": (width, width), p + "attn.out_proj.bias": (width,),
            p + "ln_2.weight": (width,), p + "ln_2.bias": (width,),
            p + "mlp.c_fc.weight": (4 * width, width), p + "mlp.c_fc.bias": (4 * width,),
            p + "mlp.c_proj.weight": (width, 4 * width), p + "mlp.c_proj.bias": (width,),
        })
    shapes.update({"ln_post.weight": (width,), "ln_post.bias": (width,), "proj": (width, out_dim)})
    return shapes


SCALES = {
    "small": lambda: vit_shapes(768, 2, 32, 7, 512),  # ViT-B/32 layers, 2 blocks (16.9M)
    "vitb32": lambda: vit_shapes(768, 12, 32, 7, 512),  # 87.8M
    "vitl14": lambda: vit_shapes(1024, 24, 14, 16, 768),  # 304M
}


def random_models(shapes, num_tasks: int, device: str, seed: int = 0):
    """θ0 ~ N(0, 0.02²) and θ_t = θ0 + N(0, 0.001²) per task."""
    gen = torch.Generator(device=device).manual_seed(seed)
    pre = {k: torch.randn(s, generator=gen, device=device) * 0.02 for k, s in shapes.items()}
    fts = [{k: v + torch.randn(v.shape, generator=gen, device=device) * 1e-3 for k, v in pre.items()}
           for _ in range(num_tasks)]
    return pre, fts


def timed(fn, repeats: int, device: str, warm_up: bool = True) -> tuple[float, float, object]:
    """Best wall time and best process CPU time of `repeats` calls (after an untimed one), and the last result.

    The untimed call lets the heap grow to what the function needs, so that the timed calls measure
    the work, not the first touch of fresh memory (which costs about 1 ms per MB on these VMs).
    """
    best, best_cpu, out = float("inf"), float("inf"), None
    for _ in range(repeats + warm_up):
        out = None
        gc.collect()
        if device == "cuda":
            torch.cuda.synchronize()
        start, start_cpu = time.perf_counter(), time.process_time()
        out = fn()
        if device == "cuda":
            torch.cuda.synchronize()
        if warm_up:
            warm_up = False
            continue
        best = min(best, time.perf_counter() - start)
        best_cpu = min(best_cpu, time.process_time() - start_cpu)
    return best, best_cpu, out


def floor(pre, fts):
    """Read θ0 and every θ_t once, write one model: the cheapest possible merge."""
    out = {}
    for k, v in pre.items():
        acc = v.clone()
        for ft in fts:
            acc.add_(ft[k])
        out[k] = acc
    return out


# naive reference style: one flattened row per task vector, kthvalue thresholds ------------------

def flat(sd):
    return torch.cat([v.reshape(-1) for v in sd.values()])


def unflat(vec, like):
    out, start = {}, 0
    for k, v in like.items():
        out[k] = vec[start : start + v.numel()].view_as(v)
        start += v.numel()
    return out


def kth_threshold(row, density):
    n = row.numel()
    k = min(n, max(1, round(density * n)))
    return row.abs().kthvalue(n - k + 1).values


def naive_task_arithmetic(pre, fts, lam=0.3):
    base = flat(pre)
    tvs = torch.stack([flat(ft) - base for ft in fts])  # (T, N)
    return unflat(base + lam * tvs.sum(0), pre)


def naive_ties(pre, fts, density=0.2, lam=1.0):
    base = flat(pre)
    tvs = torch.stack([flat(ft) - base for ft in fts])  # (T, N)
    for row in tvs:
        row.mul_(row.abs() >= kth_threshold(row, density))
    sign = torch.where(tvs.sum(0) >= 0, 1.0, -1.0)  # (N,)
    agree = torch.sign(tvs) == sign
    tau = (tvs * agree).sum(0) / agree.sum(0).clamp_min(1)
    return unflat(base + lam * tau, pre)


def naive_sparse(anchor, fts, density):
    base, out = flat(anchor), []
    for ft in fts:
        row = flat(ft)
        u = row - base
        idx = (u.abs() >= kth_threshold(u, density)).nonzero().squeeze(1)
        out.append((idx, row[idx]))
    return out


def naive_post_pruning(pre, fts, density=0.1):
    return naive_sparse(pre, fts, density)


def naive_byom_fft(pre, fts, density=0.1, lam=0.3):
    return naive_sparse(naive_task_arithmetic(pre, fts, lam), fts, density)


METHODS = {
    "task_arithmetic": (lambda p, f: merging.task_arithmetic(p, f, lam=0.3), naive_task_arithmetic),
    "ties": (lambda p, f: merging.ties(p, f, density=0.2), naive_ties),
    "byom_fft": (lambda p, f: merging.byom_fft(p, f, density=0.1), naive_byom_fft),
    "post_pruning": (lambda p, f: merging.post_pruning(p, f, density=0.1), naive_post_pruning),
}


def max_difference(ours, naive, pre) -> float:
    """Largest entry-wise difference between our output and the naive one."""
    if isinstance(ours, dict):
        return max(float((ours[k] - naive[k]).abs().max()) for k in pre)
    return max(float((flat(ours.task_state_dict(t)) - _apply(flat(ours.merged), idx, val)).abs().max())
               for t, (idx, val) in enumerate(naive))


def _apply(vec, idx, val):
    out = vec.clone()
    out[idx] = val
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scale", choices=sorted(SCALES), default="vitb32")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--tasks", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--skip-naive", action="store_true", help="time only our methods and the floor")
    parser.add_argument("--allocator", choices=["warm", "default"], default="warm",
                        help="warm: glibc keeps freed memory, so no timing pays page faults (see the module doc)")
    args = parser.parse_args(argv)
    if argv is None:  # run as a script: the re-executed process parses the same command line
        ensure_allocator(args.allocator)
    torch.set_num_threads(args.threads)
    if args.device == "cuda" and not torch.cuda.is_available():
        print(f"SKIP: --device cuda requested but CUDA is not available ({args.scale} GPU check not run)")
        return 0
    if args.scale == "vitl14" and args.device != "cuda":
        print("SKIP: the ViT-L/14-scale target is a GPU target; run with --device cuda on a GPU machine")
        return 0
    shapes = SCALES[args.scale]()
    pre, fts = random_models(shapes, args.tasks, args.device)
    n = sum(v.numel() for v in pre.values())
    print(f"scale={args.scale} params={n / 1e6:.1f}M tasks={args.tasks} device={args.device} "
          f"threads={torch.get_num_threads()} torch={torch.__version__} allocator={args.allocator}")
    fused = args.device == "cpu" and native.available()
    print(f"kernels: {'fused (byom_lab/merging/native.c)' if fused else 'eager torch'}")
    t_floor, c_floor, _ = timed(lambda: floor(pre, fts), args.repeats, args.device)
    print(f"floor (read {args.tasks + 1} models, write 1): {t_floor:.3f} s wall, {c_floor:.3f} s cpu")
    failed = False
    for name, (ours, naive) in METHODS.items():
        t_ours, c_ours, out = timed(lambda: ours(pre, fts), args.repeats, args.device)
        line = f"{name:16s} {t_ours:7.3f} s  {t_ours / t_floor:5.2f}x floor (cpu time {c_ours / c_floor:5.2f}x)"
        if not args.skip_naive:
            del out
            gc.collect()
            t_naive, _, ref = timed(lambda: naive(pre, fts), 1, args.device, warm_up=False)  # 10-60 s a call
            out = ours(pre, fts)
            line += (f"  naive {t_naive:7.3f} s = {t_naive / t_floor:5.2f}x floor, naive/ours {t_naive / t_ours:5.2f}x"
                     f"  max|ours-naive| {max_difference(out, ref, pre):.1e}")
            del ref
        del out
        ok = t_ours / t_floor <= TARGET
        failed |= not ok
        print(f"{line}  {'PASS' if ok else 'FAIL'} (wall <= {TARGET:.0f}x floor)")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
