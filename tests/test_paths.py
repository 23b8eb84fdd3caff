"""The path layer against a real (local, emulated) GCS server: join, glob, stage, upload; local paths unchanged."""

import os

from etils import epath

from prime_jax import paths


def test_local_paths_are_unchanged(tmp_path):
    assert not paths.is_remote(tmp_path) and paths.is_remote("gs://b/x")
    assert paths.join("runs/tiny", "checkpoints") == os.path.join("runs/tiny", "checkpoints")
    assert os.fspath(paths.path("runs/x")) == os.path.abspath("runs/x")
    assert paths.stage(str(tmp_path)) == str(tmp_path)
    (tmp_path / "a1.txt").write_text("1")
    (tmp_path / "a2.txt").write_text("2")
    assert paths.glob(str(tmp_path / "a*.txt")) == [str(tmp_path / "a1.txt"), str(tmp_path / "a2.txt")]


def test_bucket_join_glob_upload_stage(gcs_bucket, tmp_path, monkeypatch):
    root = f"{gcs_bucket}/paths"
    assert paths.join(root, "x", "y.txt") == f"{root}/x/y.txt"  # no abspath on a URL: no local "gs:" folder
    local = tmp_path / "tree"
    (local / "sub").mkdir(parents=True)
    (local / "a.txt").write_text("alpha")
    (local / "sub" / "b.bin").write_bytes(b"\0\1\2")
    paths.upload(local, f"{root}/tree")
    assert paths.glob(f"{root}/tree/*.txt") == [f"{root}/tree/a.txt"]
    assert paths.glob(f"{root}/*/sub/*") == [f"{root}/tree/sub/b.bin"]
    monkeypatch.setenv("PRIME_JAX_CACHE", str(tmp_path / "cache"))
    staged = paths.stage(f"{root}/tree")
    assert staged.startswith(str(tmp_path / "cache")) and os.path.basename(staged) == "tree"
    assert (epath.Path(staged) / "a.txt").read_text() == "alpha"
    assert (epath.Path(staged) / "sub" / "b.bin").read_bytes() == b"\0\1\2"
    paths.path(f"{root}/tree/a.txt").write_text("changed!")  # a different size: staged again
    assert (epath.Path(paths.stage(f"{root}/tree")) / "a.txt").read_text() == "changed!"
    assert not os.path.exists("gs:") and not (tmp_path / "gs:").exists()
