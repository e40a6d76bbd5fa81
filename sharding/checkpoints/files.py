"""Read-only access to the files of a checkpoint, whether they sit in a directory or in a packed `.nemo`.

A packed `.nemo` is an uncompressed tar whose members sit under `./`. Nothing is extracted: a member is a
byte range of the tar file, so a weight chunk is memory-mapped straight out of the archive
(`byte_range`), and small members (yaml, json, pickles) are read into memory. The same interface serves an
extracted directory, so the readers above never care which one they got.

No torch here (the router opens checkpoints through this module). Paths are POSIX-style and relative to
the root the object was opened at.
"""

from __future__ import annotations

import io
import os
import posixpath
import stat
import tarfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path


class CheckpointFilesError(ValueError):
    """A path does not name a readable checkpoint directory or packed `.nemo`."""


def _norm(rel: str) -> str:
    """'./a//b/' -> 'a/b'; '' and '.' -> ''."""
    rel = posixpath.normpath(rel.replace(os.sep, "/")) if rel else ""
    if rel in (".", "/"):
        return ""
    while rel.startswith("./"):
        rel = rel[2:]
    return rel.lstrip("/")


@dataclass(frozen=True)
class ByteRange:
    """Where a member's bytes are: `size` bytes at `offset` of the plain file `path`."""

    path: Path
    offset: int
    size: int


class CheckpointFiles:
    """Files under one root (a directory, or a folder inside a tar). Subclasses implement the primitives."""

    #: the path this view was opened at, for messages (`/x/model.nemo/model_weights` for a tar member)
    location: Path

    def is_file(self, rel: str) -> bool:
        raise NotImplementedError

    def is_dir(self, rel: str) -> bool:
        raise NotImplementedError

    def listdir(self, rel: str = "") -> list[str]:
        """Names directly under `rel` (files and folders), sorted."""
        raise NotImplementedError

    def byte_range(self, rel: str) -> ByteRange:
        raise NotImplementedError

    def subdir(self, rel: str) -> CheckpointFiles:
        raise NotImplementedError

    @property
    def packed(self) -> bool:
        return False

    def read_bytes(self, rel: str) -> bytes:
        r = self.byte_range(rel)
        with open(r.path, "rb") as f:
            f.seek(r.offset)
            data = f.read(r.size)
        if len(data) != r.size:
            raise CheckpointFilesError(f"{self.location / rel} is truncated: {len(data)} of {r.size} bytes")
        return data

    @contextmanager
    def open(self, rel: str) -> Iterator[io.RawIOBase]:
        """A seekable binary stream over one file (a window onto the tar for a packed checkpoint)."""
        r = self.byte_range(rel)
        with open(r.path, "rb", buffering=0) as f:
            yield _RangeReader(f, r.offset, r.size)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({str(self.location)!r})"


class DirectoryFiles(CheckpointFiles):
    def __init__(self, root: Path):
        self.root = root
        self.location = root

    def _path(self, rel: str) -> Path:
        rel = _norm(rel)
        return self.root / rel if rel else self.root

    def is_file(self, rel: str) -> bool:
        return self._path(rel).is_file()

    def is_dir(self, rel: str) -> bool:
        return self._path(rel).is_dir()

    def listdir(self, rel: str = "") -> list[str]:
        path = self._path(rel)
        if not path.is_dir():
            raise CheckpointFilesError(f"{path} is not a directory")
        return sorted(os.listdir(path))

    def byte_range(self, rel: str) -> ByteRange:
        path = self._path(rel)
        try:
            st = path.stat()
        except FileNotFoundError:
            raise FileNotFoundError(f"{path} does not exist") from None
        if not stat.S_ISREG(st.st_mode):
            raise CheckpointFilesError(f"{path} is not a file")
        return ByteRange(path, 0, st.st_size)

    def subdir(self, rel: str) -> DirectoryFiles:
        path = self._path(rel)
        if not path.is_dir():
            raise CheckpointFilesError(f"{path} is not a directory")
        return DirectoryFiles(path)


@dataclass
class _TarIndex:
    """Member name -> (data offset, size) for the regular files of one tar; folder names -> children."""

    tar_path: Path
    files: dict[str, tuple[int, int]] = field(default_factory=dict)
    children: dict[str, set[str]] = field(default_factory=dict)

    @classmethod
    def build(cls, tar_path: Path) -> _TarIndex:
        index = cls(tar_path)
        try:
            # "r:" = no compression: a compressed archive cannot be memory-mapped member by member.
            with tarfile.open(tar_path, mode="r:") as tar:
                for member in tar:
                    name = _norm(member.name)
                    if not name:
                        continue
                    if member.isfile():
                        if member.sparse is not None:
                            raise CheckpointFilesError(f"{tar_path}: member {member.name} is a sparse file")
                        index.files[name] = (member.offset_data, member.size)
                        index._add_parents(name)
                    elif member.isdir():
                        index._add_parents(name)
                        index.children.setdefault(name, set())
        except tarfile.ReadError as e:
            raise CheckpointFilesError(
                f"{tar_path} is not an uncompressed tar ({e}); a packed .nemo must be a plain tar "
                "(extract a compressed one and point at the directory)"
            ) from None
        return index

    def _add_parents(self, name: str) -> None:
        parent, _, leaf = name.rpartition("/")
        while True:
            self.children.setdefault(parent, set()).add(leaf)
            if not parent:
                return
            parent, _, leaf = parent.rpartition("/")


class TarFiles(CheckpointFiles):
    def __init__(self, index: _TarIndex, prefix: str = ""):
        self._index = index
        self._prefix = _norm(prefix)
        self.location = index.tar_path / self._prefix if self._prefix else index.tar_path

    @classmethod
    def open_tar(cls, tar_path: Path, prefix: str = "") -> TarFiles:
        files = cls(_TarIndex.build(tar_path))
        return files.subdir(prefix) if _norm(prefix) else files

    @property
    def packed(self) -> bool:
        return True

    @property
    def tar_path(self) -> Path:
        return self._index.tar_path

    def _name(self, rel: str) -> str:
        rel = _norm(rel)
        if self._prefix and rel:
            return f"{self._prefix}/{rel}"
        return self._prefix or rel

    def is_file(self, rel: str) -> bool:
        return self._name(rel) in self._index.files

    def is_dir(self, rel: str) -> bool:
        return self._name(rel) in self._index.children

    def listdir(self, rel: str = "") -> list[str]:
        name = self._name(rel)
        if name not in self._index.children:
            raise CheckpointFilesError(f"{self.location / _norm(rel)} is not a folder of {self.tar_path}")
        return sorted(self._index.children[name])

    def byte_range(self, rel: str) -> ByteRange:
        name = self._name(rel)
        try:
            offset, size = self._index.files[name]
        except KeyError:
            raise FileNotFoundError(f"{self.tar_path} has no member {name}") from None
        return ByteRange(self._index.tar_path, offset, size)

    def subdir(self, rel: str) -> TarFiles:
        name = self._name(rel)
        if name not in self._index.children:
            raise CheckpointFilesError(f"{self.tar_path} has no folder {name}")
        return TarFiles(self._index, name)


class _RangeReader(io.RawIOBase):
    """A read-only, seekable window of `size` bytes at `offset` of an open file."""

    def __init__(self, f, offset: int, size: int):
        super().__init__()
        self._f = f
        self._start = offset
        self._size = size
        self._pos = 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        if whence == io.SEEK_SET:
            pos = offset
        elif whence == io.SEEK_CUR:
            pos = self._pos + offset
        elif whence == io.SEEK_END:
            pos = self._size + offset
        else:
            raise ValueError(f"bad whence {whence}")
        if pos < 0:
            raise ValueError("negative seek position")
        self._pos = pos
        return pos

    def readinto(self, b) -> int:
        n = min(len(b), self._size - self._pos)
        if n <= 0:
            return 0
        self._f.seek(self._start + self._pos)
        got = self._f.readinto(memoryview(b)[:n])
        self._pos += got
        return got


def open_files(path: str | os.PathLike) -> CheckpointFiles:
    """A directory, a packed `.nemo` (tar), or a folder inside one given as `<archive>/<folder>`."""
    path = Path(path).expanduser().resolve()
    if path.is_dir():
        return DirectoryFiles(path)
    if path.is_file():
        return TarFiles.open_tar(path)
    # A folder inside an archive: walk up to the first existing file, which must be the tar.
    for parent in path.parents:
        if parent.is_file():
            return TarFiles.open_tar(parent, path.relative_to(parent).as_posix())
        if parent.exists():
            break
    raise CheckpointFilesError(f"{path} does not exist (neither a directory nor inside a packed .nemo)")
