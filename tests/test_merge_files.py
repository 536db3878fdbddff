"""BYOM files: save/load round trips, bytes on disk, checksums, streamed BYOM-FFT / post-pruning from files."""
import json
import struct
from functools import partial

import pytest
import torch
from safetensors.torch import save_file

from byom_lab import merging as M
from byom_lab.merging import storage


pytestmark = pytest.mark.usefixtures("one_thread")  # merging results are compared bit for bit


SHAPES = {"w": (6, 5), "b": (7,), "conv": (2, 3, 2, 2)}


def make_models(num_tasks=3, seed=0, dtype=torch.float32, shapes=SHAPES):
    gen = torch.Generator().manual_seed(seed)
    pre = {k: torch.randn(s, generator=gen).to(dtype) for k, s in shapes.items()}
    fts = [{k: (v.float() + 0.1 * torch.randn(v.shape, generator=gen)).to(dtype) for k, v in pre.items()}
           for _ in range(num_tasks)]
    return pre, fts


def make_lora(num_tasks=3, r=3, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [{"w": (torch.randn(6, r, generator=gen), torch.randn(r, 5, generator=gen))} for _ in range(num_tasks)]


def save_models(folder, pre, fts):
    folder.mkdir(exist_ok=True)
    save_file(pre, folder / "pre.safetensors")
    paths = [folder / f"ft{t}.safetensors" for t in range(len(fts))]
    for path, ft in zip(paths, fts):
        save_file(ft, path)
    return folder / "pre.safetensors", paths


def same_tasks(a, b, num_tasks):
    return all(torch.equal(x[k], y[k]) for t in range(num_tasks)
               for x, y in [(a.task_state_dict(t), b.task_state_dict(t))] for k in x) and \
        all(torch.equal(a.merged[k], b.merged[k]) for k in a.merged)


def results():
    pre, fts = make_models()
    return {
        "byom_fft": M.byom_fft(pre, fts, density=0.2, lam=0.4),
        "post_pruning": M.post_pruning(pre, fts, density=0.3, scope="tensor"),
        "byom_lora": M.byom_lora(pre, make_lora(), rank=2),
        "byom_lora_merged": M.byom_lora(pre, make_lora(), rank=2, base="merged", lam=0.5),
        "emr": M.emr(pre, fts),
    }


def data_bytes(path) -> int:
    """Bytes of a safetensors file after its header."""
    with open(path, "rb") as f:
        (length,) = struct.unpack("<Q", f.read(8))
    return path.stat().st_size - 8 - length


@pytest.mark.parametrize("name", list(results()))
def test_round_trip_is_bit_exact_and_bytes_on_disk_match_nbytes(name, tmp_path):
    result = results()[name]
    out = result.save(tmp_path / "merged", tasks=["a", "b", "c"])
    back = M.load_result(out)
    assert type(back) is type(result) and back.num_tasks == 3
    assert same_tasks(back, result, 3)
    assert (back.method, back.hyperparameters) == (result.method, result.hyperparameters)
    assert [back.nbytes(t) for t in range(3)] == [result.nbytes(t) for t in range(3)]
    for t, task in enumerate("abc"):
        on_disk = data_bytes(out / "tasks" / f"{task}.safetensors")
        assert abs(on_disk - result.nbytes(t)) <= 0.01 * result.nbytes(t)


def test_manifest_names_method_settings_tasks_densities_bytes_and_checksums(tmp_path):
    pre, fts = make_models()
    result = M.byom_fft(pre, fts, density=0.25, base=partial(M.ties, density=0.5), lam=0.8)
    out = result.save(tmp_path / "merged", tasks=["x", "y", "z"], inputs={"note": "test"})
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["method"] == "byom_fft"
    assert manifest["hyperparameters"] == {"density": 0.25, "scope": "global", "base": "ties",
                                           "base_options": {"density": 0.5, "lam": 0.8}}
    assert manifest["tasks"] == ["x", "y", "z"] and manifest["density"] == result.density
    assert manifest["bytes_per_task"] == [result.nbytes(t) for t in range(3)]
    assert manifest["inputs"] == {"note": "test"}
    assert sorted(manifest["files"]) == ["shared.safetensors", "tasks/x.safetensors", "tasks/y.safetensors",
                                         "tasks/z.safetensors"]
    assert all(storage.sha256_file(out / f) == sha for f, sha in manifest["files"].items())


def test_a_changed_file_is_named_when_loading(tmp_path):
    out = results()["emr"].save(tmp_path / "merged", tasks=["a", "b", "c"])
    task = out / "tasks" / "b.safetensors"
    blob = bytearray(task.read_bytes())
    blob[-1] ^= 1
    task.write_bytes(bytes(blob))
    with pytest.raises(ValueError, match=r"tasks/b.safetensors does not match its sha256 in .*manifest.json"):
        M.load_result(out)
    task.unlink()
    with pytest.raises(FileNotFoundError, match=r"tasks/b.safetensors is listed in .* but missing"):
        M.load_result(out)


def test_a_plain_merge_saves_and_loads_as_a_state_dict(tmp_path):
    pre, fts = make_models()
    merged = M.ties(pre, fts, density=0.4)
    out = M.save_result(merged, tmp_path / "ties", tasks=["a", "b", "c"], method="ties",
                        hyperparameters={"density": 0.4})
    back = M.load_result(out)
    assert list(back) == list(merged) and all(torch.equal(back[k], merged[k]) for k in merged)
    assert json.loads((out / "manifest.json").read_text())["kind"] == "merged"


def test_save_refuses_an_existing_directory_unless_overwrite_and_never_a_foreign_one(tmp_path):
    result = results()["byom_fft"]
    out = result.save(tmp_path / "merged")
    with pytest.raises(FileExistsError, match="merged already exists; pass --force"):
        result.save(out)
    results()["post_pruning"].save(out, overwrite=True)
    assert M.load_result(out).method == "post_pruning"
    foreign = tmp_path / "notes"
    foreign.mkdir()
    (foreign / "keep.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="not a folder this command wrote"):
        result.save(foreign, overwrite=True)
    assert (foreign / "keep.txt").read_text() == "mine"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["merged", "notes"]  # no temporary folder left


def test_task_names_must_be_distinct_file_names(tmp_path):
    result = results()["byom_fft"]
    with pytest.raises(ValueError, match="'a' is given twice"):
        result.save(tmp_path / "m", tasks=["a", "a", "b"])
    with pytest.raises(ValueError, match="cannot name a file"):
        result.save(tmp_path / "m", tasks=["a", "../b", "c"])
    with pytest.raises(ValueError, match="2 task names given for 3 tasks"):
        result.save(tmp_path / "m", tasks=["a", "b"])
    assert not (tmp_path / "m").exists()


def test_emr_scales_are_the_float32_values_that_are_stored():
    result = results()["emr"]
    assert all(torch.tensor(s, dtype=torch.float32).item() == s for s in result.scales)


def test_density_given_as_a_percent_is_explained():
    pre, fts = make_models()
    for call in (M.byom_fft, M.post_pruning, M.ties):
        with pytest.raises(ValueError, match=r"density must lie in \(0, 1\], got 10: density is m as a fraction, "
                                             r"not a percent \(m = 10% is density 0.1\)"):
            call(pre, fts, density=10)


# streamed from files -------------------------------------------------------------------------------

BIG = {"w": (600, 500), "b": (700,), "conv": (2, 3, 2, 2), "big": (1100, 1000)}  # 1.4M entries: sampled windows


@pytest.mark.parametrize("shapes,dtype", [(SHAPES, torch.float32), (BIG, torch.float32), (SHAPES, torch.float16)])
def test_streamed_byom_fft_and_post_pruning_equal_the_in_memory_results(shapes, dtype, tmp_path):
    pre, fts = make_models(shapes=shapes, dtype=dtype, seed=3)
    pre_path, paths = save_models(tmp_path / "in", pre, fts)
    cases = [
        (M.byom_fft, M.byom_fft_files, dict(density=0.05, lam=0.3)),
        (M.byom_fft, M.byom_fft_files, dict(density=0.1, scope="tensor", base="ties", lam=0.7)),
        (M.byom_fft, M.byom_fft_files, dict(density=0.1, base=partial(M.ties, density=0.3))),
        (M.byom_fft, M.byom_fft_files, dict(density=0.1, base="dare", drop=0.3, seed=4)),
        (M.post_pruning, M.post_pruning_files, dict(density=0.05)),
        (M.post_pruning, M.post_pruning_files, dict(density=0.2, scope="tensor")),
    ]
    for i, (in_memory, streamed, options) in enumerate(cases):
        expected = in_memory(pre, fts, **options)
        out = streamed(pre_path, paths, tmp_path / f"out{i}", **options)
        back = M.load_result(out)
        assert same_tasks(back, expected, 3), options
        assert back.density == expected.density and back.hyperparameters == expected.hyperparameters
        assert [back.nbytes(t) for t in range(3)] == [expected.nbytes(t) for t in range(3)]
        expected_dir = expected.save(tmp_path / f"mem{i}")
        for task in ("task0", "task2"):  # same task files, byte for byte
            assert storage.sha256_file(out / "tasks" / f"{task}.safetensors") == \
                storage.sha256_file(expected_dir / "tasks" / f"{task}.safetensors")


def test_streamed_family_merge_writes_the_shared_model(tmp_path):
    pre, fts = make_models(seed=2)
    pre_path, paths = save_models(tmp_path / "in", pre, fts)
    out = M.family_files("ties", pre_path, paths, tmp_path / "ties", density=0.3, lam=0.9)
    back, expected = M.load_result(out), M.ties(pre, fts, density=0.3, lam=0.9)
    assert all(torch.equal(back[k], expected[k]) for k in pre)


def leaves_nothing(folder, out):
    return not out.exists() and not [p for p in folder.iterdir() if p.name.startswith(f".{out.name}.")]


@pytest.mark.parametrize("breakage,message", [
    (lambda fts: fts[1].update(w=torch.zeros(3, 10)),
     r"ft1.safetensors key 'w' is F32 \(3, 10\) but pretrained is F32 \(6, 5\): different architectures"),
    (lambda fts: fts[2].pop("b"), r"ft2.safetensors is missing key 'b' \(present in pretrained\)"),
    (lambda fts: fts[0].update(conv=fts[0]["conv"].bfloat16()),
     r"ft0.safetensors key 'conv' is BF16 .* but pretrained is F32 .*: convert every checkpoint to one dtype"),
    (lambda fts: fts[1]["w"].__setitem__((0, 0), float("nan")), r"ft1.safetensors key 'w' contains NaN"),
])
def test_bad_inputs_are_named_and_leave_nothing_behind(breakage, message, tmp_path):
    pre, fts = make_models()
    breakage(fts)
    pre_path, paths = save_models(tmp_path, pre, fts)
    out = tmp_path / "merged"
    for streamed in (M.byom_fft_files, M.post_pruning_files):
        with pytest.raises(ValueError, match=message):
            streamed(pre_path, paths, out, density=0.1)
        assert leaves_nothing(tmp_path, out)


def test_a_truncated_file_is_named(tmp_path):
    pre, fts = make_models()
    pre_path, paths = save_models(tmp_path, pre, fts)
    blob = paths[1].read_bytes()
    paths[1].write_bytes(blob[: len(blob) - 20])
    with pytest.raises(ValueError, match=r"ft1.safetensors is truncated: its header announces 244 bytes of "
                                         r"tensors but the file holds 224"):
        M.byom_fft_files(pre_path, paths, tmp_path / "merged")
    paths[1].write_bytes(blob[:5])
    with pytest.raises(ValueError, match="ft1.safetensors is truncated or not a safetensors file"):
        M.post_pruning_files(pre_path, paths, tmp_path / "merged")
    assert leaves_nothing(tmp_path, tmp_path / "merged")


def test_streamed_byom_fft_takes_only_family_bases(tmp_path):
    pre, fts = make_models()
    pre_path, paths = save_models(tmp_path, pre, fts)
    with pytest.raises(ValueError, match="base 'emr' needs the in-memory byom_fft"):
        M.byom_fft_files(pre_path, paths, tmp_path / "merged", base="emr")
    with pytest.raises(ValueError, match=r"m = 10% is density 0.1"):
        M.byom_fft_files(pre_path, paths, tmp_path / "merged", density=10)
    assert leaves_nothing(tmp_path, tmp_path / "merged")
