"""The `byom-lab` command: prepare a suite, print its table, or run the backbone recipe."""
import argparse
import sys
import time

from byom_lab.merge_cli import add_export_parser, add_merge_parser


def _prepare(args):
    import byom_lab as bl

    suite = bl.load_suite(args.suite)
    parts = suite.info.get("parts", [])
    if parts:
        import pandas as pd

        df = pd.DataFrame(parts)
        df["what"] = df["built"].map({True: "built", False: "loaded"})
        summary = df.groupby(["part", "what"], sort=False).agg(tasks=("task", "count"), seconds=("seconds", "sum"))
        print(summary.round(1).to_string())
    print(f"suite {suite.name!r}: {len(suite.tasks)} tasks ({', '.join(suite.tasks)}) ready in {suite.info['seconds']} s")


def _table(args):
    import pandas as pd

    import byom_lab as bl
    from byom_lab.table import headline_table

    start = time.time()
    suite = bl.load_suite(args.suite)
    table = headline_table(suite, split=args.split, data_methods=args.data_methods)
    with pd.option_context("display.width", 250, "display.max_columns", 30, "display.float_format", "{:.1f}".format):
        if args.data_methods:
            _print_data_methods(table, args.split)
        else:
            print(table.drop(columns=["hyperparameters"]))
        print()
        with pd.option_context("display.max_colwidth", None if args.data_methods else 50):
            print(table["hyperparameters"].to_string())
    if args.reference_settings:
        from byom_lab.adaptation.reference import reference_settings_table

        with pd.option_context("display.width", 250, "display.max_columns", 30, "display.float_format", "{:.1f}".format):
            print("\nEach data-using method at its default and at the reference code's settings (one option away):")
            print(reference_settings_table(suite, split=args.split).to_string())
    if args.csv:
        table.to_csv(args.csv)
    print(f"\n({args.split} accuracy in %, {time.time() - start:.0f} s)")


def _print_data_methods(table, split):
    """The accuracy columns, then the trade: data, steps, seconds, bytes, held-out half."""
    import pandas as pd

    scores = table.drop(columns=["hyperparameters", "family", "data", "steps", "seconds", "held_out_half",
                                 "held_out_normalized", "extra_params_per_task", "extra_bytes_per_task"])
    print(scores)
    print(f"\nThe trade. Test-time rows adapt on the unlabeled test images, as their papers do"
          f"{' (so here they are scored on the images they adapted on)' if split == 'test' else ''}; held_out_half: "
          f"every row scored on the second half of each test split, the test-time rows adapted on the first half only:")
    trade = table[["family", "average", "held_out_half", "steps", "seconds", "extra_params_per_task",
                   "extra_bytes_per_task"]]
    print(trade.to_string())
    print()
    with pd.option_context("display.max_colwidth", None):
        print(table["data"].to_string())


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


def _notebooks(args):
    from byom_lab import lessons

    if not (args.execute or args.student or args.html):
        raise ValueError("say what to do: --execute, --student OUT and/or --html OUT")
    if args.execute:
        paths = args.paths or lessons.series(args.folder)
        for path in paths:
            print(f"running {path} ...", flush=True)
            print(f"  {lessons.execute(path, timeout=args.timeout):.0f} s, outputs stored in {path}", flush=True)
    if args.student:
        written = lessons.write_student_copies(args.student, args.folder)
        print(f"wrote {len(written)} code-along copies (no outputs, solutions removed) to {args.student}")
    if args.html:
        print(f"wrote the HTML site: {lessons.render_site(args.html, args.folder)}")


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
    s.add_argument("--data-methods", action="store_true",
                   help="add the methods that use data (Fisher, RegMean, TALL masks, AdaMerging, Model Tinting) and "
                        "what each used: data, steps, seconds, bytes (slow the first time, cached afterwards)")
    s.add_argument("--reference-settings", action="store_true",
                   help="also run each data-using method at its reference code's settings and print the gap")
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
    s = sub.add_parser("notebooks", help="run the lessons (storing outputs), write code-along copies, render HTML")
    s.add_argument("paths", nargs="*", help="notebooks to run with --execute (default: the whole series)")
    s.add_argument("--folder", default="notebooks", help="the series' folder (default: notebooks)")
    s.add_argument("--execute", action="store_true", help="run each notebook and store its cleaned outputs in place")
    s.add_argument("--timeout", type=int, default=1200, help="seconds allowed per cell with --execute")
    s.add_argument("--student", metavar="OUT", help="write code-along copies (no outputs, no solutions) into OUT")
    s.add_argument("--html", metavar="OUT", help="render the executed series to static HTML with an index page in OUT")
    s.set_defaults(run=_notebooks)
    add_merge_parser(sub)
    add_export_parser(sub)
    args = p.parse_args(argv)
    try:
        args.run(args)
    except (ValueError, FileNotFoundError, FileExistsError, KeyError) as e:
        print(f"byom-lab: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
