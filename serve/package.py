"""Read and verify a model package: a directory of artifacts plus ``manifest.json``.

The model package is the only thing that crosses from training to serving, so this module is
plain Python (json, hashlib): no torch, no train code. An artifact is handed out only after its
sha256 matches the manifest.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

from resserve.serve.errors import ResserveError

MANIFEST = "manifest.json"
PACKAGE_FORMAT = "resserve-model-package"
PACKAGE_FORMAT_VERSION = 1
SHIPPED_PACKAGE = Path(__file__).parent / "models" / "resnet-mnist"


class PackageError(ResserveError):
    """A directory that is not a usable model package, or an artifact that fails its checksum."""


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


@dataclass(frozen=True)
class Artifact:
    file: str
    format: str  # onnx | torchscript
    precision: str  # fp32 | int8
    sha256: str
    bytes: int


@dataclass(frozen=True)
class ModelPackage:
    path: Path
    manifest: dict

    @property
    def name(self) -> str:
        return self.manifest["name"]

    @property
    def version(self) -> str:
        return str(self.manifest["version"])

    @property
    def artifacts(self) -> list[Artifact]:
        return [Artifact(a["file"], a["format"], a["precision"], a["sha256"], a["bytes"])
                for a in self.manifest["artifacts"]]

    def find(self, format: str, precision: str = "fp32") -> Artifact:
        for artifact in self.artifacts:
            if artifact.format == format and artifact.precision == precision:
                return artifact
        have = ", ".join(f"{a.format}/{a.precision}" for a in self.artifacts)
        raise PackageError(f"package {self.path} has no {format}/{precision} artifact (it has {have})")

    def verified_path(self, artifact: Artifact) -> Path:
        """The artifact's path, after checking its sha256 against the manifest."""
        path = self.path / artifact.file
        if not path.is_file():
            raise PackageError(f"{path} is listed in the manifest but missing")
        actual = sha256_of(path)
        if actual != artifact.sha256:
            raise PackageError(f"{path} has sha256 {actual}, the manifest says {artifact.sha256}: refusing to load it")
        return path


def load_package(path: Path | str | None = None) -> ModelPackage:
    """Read ``path/manifest.json`` (default: the shipped package) and check its shape."""
    path = Path(path) if path is not None else SHIPPED_PACKAGE
    manifest_path = path / MANIFEST
    if not manifest_path.is_file():
        raise PackageError(f"{path} is not a model package (no {MANIFEST}); make one with `resserve export`")
    try:
        manifest = json.loads(manifest_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise PackageError(f"{manifest_path} is not valid JSON: {exc}") from exc
    if not isinstance(manifest, dict) or manifest.get("format") != PACKAGE_FORMAT:
        raise PackageError(f"{manifest_path} is not a resserve manifest")
    if manifest.get("format_version") != PACKAGE_FORMAT_VERSION:
        raise PackageError(f"{manifest_path} has format version {manifest.get('format_version')}, "
                           f"this resserve reads {PACKAGE_FORMAT_VERSION}")
    missing = [key for key in ("name", "version", "artifacts", "inputs", "outputs") if key not in manifest]
    if missing:
        raise PackageError(f"{manifest_path} lacks {', '.join(missing)}")
    return ModelPackage(path, manifest)
