import pytest

from byom_lab import manifest as mf


def test_manifest_lists_every_suite_task_with_sizes():
    tasks = mf.tiny_tasks()
    for suite, names in mf.suites().items():
        for n in names:
            assert n in tasks, (suite, n)
    for name in mf.suites()["tiny"]:
        spec = tasks[name]
        assert len(spec.classes) == 10 and set(spec.sizes) == {"train", "val", "test"}
        assert all(0 <= c < len(spec.classes) for c in spec.captioned)
    assert set(mf.manifest()["paper"]["datasets"]) == {"SUN397", "Cars", "RESISC45", "EuroSAT", "SVHN", "GTSRB", "MNIST", "DTD"}


def test_wrong_checksum_is_a_clear_error(tmp_path, monkeypatch):
    path = tmp_path / "m.yaml"
    text = mf.manifest_path().read_text()
    path.write_text(text)
    monkeypatch.setenv("BYOM_LAB_MANIFEST", str(path))
    mf._load.cache_clear()
    try:
        mf.record_asset_sha256("tiny-clip", "0" * 64)
        assert 'sha256: "' + "0" * 64 + '"' in path.read_text()
        assert "# Every dataset" in path.read_text()  # comments kept
        with pytest.raises(mf.ChecksumError, match="tiny-clip.*0000"):
            mf.verified_asset("tiny-clip")
    finally:
        mf._load.cache_clear()


def test_unknown_asset_and_missing_manifest(tmp_path, monkeypatch):
    with pytest.raises(KeyError, match="unknown asset 'nope'"):
        mf.asset_path("nope")
    monkeypatch.setenv("BYOM_LAB_MANIFEST", str(tmp_path / "absent.yaml"))
    with pytest.raises(FileNotFoundError, match="absent.yaml"):
        mf.manifest()


def test_shipped_asset_matches_manifest():
    path = mf.verified_asset("tiny-clip")
    assert mf.manifest()["assets"]["tiny-clip"]["sha256"] == mf.sha256_file(path)
    assert path.stat().st_size <= 12 * 1024 * 1024
