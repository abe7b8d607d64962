"""Read and verify a model package: a directory of artifacts plus ``manifest.json``.

The model package is the only thing that crosses from training to serving; its contract is
``Manifest`` (serve/manifest.py). An artifact is handed out as the bytes whose sha256 matched
the manifest, so what was checked is what gets loaded (a file swapped between a check and a
second read cannot slip in), and only from a regular file directly inside the package.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

from resserve.serve.errors import ResserveError
from resserve.serve.manifest import FILE_NAME as MANIFEST, Artifact, Manifest

SHIPPED_PACKAGE = Path(__file__).parent / "models" / "resnet-mnist"
# A manifest is a few KB (the shipped one 3.5): a file past this is not one, and is refused
# before it is read whole, at every look at a folder of packages
MAX_MANIFEST_BYTES = 1 << 20


class PackageError(ResserveError):
    """A directory that is not a usable model package, or an artifact that fails its checksum."""


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


@dataclass(frozen=True)
class ModelPackage:
    path: Path
    manifest: Manifest

    @property
    def name(self) -> str:
        return self.manifest.name

    @property
    def version(self) -> str:
        return self.manifest.version

    @property
    def artifacts(self) -> tuple[Artifact, ...]:
        return self.manifest.artifacts

    def find(self, format: str, precision: str = "fp32") -> Artifact:
        artifact = self.manifest.find(format, precision)
        if artifact is None:
            have = ", ".join(f"{a.format}/{a.precision}" for a in self.artifacts)
            raise PackageError(f"package {self.path} has no {format}/{precision} artifact (it has {have})")
        return artifact

    def read_verified(self, artifact: Artifact) -> bytes:
        """The artifact's bytes, after checking them against the manifest's sha256."""
        path = self.path / artifact.file  # a plain file name: the manifest refuses anything else
        if path.is_symlink() or not path.is_file():
            what = "a symbolic link" if path.is_symlink() else "missing"
            raise PackageError(f"{path} is listed in the manifest but {what}; artifacts must be regular files")
        try:
            data = path.read_bytes()
        except OSError as exc:  # the server's user may not read it (a volume's permissions)
            raise PackageError(f"cannot read {path}: {exc.strerror}") from None
        actual = hashlib.sha256(data).hexdigest()
        if actual != artifact.sha256:
            raise PackageError(f"{path} has sha256 {actual}, the manifest says {artifact.sha256}: refusing to load it")
        return data


def package_paths(paths: Iterable[Path]) -> list[Path]:
    """The packages ``paths`` name: each path a package, or a folder of packages (a model
    repository: its subfolders holding a manifest, by name; hidden ones, such as those `resserve
    export` stages a package in, left out). Read anew at each call, so a package exported into the
    folder while the server runs is found by the next load of its model."""
    return [package for path in paths for package in _packages_at(Path(path))]


def _packages_at(path: Path) -> list[Path]:
    if not path.is_dir() or (path / MANIFEST).is_file():
        return [path]  # a package, or what load_package says is wrong with it
    try:
        found = sorted(sub for sub in path.iterdir()
                       if not sub.name.startswith(".") and sub.is_dir() and (sub / MANIFEST).is_file())
    except OSError as exc:
        raise PackageError(f"cannot read {exc.filename or path}: {exc.strerror}") from exc
    if not found:
        raise PackageError(f"{path} is neither a model package (no {MANIFEST}) nor a folder of them (no subfolder "
                           f"holds one); make one with `resserve export --out {path / 'NAME'}`")
    return found


def readable_packages(paths: Iterable[Path]) -> tuple[list[ModelPackage], list[str]]:
    """The packages ``paths`` name now that read, and why each other one does not (a manifest
    half copied in, a folder that holds none any more): for what looks at them without loading."""
    try:
        found = package_paths(paths)
    except PackageError as exc:
        return [], [str(exc)]
    packages, unreadable = [], []
    for path in found:
        try:
            packages.append(load_package(path))
        except ResserveError as exc:
            unreadable.append(str(exc))
    return packages, unreadable


def load_package(path: Path | str | None = None) -> ModelPackage:
    """Read and check ``path/manifest.json`` (default: the shipped package)."""
    path = Path(path) if path is not None else SHIPPED_PACKAGE
    if not path.exists():
        raise PackageError(f"model package {path} does not exist")
    if path.is_file():  # most often the checkpoint the package would be exported from
        export = f"`resserve export {path}` makes one of it" if path.suffix in (".pt", ".pth") else \
            "`resserve export` makes one of a checkpoint"
        raise PackageError(f"{path} is a file, not a model package (a folder with {MANIFEST}); {export}")
    manifest_path = path / MANIFEST
    if not manifest_path.is_file():
        raise PackageError(f"{path} is not a model package (no {MANIFEST}); make one with `resserve export`")
    try:
        with manifest_path.open("rb") as manifest:
            text = manifest.read(MAX_MANIFEST_BYTES + 1)
    except OSError as exc:
        raise PackageError(f"cannot read {manifest_path}: {exc.strerror}") from exc
    if len(text) > MAX_MANIFEST_BYTES:
        raise PackageError(f"{manifest_path} is over {MAX_MANIFEST_BYTES >> 20} MiB: not a manifest `resserve "
                           "export` wrote (those are a few KB)")
    return ModelPackage(path, Manifest.from_json(text, source=str(manifest_path)))
