"""One path layer for every file a run reads or writes: local paths and `gs://` URLs alike.

Built on `etils.epath`, the library orbax already uses for checkpoints, so one path type serves the
checkpoints, metrics, TensorBoard events, plots, HF exports, models, tokenizers and data. Without
TensorFlow installed, epath reaches `gs://` through fsspec's gcsfs, which honours
`STORAGE_EMULATOR_HOST` (tests run against a local GCS emulator; README "Storage"). Local paths behave
exactly as before (made absolute, as orbax requires).

Readers that need real local files (memory-mapped safetensors, sentencepiece, transformers
tokenizers) get a local copy of a remote file or directory from `stage`; writers that append or keep
a file open (TensorBoard) write locally and `upload` what they wrote.
"""

from __future__ import annotations

import glob as local_glob
import hashlib
import os
import shutil
import tempfile

from etils import epath

PathLike = str | os.PathLike


def is_remote(path: PathLike) -> bool:
    """Whether `path` is a URL (`gs://...`) rather than a local path."""
    return "://" in os.fspath(path)


def path(p: PathLike) -> epath.Path:
    """An epath.Path for a local path (made absolute, `~` expanded) or a URL (as is)."""
    p = os.fspath(p)
    return epath.Path(p if is_remote(p) else os.path.abspath(os.path.expanduser(p)))


def join(base: PathLike, *parts: str) -> str:
    """`base/parts...` as a string, for URLs and local paths alike (no `abspath` on a URL)."""
    return os.fspath(path(base).joinpath(*parts)) if is_remote(base) else os.path.join(os.fspath(base), *parts)


def glob(pattern: PathLike) -> list[str]:
    """Sorted paths matching a glob pattern (wildcards in any component); URLs keep their scheme."""
    pattern = os.fspath(pattern)
    if not is_remote(pattern):
        return sorted(local_glob.glob(os.path.expanduser(pattern)))
    import fsspec  # epath's own backend for URLs

    fs, _ = fsspec.core.url_to_fs(pattern)
    scheme = pattern.split("://", 1)[0]
    return sorted(f"{scheme}://{p}" for p in fs.glob(pattern))


def stage(p: PathLike) -> str:
    """A local path with the contents of `p`: `p` itself when local, else a copy of the remote file or
    directory tree in a cache directory (`$PRIME_JAX_CACHE`, default the temp dir), fetched again only
    when the remote names or sizes differ from the copy's. Every process (host) stages its own copy."""
    p = os.fspath(p)
    if not is_remote(p):
        return p
    remote = path(p)
    if not remote.exists():
        raise FileNotFoundError(f"{p}: no such file or directory")
    cache = os.environ.get("PRIME_JAX_CACHE") or os.path.join(tempfile.gettempdir(), "prime_jax_cache")
    local = os.path.join(cache, hashlib.sha256(p.encode()).hexdigest()[:16], p.rstrip("/").rsplit("/", 1)[-1])
    if os.path.exists(local) and _sizes(epath.Path(local)) == _sizes(remote):
        return local
    if os.path.isdir(local):  # an outdated copy
        shutil.rmtree(local, ignore_errors=True)
    partial = f"{local}.{os.getpid()}.partial"
    _copy_tree(remote, epath.Path(partial))
    try:
        os.replace(partial, local)
    except OSError:  # another process on this host staged the same directory first
        shutil.rmtree(partial, ignore_errors=True)
    return local


def _sizes(p: epath.Path) -> dict[str, int]:
    """{relative name: size} of the files under `p` (or of `p` itself)."""
    if not p.is_dir():
        return {"": p.stat().length}
    out = {}
    for child in p.iterdir():
        out.update({f"{child.name}/{k}": v for k, v in _sizes(child).items()})
    return out


def upload(local: PathLike, remote: PathLike) -> None:
    """Copies a local file or directory tree to `remote` (any path or URL), overwriting files."""
    _copy_tree(epath.Path(os.fspath(local)), path(remote))


def _copy_tree(src: epath.Path, dst: epath.Path) -> None:
    if not src.is_dir():
        dst.parent.mkdir(parents=True, exist_ok=True)
        src.copy(dst, overwrite=True)
        return
    dst.mkdir(parents=True, exist_ok=True)
    for child in src.iterdir():
        _copy_tree(child, dst / child.name)
