"""The `byom-lab` command: prepare a suite, print its table, or run the backbone recipe."""
import argparse
import sys
import time


def _prepare(args):
    import byom_lab as bl

    suite = bl.load_suite(args.suite)
    print(f"suite {suite.name!r}: {len(suite.tasks)} tasks ({', '.join(suite.tasks)}) ready in {suite.info['seconds']} s")


def _table(args):
    import pandas as pd

    import byom_lab as bl
    from byom_lab.table import headline_table

    start = time.time()
    suite = bl.load_suite(args.suite)
    table = headline_table(suite, split=args.split)
    with pd.option_context("display.width", 250, "display.max_columns", 30, "display.float_format", "{:.1f}".format):
        print(table.drop(columns=["hyperparameters"]))
        print()
        print(table["hyperparameters"].to_string())
    if args.csv:
        table.to_csv(args.csv)
    print(f"\n({args.split} accuracy in %, {time.time() - start:.0f} s)")


def _pretrain(args):
    from byom_lab import manifest as mf
    from byom_lab.tiny.pretrain import PretrainConfig, pretrain

    out = args.out or mf.asset_path("tiny-clip")
    pretrain(PretrainConfig(steps=args.steps, batch_size=args.batch_size, seed=args.seed), out, device=args.device)
    sha = mf.sha256_file(out)
    print(f"wrote {out} (sha256 {sha})")
    if args.write_manifest:
        mf.record_asset_sha256("tiny-clip", sha)
        print("recorded the sha256 in data_manifest.yaml")


def _clean_notebooks(args):
    from pathlib import Path

    from byom_lab.nbclean import clean_file

    paths = args.paths or sorted(Path("notebooks").glob("*.ipynb"))
    for path in paths:
        print(f"{'cleaned' if clean_file(path) else 'clean  '} {path}")


def main(argv=None):
    p = argparse.ArgumentParser(prog="byom-lab", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)
    s = sub.add_parser("prepare", help="build (first time) or load a suite")
    s.add_argument("--suite", default="tiny")
    s.set_defaults(run=_prepare)
    s = sub.add_parser("table", help="print the main results table of a suite")
    s.add_argument("--suite", default="tiny")
    s.add_argument("--split", default="test", choices=["val", "test"])
    s.add_argument("--csv", help="also write the table to this CSV file")
    s.set_defaults(run=_table)
    s = sub.add_parser("pretrain", help="pretrain the tiny CLIP backbone (the recipe of the shipped asset)")
    s.add_argument("--steps", type=int, default=1400)
    s.add_argument("--batch-size", type=int, default=256)
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--device", default="cpu")
    s.add_argument("--out", help="output file (default: the asset path from data_manifest.yaml)")
    s.add_argument("--write-manifest", action="store_true", help="record the new sha256 in data_manifest.yaml")
    s.set_defaults(run=_pretrain)
    s = sub.add_parser("clean-notebooks", help="drop execution counts and volatile metadata from notebooks")
    s.add_argument("paths", nargs="*")
    s.set_defaults(run=_clean_notebooks)
    args = p.parse_args(argv)
    try:
        args.run(args)
    except (ValueError, FileNotFoundError, KeyError) as e:
        print(f"byom-lab: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
