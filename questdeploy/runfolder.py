"""The run folder: one directory per run, with ``run.json`` as the single source of truth.

Every stage writes its outputs into a temporary sibling directory and renames it into place
only when complete, then records config, seed, versions, timings and output hashes in the
manifest. A stage whose manifest entry is missing is not done, whatever files exist.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import platform
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any, Iterator

from .errors import RunFolderError

MANIFEST = "run.json"
FORMAT_VERSION = 1


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def sha256_json(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


def hash_tree(root: Path) -> dict[str, str]:
    """Content hash of every file under ``root``, keyed by path relative to it."""
    return {
        str(p.relative_to(root)): sha256_file(p)
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def write_bytes_atomic(path: Path, data: bytes) -> None:
    """Write via a temp file in the same directory and rename, so readers never see half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def write_text_atomic(path: Path, text: str) -> None:
    write_bytes_atomic(path, text.encode())


def replace_dir(src: Path, dst: Path) -> None:
    """Move the finished folder ``src`` to ``dst``; an existing ``dst`` is removed only after the swap."""
    src, dst = Path(src), Path(dst)
    if dst.exists():
        old = dst.with_name(f".{dst.name}.old-{os.getpid()}")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(dst, old)
        os.replace(src, dst)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(src, dst)


@contextlib.contextmanager
def atomic_dir(final: Path) -> Iterator[Path]:
    """Yield a temp folder beside ``final``; it replaces ``final`` only if the block finishes, else it is removed."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=final.parent))
    tmp.chmod(0o755)  # mkdtemp makes it private; the result is a normal, shareable folder
    try:
        yield tmp
        replace_dir(tmp, final)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def environment() -> dict[str, str]:
    """Library versions and the CPU thread count, which decide numerics; recorded so a resumed run can warn on
    drift (a W4A4 finetune with 1 thread and with 2 gives different checkpoints: float sums in another order)."""
    import importlib.metadata as md

    import torch

    env = {"python": platform.python_version(), "machine": platform.machine(), "torch_threads": str(torch.get_num_threads())}
    for dist in ("questdeploy", "torch", "diffusers", "onnx", "onnxruntime", "numpy"):
        try:
            env[dist] = md.version(dist)
        except md.PackageNotFoundError:
            env[dist] = "absent"
    return env


class RunFolder:
    """A run directory and its manifest."""

    def __init__(self, path: Path | str):
        self.path = Path(path).resolve()
        self._lock_fd: int | None = None

    # -- manifest -------------------------------------------------------------------------
    @property
    def manifest_path(self) -> Path:
        return self.path / MANIFEST

    def exists(self) -> bool:
        return self.manifest_path.is_file()

    def load(self) -> dict:
        if not self.exists():
            return {"format": FORMAT_VERSION, "stages": {}}
        try:
            data = json.loads(self.manifest_path.read_text())
        except json.JSONDecodeError as e:
            raise RunFolderError(
                f"{self.manifest_path} is not valid JSON ({e.msg} at line {e.lineno}).",
                hint="restore it or start a new run with --run-dir pointing to an empty folder.",
            ) from None
        if data.get("format") != FORMAT_VERSION or not isinstance(data.get("stages"), dict):
            raise RunFolderError(
                f"{self.manifest_path} is not a questdeploy run manifest (format {data.get('format')!r}).",
                hint="use a new --run-dir for this run.",
            )
        return data

    def save(self, data: dict) -> None:
        write_text_atomic(self.manifest_path, json.dumps(data, indent=2, sort_keys=True) + "\n")

    def bind_model(self, model_id: str, model_path: str) -> None:
        """Tie the run to one model; refuse a run folder that was made from another one."""
        data = self.load()
        known = data.get("model")
        if known and known.get("id") != model_id:
            raise RunFolderError(
                f"run folder {self.path} was made from model {known.get('path')!r} "
                f"(id {known.get('id', '')[:12]}), not {model_path!r} (id {model_id[:12]}).",
                hint="pass the original --model, or choose another --run-dir for this model.",
            )
        if not known:
            self.path.mkdir(parents=True, exist_ok=True)
            data["model"] = {"id": model_id, "path": model_path}
            data["created"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
            data["environment"] = environment()
            self.save(data)

    def environment_drift(self) -> dict[str, tuple[str, str]]:
        """Versions that differ from those the run folder was made with: {name: (then, now)}."""
        then = self.load().get("environment", {})
        now = environment()
        return {k: (v, now.get(k, "absent")) for k, v in then.items() if now.get(k) != v}

    # -- stages ---------------------------------------------------------------------------
    def stage_dir(self, stage: str) -> Path:
        return self.path / stage

    def stage_record(self, stage: str) -> dict | None:
        return self.load()["stages"].get(stage)

    def is_done(self, stage: str, fingerprint: str | None = None) -> bool:
        """Done = recorded in the manifest, same fingerprint, and every output file unchanged."""
        rec = self.stage_record(stage)
        if not rec or rec.get("status") != "done":
            return False
        if fingerprint is not None and rec.get("fingerprint") != fingerprint:
            return False
        out = self.stage_dir(stage)
        for rel, digest in rec.get("outputs", {}).items():
            p = out / rel
            if not p.is_file() or sha256_file(p) != digest:
                return False
        return True

    def modified_outputs(self, stage: str) -> list[str]:
        """Outputs of a recorded stage that are missing or no longer hash as recorded."""
        rec = self.stage_record(stage) or {}
        out = self.stage_dir(stage)
        return [rel for rel, digest in rec.get("outputs", {}).items()
                if not (out / rel).is_file() or sha256_file(out / rel) != digest]

    def output_digest(self, stage: str) -> str:
        """One hash over a finished stage's outputs: the input fingerprint of the stages after it."""
        rec = self.stage_record(stage)
        if not rec or rec.get("status") != "done":
            return "missing"
        return sha256_json(rec.get("outputs", {}))

    @contextlib.contextmanager
    def stage_output(self, stage: str, record: dict) -> Iterator[Path]:
        """Yield a temp directory; on success it replaces ``<run>/<stage>`` and the manifest records it.

        On any exception the temp directory is removed and the previous outputs and manifest
        entry stay as they were.
        """
        self.path.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{stage}-", dir=self.path))
        tmp.chmod(0o755)
        started = time.time()
        try:
            yield tmp
            outputs = hash_tree(tmp)
            replace_dir(tmp, self.stage_dir(stage))
            data = self.load()
            data["stages"][stage] = {
                **record,
                "status": "done",
                "outputs": outputs,
                "started": time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(started)),
                "seconds": round(time.time() - started, 3),
                "environment": environment(),
            }
            self.save(data)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)

    def invalidate(self, stage: str) -> None:
        data = self.load()
        if data["stages"].pop(stage, None) is not None:
            self.save(data)

    def clean_temporaries(self) -> None:
        """Remove leftovers of a stage killed mid-write; the manifest never pointed at them."""
        if self.path.is_dir():
            for p in self.path.glob(".tmp-*"):
                shutil.rmtree(p, ignore_errors=True)
            for p in self.path.glob(".*.old-*"):
                shutil.rmtree(p, ignore_errors=True)

    # -- lock -----------------------------------------------------------------------------
    @contextlib.contextmanager
    def locked(self) -> Iterator["RunFolder"]:
        """Exclusive lock: a second questdeploy process on the same run folder refuses clearly."""
        self.path.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path / ".lock", os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise RunFolderError(
                f"run folder {self.path} is in use by another questdeploy process.",
                hint="wait for it to finish, or use another --run-dir.",
            ) from None
        try:
            os.ftruncate(fd, 0)
            os.write(fd, str(os.getpid()).encode())
            self.clean_temporaries()
            yield self
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)
            os.close(fd)
