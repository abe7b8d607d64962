"""The committed gRPC stubs are what proto/ generates, and match Triton's published protocol."""

import importlib.util
from pathlib import Path

from google.protobuf import descriptor_pb2

ROOT = Path(__file__).resolve().parents[2]


def _generator():
    spec = importlib.util.spec_from_file_location("generate", ROOT / "proto" / "generate.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_committed_stubs_are_not_stale(tmp_path):
    written = _generator().generate(tmp_path)
    committed = ROOT / "serve" / "stubs"
    assert {p.name for p in written} | {"__init__.py"} == {p.name for p in committed.glob("*.py")}
    for path in [*written, tmp_path / "__init__.py"]:
        assert path.read_text() == (committed / path.name).read_text(), f"{path.name} is stale: run python proto/generate.py"


def test_kserve_descriptors_are_identical_to_tritonclients():
    from tritonclient.grpc import model_config_pb2 as triton_config, service_pb2 as triton_service

    from resserve.serve.stubs import grpc_service_pb2, model_config_pb2

    for ours, theirs in ((grpc_service_pb2, triton_service), (model_config_pb2, triton_config)):
        a, b = descriptor_pb2.FileDescriptorProto(), descriptor_pb2.FileDescriptorProto()
        ours.DESCRIPTOR.CopyToProto(a)
        theirs.DESCRIPTOR.CopyToProto(b)
        assert a == b
