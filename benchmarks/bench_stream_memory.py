"""Peak extra memory of merging safetensors checkpoints streamed from disk, for T = 2, 4, 8.

    python benchmarks/bench_stream_memory.py [--scale small|vitb32] [--threads 1] [--methods NAME ...]

Writes θ0 and 8 fine-tuned checkpoints (random weights, ViT image-tower shapes) to a temporary
directory, then runs each merge in a fresh subprocess: RSS after imports is the baseline, the
peak RSS (VmHWM, or getrusage ru_maxrss) after the merge minus the baseline is the extra memory. Target:
extra <= 3x one checkpoint, independent of T; BYOM-FFT and post-pruning (written as BYOM
directories) may add the kept entries of one task (int32 index + float32 value each). On Linux the
peak is reset after the imports (/proc/self/clear_refs), so import-time spikes do not count.
"""
import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing
from bench_merging import SCALES  # noqa: E402

TARGET = 3.0
DENSITY = 0.05  # m of BYOM-FFT and post-pruning
METHODS = {  # name -> (merge, density of the entries kept per task, or 0)
    "task_arithmetic": (lambda m, pre, fts, out: m.task_arithmetic_files(pre, fts, out, lam=0.3), 0),
    "ties (global)": (lambda m, pre, fts, out: m.ties_files(pre, fts, out, density=0.2), 0),
    "byom_fft (m=5%)": (lambda m, pre, fts, out: m.byom_fft_files(pre, fts, out, density=DENSITY, lam=0.3), DENSITY),
    "post_pruning (m=5%)": (lambda m, pre, fts, out: m.post_pruning_files(pre, fts, out, density=DENSITY), DENSITY),
}


def peak_rss(reset: bool = False) -> int:
    """The process's peak RSS in bytes; reset=True restarts the peak from the current RSS (Linux)."""
    status = Path("/proc/self/status")
    if status.exists():
        if reset:
            Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS
        line = next(x for x in status.read_text().splitlines() if x.startswith("VmHWM:"))
        return int(line.split()[1]) * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux, no reset


def child(directory: str, num_tasks: int, method: str) -> None:
    """Run one streamed merge and print baseline and peak RSS (bytes) as JSON."""
    import psutil

    from byom_lab import merging

    baseline = psutil.Process().memory_info().rss
    before = peak_rss(reset=True)
    pre = os.path.join(directory, "pretrained.safetensors")
    fts = [os.path.join(directory, f"task{t}.safetensors") for t in range(num_tasks)]
    out = os.path.join(directory, f"out_{list(METHODS).index(method)}_{num_tasks}")
    METHODS[method][0](merging, pre, fts, out)
    print(json.dumps({"baseline": baseline, "peak": peak_rss(), "peak_before_reset": before}))


def write_checkpoints(directory: Path, shapes, num_tasks: int) -> int:
    """θ0 and num_tasks fine-tuned checkpoints, one in memory at a time; returns one file's size."""
    from safetensors.torch import save_file

    gen = torch.Generator().manual_seed(0)
    pre = {k: torch.randn(s, generator=gen) * 0.02 for k, s in shapes.items()}
    save_file(pre, directory / "pretrained.safetensors")
    for t in range(num_tasks):
        save_file({k: v + torch.randn(v.shape, generator=gen) * 1e-3 for k, v in pre.items()},
                  directory / f"task{t}.safetensors")
    return sum(v.numel() * v.element_size() for v in pre.values()), sum(v.numel() for v in pre.values())


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scale", choices=["small", "vitb32"], default="vitb32")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--methods", nargs="+", choices=list(METHODS), default=list(METHODS), metavar="NAME",
                        help=f"which merges to measure (default: all of {', '.join(METHODS)})")
    parser.add_argument("--child", nargs=3, metavar=("DIR", "T", "METHOD"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.child:
        child(args.child[0], int(args.child[1]), args.child[2])
        return 0
    failed = False
    with tempfile.TemporaryDirectory() as tmp:
        size, params = write_checkpoints(Path(tmp), SCALES[args.scale](), 8)
        print(f"scale={args.scale} checkpoint={size / 2**20:.0f} MiB threads={args.threads}")
        env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
        for method in args.methods:
            kept = round(METHODS[method][1] * params) * 8  # one task's kept entries: int32 index + float32 value
            target = TARGET * size + kept
            ratios = []
            for num_tasks in (2, 4, 8):
                run = subprocess.run([sys.executable, __file__, "--threads", str(args.threads), "--child", tmp,
                                      str(num_tasks), method], capture_output=True, text=True, env=env, check=True)
                rss = json.loads(run.stdout.strip().splitlines()[-1])
                extra = rss["peak"] - rss["baseline"]
                ratios.append(extra / size)
                ok = extra <= target
                failed |= not ok
                goal = f"{TARGET:.0f}x" + (f" + kept entries {kept / 2**20:.1f} MiB" if kept else "")
                print(f"{method:20s} T={num_tasks}: peak extra RSS {extra / 2**20:7.1f} MiB = {ratios[-1]:.2f}x "
                      f"one checkpoint  {'PASS' if ok else 'FAIL'} (<= {goal})")
            print(f"{method:20s} ratio spread over T = 2, 4, 8: {min(ratios):.2f}x .. {max(ratios):.2f}x")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
