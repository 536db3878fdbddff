"""Widget responsiveness: re-evaluating the tiny suite after the m% slider moves.

Target (issue 4): after the first call, a new m re-evaluates all 8 tasks in <= 1 s median on
2 CPU cores. Baseline measured in the same run: the naive path (merging.byom_fft from scratch +
bl.evaluate on the full test split) for the same m values.

    python benchmarks/bench_widget.py [--limit 100] [--repeats 5]
"""
import argparse
import statistics
import time

import byom_lab as bl
from byom_lab import merging
from byom_lab.precomputed import FastByom, byom_accuracies

M_VALUES = [0.5, 1, 2, 5, 10, 20]


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--suite", default="tiny")
    p.add_argument("--limit", type=int, default=40, help="test images per task the panel evaluates")
    p.add_argument("--repeats", type=int, default=1)
    args = p.parse_args()
    suite = bl.load_suite(args.suite)
    fast = FastByom(suite, lam=0.3)
    start = time.perf_counter()
    byom_accuracies(fast, 5, limit=args.limit)
    first = time.perf_counter() - start
    moves = []
    for _ in range(args.repeats):
        for m in M_VALUES:
            start = time.perf_counter()
            byom_accuracies(fast, m, limit=args.limit)
            moves.append(time.perf_counter() - start)
    naive = []
    for m in M_VALUES[:3]:
        start = time.perf_counter()
        bl.evaluate(suite, merging.byom_fft(suite.pretrained, suite.finetuned, density=m / 100, lam=0.3))
        naive.append(time.perf_counter() - start)
    med, base = statistics.median(moves), statistics.median(naive)
    print(f"first call (sorts magnitudes once): {first:.2f} s")
    print(f"slider move, {len(suite.tasks)} tasks x {args.limit} images: median {med:.3f} s over {len(moves)} moves")
    print(f"naive (merge from scratch + full test split): median {base:.2f} s; speed-up x{base / med:.1f}")
    print(f"{'PASS' if med <= 1.0 else 'FAIL'}: median slider move <= 1 s")


if __name__ == "__main__":
    main()
