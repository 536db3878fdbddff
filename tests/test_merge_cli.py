"""`byom-lab merge` and `byom-lab export` in-process: files in, BYOM files out, bad inputs explained."""
import copy
import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from byom_lab import merging as M
from byom_lab.cli import main
from byom_lab.merging.registry import method_inputs
from byom_lab.paper import checkpoints as pc


pytestmark = pytest.mark.usefixtures("one_thread")  # merging results are compared bit for bit


def make_models(num_tasks=3, seed=0):
    gen = torch.Generator().manual_seed(seed)
    pre = {k: torch.randn(s, generator=gen) for k, s in {"w": (6, 5), "b": (7,), "conv": (2, 3, 2, 2)}.items()}
    fts = [{k: v + 0.1 * torch.randn(v.shape, generator=gen) for k, v in pre.items()} for _ in range(num_tasks)]
    return pre, fts


@pytest.fixture
def files(tmp_path):
    """θ0 and three fine-tuned models as safetensors files a, b, c (plus the state dicts)."""
    pre, fts = make_models()
    save_file(pre, tmp_path / "base.safetensors")
    paths = []
    for name, ft in zip("abc", fts):
        paths.append(str(tmp_path / f"{name}.safetensors"))
        save_file(ft, paths[-1])
    return tmp_path, pre, fts, [str(tmp_path / "base.safetensors"), *paths]


def merge(capsys, *args):
    """(return code, stdout, stderr) of `byom-lab merge ...`."""
    rc = main(["merge", *map(str, args)])
    out, err = capsys.readouterr()
    return rc, out, err


def same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_merge_then_export_end_to_end(files, capsys):
    tmp, pre, fts, (base, *paths) = files
    rc, out, err = merge(capsys, "--method", "byom_fft", "--density", "0.2", "--base", "task_arithmetic", "--lam",
                         "0.3", "--pretrained", base, "--finetuned", *paths, "--out", tmp / "merged")
    assert rc == 0, err
    expected = M.byom_fft(pre, fts, density=0.2, lam=0.3)
    assert "extra bytes per task: " in out and f"a {expected.nbytes(0):,}" in out
    ratio = (sum(v.nbytes for v in pre.values()) + sum(expected.nbytes(t) for t in range(3))) / \
        (3 * sum(v.nbytes for v in pre.values()))
    assert f"(ratio {ratio:.3f})" in out
    assert "12/12" in err  # the progress bar ran over every tensor: 3 merged + 3 tasks x 3
    manifest = json.loads((tmp / "merged" / "manifest.json").read_text())
    assert manifest["tasks"] == ["a", "b", "c"]
    assert manifest["inputs"]["finetuned"][1] == {"path": paths[1], "sha256": M.storage.sha256_file(paths[1])}
    rc = main(["export", str(tmp / "merged"), "--task", "b", "-o", str(tmp / "b_out.safetensors")])
    assert rc == 0
    assert same(load_file(tmp / "b_out.safetensors"), expected.task_state_dict(1))


OPTIONS = {
    "byom_fft": ["--density", "0.3", "--base", "ties", "--base-density", "0.5", "--lam", "0.9"],
    "dare": ["--drop", "0.3", "--seed", "2", "--lam", "0.5"],
    "emr": [],
    "post_pruning": ["--density", "0.3", "--scope", "tensor"],
    "simple_average": [],
    "task_arithmetic": ["--lam", "0.4"],
    "ties": ["--density", "0.4", "--merge", "sum"],
}
EXPECTED = {
    "byom_fft": lambda pre, fts: M.byom_fft(pre, fts, density=0.3, base=lambda p, f: M.ties(p, f, 0.5, 0.9)),
    "dare": lambda pre, fts: M.dare(pre, fts, drop=0.3, seed=2, lam=0.5),
    "emr": M.emr,
    "post_pruning": lambda pre, fts: M.post_pruning(pre, fts, density=0.3, scope="tensor"),
    "simple_average": M.simple_average,
    "task_arithmetic": lambda pre, fts: M.task_arithmetic(pre, fts, lam=0.4),
    "ties": lambda pre, fts: M.ties(pre, fts, density=0.4, merge="sum"),
}


@pytest.mark.parametrize("method", [m for m in M.list_methods() if method_inputs(m) == "finetuned"])
def test_every_data_free_method_runs_on_files(method, files, capsys):
    tmp, pre, fts, (base, *paths) = files
    rc, out, err = merge(capsys, "--method", method, *OPTIONS.get(method, []), "--pretrained", base,
                         "--finetuned", *paths, "--out", tmp / "out")
    assert rc == 0, err
    got, expected = M.load_result(tmp / "out"), EXPECTED.get(method, M.get_method(method))(pre, fts)
    if isinstance(expected, dict):
        assert same(got, expected) and "extra bytes per task" not in out
    else:
        assert all(same(got.task_state_dict(t), expected.task_state_dict(t)) for t in range(3))
    assert "keeping all 3 models" in out


def test_settings_from_yaml_with_flags_overriding(files, capsys):
    tmp, pre, fts, _ = files
    (tmp / "run.yaml").write_text("method: byom_fft\ndensity: 0.5\nlam: 0.6\npretrained: base.safetensors\n"
                                  "finetuned: [a.safetensors, b.safetensors]\ntasks: [first, second]\nout: merged\n")
    rc, out, err = merge(capsys, "--config", tmp / "run.yaml", "--density", "0.25")
    assert rc == 0, err
    got, expected = M.load_result(tmp / "merged"), M.byom_fft(pre, fts[:2], density=0.25, lam=0.6)
    assert all(same(got.task_state_dict(t), expected.task_state_dict(t)) for t in range(2))
    manifest = json.loads((tmp / "merged" / "manifest.json").read_text())
    assert manifest["tasks"] == ["first", "second"] and manifest["inputs"]["config"]["density"] == 0.25
    (tmp / "bad.yaml").write_text("method: byom_fft\ndensty: 0.1\n")
    rc, _, err = merge(capsys, "--config", tmp / "bad.yaml")
    assert rc == 2 and "bad.yaml: unknown setting 'densty'" in err


def test_byom_lora_from_own_and_peft_adapters(tmp_path, capsys):
    gen = torch.Generator().manual_seed(1)
    pre = {"fc.weight": torch.randn(6, 5, generator=gen), "fc.bias": torch.randn(6, generator=gen)}
    save_file(pre, tmp_path / "base.safetensors")
    own = {"fc.weight::B": torch.randn(6, 3, generator=gen), "fc.weight::A": torch.randn(3, 5, generator=gen)}
    save_file(own, tmp_path / "a_lora.safetensors")
    (tmp_path / "peft").mkdir()
    peft = {"base_model.model.fc.lora_B.weight": torch.randn(6, 3, generator=gen),
            "base_model.model.fc.lora_A.weight": torch.randn(3, 5, generator=gen)}
    save_file(peft, tmp_path / "peft" / "adapter_model.safetensors")
    (tmp_path / "peft" / "adapter_config.json").write_text(json.dumps({"r": 3, "lora_alpha": 6}))
    rc, out, err = merge(capsys, "--method", "byom_lora", "--rank", "2", "--pretrained", tmp_path / "base.safetensors",
                         "--lora", tmp_path / "a_lora.safetensors", tmp_path / "peft", "--out", tmp_path / "lora")
    assert rc == 0, err
    lora = [{"fc.weight": (own["fc.weight::B"], own["fc.weight::A"])},
            {"fc.weight": (2 * peft["base_model.model.fc.lora_B.weight"], peft["base_model.model.fc.lora_A.weight"])}]
    expected, got = M.byom_lora(pre, lora, rank=2), M.load_result(tmp_path / "lora")
    assert all(same(got.task_state_dict(t), expected.task_state_dict(t)) for t in range(2))
    assert json.loads((tmp_path / "lora" / "manifest.json").read_text())["tasks"] == ["a_lora", "peft"]
    assert "extra bytes per task: 96 on average" in out  # q (d_out + d_in + 1) = 2 x 12 float32 numbers


def test_pickled_checkpoints_only_with_allow_pickle(files, capsys):
    tmp, pre, fts, (base, *paths) = files
    module = torch.nn.Module()
    for key, value in fts[0].items():
        module.register_parameter(key, torch.nn.Parameter(value))
    torch.save(module, tmp / "a.pt")  # a whole module: unpickling runs code
    args = ["--method", "task_arithmetic", "--pretrained", base, "--finetuned", tmp / "a.pt", paths[1],
            "--out", tmp / "out"]
    rc, _, err = merge(capsys, *args)
    assert rc == 2 and "a.pt holds pickled Python objects" in err and not (tmp / "out").exists()
    rc, _, err = merge(capsys, *args, "--allow-pickle")
    assert rc == 0, err
    assert same(M.load_result(tmp / "out"), M.task_arithmetic(pre, fts[:2]))


# real formats: a tiny open_clip image tower as HF CLIP folders and open_clip safetensors ------------

@pytest.fixture(scope="module")
def clip(small_clip):
    return small_clip.model


def towers(clip):
    tower = {k: v.detach().clone() for k, v in clip.visual.state_dict().items()}
    gens = [torch.Generator().manual_seed(s) for s in (1, 2)]
    return tower, [{k: v + 0.02 * torch.randn(v.shape, generator=g) for k, v in tower.items()} for g in gens]


def test_hf_clip_folders_export_as_hf_clip_folders(clip, tmp_path, capsys):
    tower, fts = towers(clip)
    save_file({f"visual.{k}": v for k, v in tower.items()} | {"logit_scale": torch.tensor(4.6)},
              tmp_path / "open_clip_model.safetensors")  # θ0: a whole open_clip CLIP
    config = pc.hf_vision_config(clip.visual, quick_gelu=True)
    folders = [pc.save_hf_folder(ft, tmp_path / name, config) for ft, name in zip(fts, ("cars", "dtd"))]
    rc, _, err = merge(capsys, "--method", "byom_fft", "--density", "0.1", "--pretrained",
                       tmp_path / "open_clip_model.safetensors", "--finetuned", *folders, "--out", tmp_path / "m")
    assert rc == 0, err
    assert main(["export", str(tmp_path / "m"), "--task", "dtd", "-o", str(tmp_path / "dtd_out")]) == 0
    state, fmt = pc.load_checkpoint(tmp_path / "dtd_out", tower)
    expected = M.byom_fft(tower, fts, density=0.1).task_state_dict(1)
    assert fmt == "hugging face clip folder" and same(state, expected)
    assert json.loads((tmp_path / "dtd_out" / "config.json").read_text()) == config
    written, given = (load_file(folder / "model.safetensors") for folder in (tmp_path / "dtd_out", folders[1]))
    assert written.keys() == given.keys()


def test_hf_files_without_projection_borrow_it_and_export_with_their_keys(clip, tmp_path, capsys):
    from byom_lab.tower_files import open_tower

    tower, fts = towers(clip)
    save_file(tower, tmp_path / "base.safetensors")
    for ft, name in zip(fts, ("cars", "dtd")):  # transformers 5 CLIPVisionModel: bare keys, no projection
        save_file(pc.hf_tower_state(ft, projection=False, prefix=""), tmp_path / f"{name}.safetensors")
    reader = open_tower(tmp_path / "cars.safetensors", fallback=open_tower(tmp_path / "base.safetensors"))
    assert torch.equal(reader.get("proj"), tower["proj"])
    assert torch.equal(reader.get("conv1.weight"), fts[0]["conv1.weight"])
    rc, _, err = merge(capsys, "--method", "task_arithmetic", "--pretrained", tmp_path / "base.safetensors",
                       "--finetuned", tmp_path / "cars.safetensors", tmp_path / "dtd.safetensors",
                       "--out", tmp_path / "m")
    assert rc == 0, err
    assert main(["export", str(tmp_path / "m"), "-o", str(tmp_path / "out.safetensors")]) == 0
    assert load_file(tmp_path / "out.safetensors").keys() == load_file(tmp_path / "cars.safetensors").keys()
    state, _ = pc.load_checkpoint(tmp_path / "out.safetensors", tower)
    assert same(state, M.task_arithmetic(tower, [dict(ft, proj=tower["proj"]) for ft in fts]))


def test_open_clip_files_export_with_their_keys_and_load_into_open_clip(clip, tmp_path, capsys):
    tower, fts = towers(clip)
    save_file(tower, tmp_path / "base.safetensors")
    for ft, name in zip(fts, ("cars", "dtd")):
        save_file({f"visual.{k}": v for k, v in ft.items()}, tmp_path / f"{name}.safetensors")
    rc, _, err = merge(capsys, "--method", "post_pruning", "--density", "0.1", "--pretrained",
                       tmp_path / "base.safetensors", "--finetuned", tmp_path / "cars.safetensors",
                       tmp_path / "dtd.safetensors", "--out", tmp_path / "m")
    assert rc == 0, err
    assert main(["export", str(tmp_path / "m"), "--task", "cars", "-o", str(tmp_path / "cars_out.safetensors")]) == 0
    exported = load_file(tmp_path / "cars_out.safetensors")
    assert exported.keys() == load_file(tmp_path / "cars.safetensors").keys()
    expected = M.post_pruning(tower, fts, density=0.1).task_state_dict(0)
    visual = copy.deepcopy(clip.visual)  # the session's model stays as it is
    visual.load_state_dict({k.removeprefix("visual."): v for k, v in exported.items()}, strict=True)
    assert same({k: v.detach() for k, v in visual.state_dict().items()}, expected)


def test_mixed_inputs_export_each_task_the_way_it_came(clip, tmp_path, capsys):
    tower, fts = towers(clip)
    save_file(tower, tmp_path / "base.safetensors")
    folder = pc.save_hf_folder(fts[0], tmp_path / "cars", pc.hf_vision_config(clip.visual, quick_gelu=True))
    save_file({f"visual.{k}": v for k, v in fts[1].items()}, tmp_path / "dtd.safetensors")
    rc, _, err = merge(capsys, "--method", "byom_fft", "--density", "0.1", "--pretrained", tmp_path / "base.safetensors",
                       "--finetuned", folder, tmp_path / "dtd.safetensors", "--out", tmp_path / "m")
    assert rc == 0, err
    assert main(["export", str(tmp_path / "m"), "--task", "cars", "-o", str(tmp_path / "cars_out")]) == 0
    assert main(["export", str(tmp_path / "m"), "--task", "dtd", "-o", str(tmp_path / "dtd_out.safetensors")]) == 0
    expected = M.byom_fft(tower, fts, density=0.1)
    state, fmt = pc.load_checkpoint(tmp_path / "cars_out", tower)
    assert fmt == "hugging face clip folder" and same(state, expected.task_state_dict(0))
    exported = load_file(tmp_path / "dtd_out.safetensors")
    assert exported.keys() == load_file(tmp_path / "dtd.safetensors").keys()  # open_clip keys, as given
    assert same({k.removeprefix("visual."): v for k, v in exported.items()}, expected.task_state_dict(1))


# bad input: a clear message naming the file, and nothing written ------------------------------------

def nothing_written(tmp, out="out"):
    return not (tmp / out).exists() and not [p for p in tmp.iterdir() if p.name.startswith(f".{out}.")]


@pytest.mark.parametrize("change,message", [
    (lambda ft: ft.update(w=torch.zeros(6, 4)),
     r"b.safetensors key 'w' is F32 (6, 4) but pretrained is F32 (6, 5): different architectures cannot be merged"),
    (lambda ft: ft.pop("conv"), "b.safetensors is missing key 'conv' (present in pretrained)"),
    (lambda ft: ft.update(w=ft["w"].half()),
     "b.safetensors key 'w' is F16 (6, 5) but pretrained is F32 (6, 5): convert every checkpoint to one dtype"),
])
def test_bad_checkpoints_are_named(change, message, files, capsys):
    tmp, _, fts, (base, *paths) = files
    change(fts[1])
    save_file(fts[1], paths[1])
    rc, _, err = merge(capsys, "--method", "byom_fft", "--pretrained", base, "--finetuned", *paths, "--out",
                       tmp / "out")
    assert rc == 2 and message in err and nothing_written(tmp)


def test_a_truncated_checkpoint_is_named(files, capsys):
    tmp, _, _, (base, *paths) = files
    with open(paths[2], "r+b") as f:
        f.truncate(200)
    rc, _, err = merge(capsys, "--method", "emr", "--pretrained", base, "--finetuned", *paths, "--out", tmp / "out")
    assert rc == 2 and f"{paths[2]} is truncated" in err and nothing_written(tmp)


def test_an_existing_out_needs_force(files, capsys):
    tmp, pre, fts, (base, *paths) = files
    args = ["--method", "task_arithmetic", "--pretrained", base, "--finetuned", *paths, "--out", tmp / "out"]
    assert merge(capsys, *args)[0] == 0
    before = (tmp / "out" / "manifest.json").read_text()
    rc, _, err = merge(capsys, *args, "--lam", "0.9")
    assert rc == 2 and "out already exists; pass --force" in err
    assert (tmp / "out" / "manifest.json").read_text() == before
    assert merge(capsys, *args, "--lam", "0.9", "--force")[0] == 0
    assert same(M.load_result(tmp / "out"), M.task_arithmetic(pre, fts, lam=0.9))


def test_density_as_a_percent_is_explained(files, capsys):
    tmp, _, _, (base, *paths) = files
    rc, _, err = merge(capsys, "--method", "byom_fft", "--density", "10", "--pretrained", base, "--finetuned",
                       *paths, "--out", tmp / "out")
    assert rc == 2 and "density is m as a fraction, not a percent (m = 10% is density 0.1)" in err
    assert nothing_written(tmp)


@pytest.mark.parametrize("method, needs", [("fisher", "statistics of training images"),
                                           ("tinting", "unlabeled test images")])
def test_methods_that_need_data_are_refused_with_the_reason(method, needs, files, capsys):
    tmp, _, _, (base, *paths) = files
    rc, _, err = merge(capsys, "--method", method, "--pretrained", base, "--finetuned", *paths, "--out", tmp / "out")
    assert rc == 2 and f"{method} needs {needs}, which checkpoint files alone do not give" in err
    assert "byom_fft" in err and nothing_written(tmp)


def test_options_that_do_not_apply_are_refused(files, capsys):
    tmp, _, _, (base, *paths) = files
    rc, _, err = merge(capsys, "--method", "post_pruning", "--lam", "0.3", "--pretrained", base, "--finetuned",
                       *paths, "--out", tmp / "out")
    assert rc == 2 and "--lam does not apply to post_pruning (its options: --density, --scope)" in err
    rc, _, err = merge(capsys, "--method", "byom_lora", "--pretrained", base, "--finetuned", *paths, "--out",
                       tmp / "out")
    assert rc == 2 and "byom_lora merges lora checkpoints: give --lora, not --finetuned" in err
    assert nothing_written(tmp)


def test_export_checks_the_checksums(files, capsys):
    tmp, _, _, (base, *paths) = files
    assert merge(capsys, "--method", "byom_fft", "--pretrained", base, "--finetuned", *paths, "--out",
                 tmp / "m")[0] == 0
    with open(tmp / "m" / "shared.safetensors", "r+b") as f:
        f.seek(-1, 2)
        last = f.read(1)
        f.seek(-1, 2)
        f.write(bytes([last[0] ^ 1]))
    rc = main(["export", str(tmp / "m"), "--task", "a", "-o", str(tmp / "a_out.safetensors")])
    err = capsys.readouterr().err
    assert rc == 2 and "shared.safetensors does not match its sha256" in err
    assert not (tmp / "a_out.safetensors").exists()
    rc = main(["export", str(tmp / "m"), "--task", "z", "-o", str(tmp / "z.safetensors")])
    assert rc == 2 and "task 'z' is not in" in capsys.readouterr().err
