"""The model package's manifest: the typed contract between export and serving."""

import json
import re
import shutil

import pytest

from helpers import run_cli
from resserve.serve.manifest import FORMAT_VERSION, Manifest, ManifestError
from resserve.serve.package import SHIPPED_PACKAGE, PackageError, load_package


@pytest.fixture
def shipped() -> dict:
    return json.loads((SHIPPED_PACKAGE / "manifest.json").read_text())


def problem(data: dict) -> str:
    with pytest.raises(ManifestError) as error:
        Manifest.from_json(json.dumps(data), source="manifest.json")
    return str(error.value)


def test_the_shipped_manifest_round_trips_exactly(shipped):
    manifest = Manifest.from_json(json.dumps(shipped))
    assert json.loads(manifest.to_json()) == {k: v for k, v in shipped.items() if v is not None}
    assert Manifest.from_json(manifest.to_json()) == manifest
    assert manifest.find("onnx").file == "model.onnx" and manifest.find("onnx", "bf16") is None
    assert manifest.output_names == ["logits", "probabilities"]


@pytest.mark.parametrize("change, message", [
    (lambda m: m["artifacts"][0].pop("sha256"), "field artifacts.0.sha256: missing"),
    (lambda m: m.pop("inputs"), "field inputs: missing"),
    (lambda m: m.update(artifacts={"file": "model.onnx"}), "field artifacts: Input should be a valid"),
    (lambda m: m.update(colour="blue"), "field colour: unknown field"),
    (lambda m: m["inputs"][0].update(name=""), "field inputs.0.name: String should have at least 1 character"),
    (lambda m: m["artifacts"][0].update(sha256="abc"), "field artifacts.0.sha256: String should match pattern"),
    (lambda m: m["artifacts"][0].update(file="../../etc/passwd"), "is not a file name inside the package"),
    (lambda m: m["artifacts"][0].update(file="/etc/passwd"), "is not a file name inside the package"),
    (lambda m: m["outputs"].append(m["outputs"][0]), "manifest.json: outputs repeat a tensor name"),
    (lambda m: m["inputs"][0].update(shape=[-1, 1, 100000, 100000]),
     "manifest.json: the server feeds one input of shape [-1, 1, 28, 28]; the manifest declares [[-1, 1, 100000, 100000]]"),
    (lambda m: m["inputs"].append({**m["inputs"][0], "name": "mask"}), "the server feeds one input of shape"),
    (lambda m: m.update(labels=["0", "1", "2"]),
     "manifest.json: output 'logits' has shape [-1, 10]; with 3 labels it must be [-1, 3], a score per label"),
    (lambda m: m["outputs"][1].update(shape=[-1, 3]), "output 'probabilities' has shape [-1, 3]; with 10 labels"),
])
def test_a_malformed_manifest_is_one_line_naming_the_field(shipped, change, message):
    change(shipped)
    text = problem(shipped)
    assert text.startswith("manifest.json: ") and message in text and "\n" not in text


def test_a_newer_schema_version_asks_for_an_upgrade_and_an_older_one_for_a_re_export(shipped):
    shipped["format_version"] = FORMAT_VERSION + 1
    assert "newer than this resserve reads" in problem(shipped) and "upgrade resserve" in problem(shipped)
    shipped["format_version"] = FORMAT_VERSION - 1
    assert "re-export it with `resserve export CHECKPOINT --out DIR`" in problem(shipped)
    assert "not a resserve model package manifest" in problem({"format": "something-else"})


def test_json_nested_too_deeply_is_one_line_not_a_recursion_error():
    """100,000 nested arrays (200 KB) ended `resserve serve` in a RecursionError traceback."""
    with pytest.raises(ManifestError) as error:
        Manifest.from_json("[" * 100_000 + "]" * 100_000, source="manifest.json")
    assert str(error.value) == "manifest.json is not a manifest: its JSON is nested too deeply"


def test_a_manifest_file_past_a_mebibyte_is_refused_unread(tmp_path):
    """A 300 MB file named manifest.json took 1 GB to refuse, at every look at its folder."""
    package = tmp_path / "pkg"
    shutil.copytree(SHIPPED_PACKAGE, package)
    manifest = package / "manifest.json"
    manifest.write_text(manifest.read_text() + " " * (1 << 20))  # valid JSON still, but no manifest export writes
    with pytest.raises(PackageError) as error:
        load_package(package)
    assert str(error.value) == f"{manifest} is over 1 MiB: not a manifest `resserve export` wrote (those are a few KB)"


def test_an_artifact_that_is_a_symlink_out_of_the_package_is_refused(tmp_path):
    package = tmp_path / "pkg"
    shutil.copytree(SHIPPED_PACKAGE, package)
    (package / "model.onnx").unlink()
    (package / "model.onnx").symlink_to(SHIPPED_PACKAGE / "model.onnx")  # right bytes, wrong place
    loaded = load_package(package)
    with pytest.raises(PackageError, match=re.escape("is listed in the manifest but a symbolic link")):
        loaded.read_verified(loaded.find("onnx"))


def test_the_server_refuses_a_malformed_manifest_at_start_in_one_line(tmp_path, shipped):
    package = tmp_path / "pkg"
    shutil.copytree(SHIPPED_PACKAGE, package)
    del shipped["artifacts"][1]["sha256"]
    (package / "manifest.json").write_text(json.dumps(shipped))
    result = run_cli("serve", str(package), "--port", "0", "--http-port", "0", "--metrics-port", "0", timeout=60)
    assert result.returncode == 1
    assert result.stderr.strip().splitlines()[-1] == (
        f"error: {package / 'manifest.json'}: field artifacts.1.sha256: missing")
    assert "Traceback" not in result.stderr
