"""The committed gRPC stubs match jaxserve/v1/jaxserve.proto: regenerate them and compare byte for byte, so a
proto edit without regenerating (or a hand edit of a generated file) fails here rather than on the wire."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

pytest.importorskip("grpc_tools")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROTO = "jaxserve/v1/jaxserve.proto"
GENERATED = ("jaxserve/v1/jaxserve_pb2.py", "jaxserve/v1/jaxserve_pb2.pyi", "jaxserve/v1/jaxserve_pb2_grpc.py")
REGENERATE = f"python -m grpc_tools.protoc -I. --python_out=. --pyi_out=. --grpc_python_out=. {PROTO}"


def test_committed_stubs_match_the_proto(tmp_path):
    out = str(tmp_path)
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "grpc_tools.protoc",
            "-I.",
            f"--python_out={out}",
            f"--pyi_out={out}",
            f"--grpc_python_out={out}",
            PROTO,
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stderr
    from jaxserve.v1.jaxserve_pb2_grpc import GRPC_GENERATED_VERSION

    stale = []
    for path in GENERATED:
        with open(os.path.join(ROOT, path), "rb") as f:
            committed = f.read()
        with open(os.path.join(out, path), "rb") as f:
            fresh = f.read()
        if committed != fresh:
            stale.append(path)
    assert not stale, (
        f"stale generated stubs {stale}: regenerate them from the repository root with\n"
        f"    {REGENERATE}\n(with grpcio-tools {GRPC_GENERATED_VERSION}, the version they were made "
        f"with, "
        f"or update that version in pyproject.toml too)"
    )
