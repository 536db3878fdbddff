"""`byom-lab merge` and `byom-lab export`: checkpoint files in, BYOM files out, one task's full model back."""
import argparse
import functools
import inspect
import sys
from pathlib import Path

import yaml

# method options: name -> type; `base_density` is the density of a base merger (TIES under BYOM-FFT)
OPTIONS = {"density": float, "base": str, "scope": str, "lam": float, "merge": str, "drop": float, "seed": int,
           "rank": int, "base_density": float}
SETTINGS = ("method", "pretrained", "finetuned", "lora", "tasks", "out", "force", "allow_pickle", *OPTIONS)
INPUTS = ("pretrained", "finetuned", "lora")  # a method's parameters that are its inputs
MERGE_HELP = """examples:
  byom-lab merge --method byom_fft --density 0.05 --base task_arithmetic --lam 0.3 \\
      --pretrained base.safetensors --finetuned a.safetensors b.safetensors c.safetensors --out merged/
  byom-lab merge --config run.yaml --density 0.1      # the file's settings, density overridden
  byom-lab merge --method byom_lora --rank 4 --pretrained base.safetensors --lora a/ b/ --out merged/

run.yaml holds the same settings, e.g.
  method: byom_fft
  density: 0.05            # m as a fraction: m = 5% is 0.05
  lam: 0.3
  pretrained: base.safetensors
  finetuned: [a.safetensors, b.safetensors, c.safetensors]
  out: merged/
Relative paths in it are read from the file's folder."""


def add_merge_parser(sub) -> None:
    """Add the `merge` subcommand to the `byom-lab` subparsers."""
    p = sub.add_parser("merge", help="merge checkpoint files into BYOM files: a shared model + a small file per task",
                       description=__doc__, epilog=MERGE_HELP, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", metavar="YAML", help="settings file (the long options, '_' for '-'); flags override it")
    p.add_argument("--method", help="a registered data-free method (byom_lab.merging.list_methods())")
    p.add_argument("--pretrained", metavar="PATH", help="θ0: safetensors, open_clip or .pt file, or HF CLIP folder")
    p.add_argument("--finetuned", nargs="+", metavar="PATH", help="one fine-tuned checkpoint per task")
    p.add_argument("--lora", nargs="+", metavar="PATH", help="one LoRA adapter per task (byom-lab or peft format)")
    p.add_argument("--tasks", nargs="+", metavar="NAME", help="task names (default: the file or folder names)")
    p.add_argument("--out", metavar="DIR", help="the result directory to create")
    p.add_argument("--force", action="store_true", default=None, help="replace an existing result directory")
    p.add_argument("--allow-pickle", action="store_true", default=None,
                   help="read pickled checkpoints (runs code from the file: only for files you trust)")
    p.add_argument("--density", type=float, help="m as a fraction in (0, 1]: m = 5%% is 0.05")
    p.add_argument("--base", help="base merger of byom_fft / dare (e.g. task_arithmetic, ties); byom_lora: "
                                  "pretrained or merged")
    p.add_argument("--scope", choices=["global", "tensor"], help="rank magnitudes per task or per tensor")
    p.add_argument("--lam", type=float, help="λ of task arithmetic / TIES (also as a base merger)")
    p.add_argument("--merge", choices=["mean", "sum"], help="TIES: mean or sum over agreeing tasks")
    p.add_argument("--drop", type=float, help="DARE drop probability in [0, 1)")
    p.add_argument("--seed", type=int, help="DARE seed")
    p.add_argument("--rank", type=int, help="BYOM-LoRA: q, singular triplets kept per matrix")
    p.add_argument("--base-density", type=float, help="density of a TIES base merger, as a fraction")
    p.set_defaults(run=run_merge)


def add_export_parser(sub) -> None:
    """Add the `export` subcommand to the `byom-lab` subparsers."""
    p = sub.add_parser("export", help="rebuild one task's full model from BYOM files, stored like the inputs",
                       description="Rebuild one task's full model from a result directory; an HF CLIP folder "
                                   "input gives an HF CLIP folder, a safetensors input a file with its keys.")
    p.add_argument("directory", help="a result directory written by `byom-lab merge`")
    p.add_argument("--task", help="task name, as listed in the manifest")
    p.add_argument("-o", "--output", required=True, help="file (or HF CLIP folder) to write")
    p.add_argument("--force", action="store_true", help="replace an existing output")
    p.set_defaults(run=run_export)


def read_config(path) -> dict:
    """Settings from a YAML file: known keys only, list settings as lists, paths relative to the file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"config file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ValueError(f"{path} is not valid YAML: {e}") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path} must hold a mapping of settings, not a {type(data).__name__}")
    data = {str(k).replace("-", "_"): v for k, v in data.items()}
    unknown = sorted(set(data) - set(SETTINGS))
    if unknown:
        raise ValueError(f"{path}: unknown setting {unknown[0]!r}; valid settings: {', '.join(SETTINGS)}")
    for key in ("finetuned", "lora", "tasks"):
        if key in data and not isinstance(data[key], list):
            data[key] = [data[key]]
    here = lambda p: str(p) if Path(p).is_absolute() else str(path.parent / p)  # noqa: E731
    for key in ("pretrained", "out"):
        if key in data:
            data[key] = here(data[key])
    for key in ("finetuned", "lora"):
        if key in data:
            data[key] = [here(p) for p in data[key]]
    return data


def settings(args) -> dict:
    """The run's settings: those of --config, overridden by every flag given on the command line."""
    given = {k: v for k, v in vars(args).items() if k in SETTINGS and v is not None}
    return {**(read_config(args.config) if args.config else {}), **given}


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def method_options(method: str, s: dict) -> tuple[dict, dict]:
    """(the method's own options, options it hands to its base merger) from the settings; misplaced ones raise."""
    from byom_lab.merging import get_method

    params = inspect.signature(get_method(method)).parameters
    own = [n for n, p in params.items() if n not in INPUTS and p.kind is not p.VAR_KEYWORD]
    takes_more = any(p.kind is p.VAR_KEYWORD for p in params.values())
    given = {k: s[k] for k in OPTIONS if k in s}
    kwargs = {k: v for k, v in given.items() if k in own}
    rest = {("density" if k == "base_density" else k): v for k, v in given.items() if k not in own}
    if rest and not takes_more:
        name = next(k for k in given if k not in own)
        raise ValueError(f"{_flag(name)} does not apply to {method} (its options: "
                         f"{', '.join(map(_flag, own)) or 'none'})")
    if set(rest) & set(own):  # an option of the base merger named like one of the method's (TIES's density)
        kwargs["base"] = functools.partial(get_method(kwargs.get("base", params["base"].default)), **rest)
        rest = {}
    return kwargs, rest


def default_names(paths) -> list[str]:
    """Task names from the inputs: file stems, folder names."""
    return [Path(p).name if Path(p).is_dir() else Path(p).stem for p in paths]


def _require(s: dict, key: str) -> object:
    if not s.get(key):
        raise ValueError(f"{_flag(key)} is required (on the command line or in --config)")
    return s[key]


def run_merge(args) -> None:
    """`byom-lab merge`: read the inputs, merge (streamed where the method allows), write, report."""
    from tqdm import tqdm

    from byom_lab.merging import checks, files, get_method, list_methods
    from byom_lab.merging.registry import method_inputs
    from byom_lab.merging.storage import check_replaceable, task_names
    from byom_lab.merging.streaming import check_layouts
    from byom_lab.tower_files import open_tower

    import byom_lab.adaptation  # noqa: F401  (registers the test-time methods, so that naming one gets the message below)

    s = settings(args)
    method, out = _require(s, "method"), Path(_require(s, "out"))
    get_method(method)
    kind = method_inputs(method)  # "finetuned" or "lora"; methods fed with statistics of data are not data-free
    if kind not in ("finetuned", "lora"):
        free = [m for m in list_methods() if method_inputs(m) in ("finetuned", "lora")]
        needs = "statistics of training images" if kind == "statistics" else "unlabeled test images"
        raise ValueError(f"{method} needs {needs}, which checkpoint files alone do not give; "
                         f"byom-lab merge runs the data-free methods: {', '.join(free)}")
    other = "lora" if kind == "finetuned" else "finetuned"
    if s.get(other):
        raise ValueError(f"{method} merges {kind} checkpoints: give {_flag(kind)}, not {_flag(other)}")
    paths = _require(s, kind)
    kwargs, base_options = method_options(method, s)
    for value in (kwargs.get("density"), base_options.get("density")):
        if value is not None:
            checks.check_density(value)
    check_replaceable(out, bool(s.get("force")))
    names = task_names(s.get("tasks") or default_names(paths), len(paths))
    pre = open_tower(_require(s, "pretrained"), bool(s.get("allow_pickle")))
    models = [open_tower(p, bool(s.get("allow_pickle")), fallback=pre) for p in paths] if kind == "finetuned" else []
    if models:
        check_layouts(pre, models)
    record = _inputs_record(pre, models, paths, kind, s)
    common = dict(tasks=names, overwrite=bool(s.get("force")), inputs=record)
    streamed = kind == "finetuned" and files.streams(method, kwargs.get("base", "task_arithmetic"))
    n, t = len(pre.layout), len(paths)
    total = n * (1 if method in files.FAMILY else 1 + t) if streamed else n * (1 + len(models))
    with tqdm(total=total, unit="tensor", desc=method, file=sys.stderr, dynamic_ncols=True) as bar:
        progress = lambda label: (bar.set_postfix_str(label[-40:], refresh=False), bar.update())  # noqa: E731
        if streamed and method == "byom_fft":
            files.byom_fft_files(pre, models, out, progress=progress, **common, **kwargs, **base_options)
        elif streamed and method == "post_pruning":
            files.post_pruning_files(pre, models, out, progress=progress, **common, **kwargs)
        elif streamed:
            files.family_files(method, pre, models, out, progress=progress, **common, **kwargs, **base_options)
        else:
            _merge_in_memory(method, pre, models, paths, kwargs, base_options, out, common, progress)
    print(report(out))


def _merge_in_memory(method, pre, models, paths, kwargs, base_options, out, common, progress) -> None:
    """Load every input, run the registered method, save its result (or merged state dict)."""
    from byom_lab.merging import get_method
    from byom_lab.merging.storage import save_result
    from byom_lab.tower_files import read_lora

    def load(reader):
        return {k: _ticked(reader.get(k), progress, k) for k in reader.layout}

    pretrained = load(pre)
    inputs = [load(m) for m in models] if models else [read_lora(p, pretrained) for p in paths]
    result = get_method(method)(pretrained, inputs, **kwargs, **base_options)
    plain = isinstance(result, dict)
    save_result(result, out, method=method, hyperparameters={**kwargs, **base_options} if plain else None, **common)


def _ticked(tensor, progress, label):
    progress(label)
    return tensor


def _inputs_record(pre, models, paths, kind, s) -> dict:
    """What went in: the formats exports mirror (one per task), every input file's sha256, the settings."""
    from byom_lab.merging.storage import sha256_file
    from byom_lab.tower_files import lora_files

    if models:
        inputs = [m.sha256() for m in models]
    else:
        inputs = [{"path": str(p), "sha256": {f.name: sha256_file(f) for f in lora_files(p)}} for p in paths]
    config = {k: v for k, v in s.items() if k != "force"}
    formats = [m.fmt for m in models] if models else [pre.fmt] * len(paths)
    return {"format": (models[0] if models else pre).fmt, "formats": formats, "pretrained": pre.sha256(), kind: inputs,
            "config": config}


def _size(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024


def report(out) -> str:
    """What a result directory stores: the shared model, extra bytes per task, ratio to keeping every model."""
    from byom_lab.merging.storage import read_manifest

    m = read_manifest(out, verify=False)
    tasks, per_task, model = m["tasks"], m["bytes_per_task"], m["model_bytes"]
    lines = [f"{m['method']}: {len(tasks)} tasks -> {out}",
             f"shared: {_size(m['shared_bytes'])} ({m['shared_bytes']:,} bytes; one model is {model:,})"]
    if per_task:
        mean = sum(per_task) / len(per_task)
        lines.append(f"extra bytes per task: {mean:,.0f} on average ({mean / model:.2%} of one model): "
                     + ", ".join(f"{name} {b:,}" for name, b in zip(tasks, per_task)))
    if tasks:
        stored, every = m["shared_bytes"] + sum(per_task), len(tasks) * model
        lines.append(f"stored: {_size(stored)} vs {_size(every)} keeping all {len(tasks)} models "
                     f"(ratio {stored / every:.3f})")
    return "\n".join(lines)


def run_export(args) -> None:
    """`byom-lab export`: one task's full model, written the way the inputs were stored."""
    from byom_lab.merging.storage import load_result, read_manifest
    from byom_lab.tower_files import PLAIN, write_tower

    output = Path(args.output)
    if output.exists() and not args.force:
        raise FileExistsError(f"{output} already exists; pass --force to replace it")
    manifest = read_manifest(args.directory, verify=False)
    tasks = manifest["tasks"]
    if args.task not in tasks and not (args.task is None and manifest["kind"] == "merged"):
        raise ValueError(f"task {args.task!r} is not in {args.directory}; its tasks: {', '.join(tasks) or 'none'}")
    result = load_result(args.directory)  # checks every sha256
    state = result if isinstance(result, dict) else result.task_state_dict(tasks.index(args.task))
    inputs = manifest.get("inputs") or {}
    formats = inputs.get("formats") or []
    index = tasks.index(args.task) if args.task in tasks else None
    fmt = (formats[index] if index is not None and index < len(formats) else inputs.get("format")) or PLAIN
    write_tower(state, fmt, output, overwrite=args.force)
    print(f"wrote {output}: task {args.task} of {manifest['method']}, as {fmt['kind']}")
