"""ult's gRPC stubs (ult.v1), generated from the repository's proto/ult/v1/ult.proto on first import.

The stubs are generated with grpc_tools.protoc (pinned in requirements.txt) into a cache directory keyed by
the proto's sha256, so every Ray worker on a machine shares one copy and a changed proto regenerates.
Set ULT_PROTO_DIR to the folder that holds ult/v1/ult.proto when ult_serve is installed away from the
repository.
"""

from __future__ import annotations

import hashlib
import importlib
import os
import shutil
import sys
import tempfile
from pathlib import Path

from .errors import ProtoError


def _proto_dir() -> Path:
    explicit = os.environ.get("ULT_PROTO_DIR")
    if explicit:
        return Path(explicit)
    # scale/ray/ult_serve/proto.py -> the repository root is three levels up.
    return Path(__file__).resolve().parents[3] / "proto"


def _generate() -> Path:
    proto_dir = _proto_dir()
    proto = proto_dir / "ult" / "v1" / "ult.proto"
    if not proto.is_file():
        raise ProtoError(f"{proto} not found; set ULT_PROTO_DIR to the folder holding ult/v1/ult.proto")
    digest = hashlib.sha256(proto.read_bytes()).hexdigest()[:16]
    cache = Path(os.environ.get("ULT_CACHE", Path.home() / ".cache" / "ult")) / "ray-stubs" / digest
    if (cache / "ult" / "v1" / "ult_pb2_grpc.py").is_file():
        return cache
    from grpc_tools import protoc  # imported here: only needed when generating

    cache.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{digest}-", dir=cache.parent))
    rc = protoc.main(
        [
            "grpc_tools.protoc",
            f"-I{proto_dir}",
            f"--python_out={tmp}",
            f"--grpc_python_out={tmp}",
            str(proto),
        ]
    )
    if rc != 0:
        raise ProtoError(f"grpc_tools.protoc failed on {proto} with exit status {rc}")
    for pkg in (tmp / "ult", tmp / "ult" / "v1"):
        (pkg / "__init__.py").touch()
    try:
        os.rename(tmp, cache)  # atomic; another process may have won the race, which is fine
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
        if not (cache / "ult" / "v1" / "ult_pb2_grpc.py").is_file():
            raise
    return cache


_root = _generate()
if str(_root) not in sys.path:
    sys.path.insert(0, str(_root))

ult_pb2 = importlib.import_module("ult.v1.ult_pb2")
ult_pb2_grpc = importlib.import_module("ult.v1.ult_pb2_grpc")

__all__ = ["ult_pb2", "ult_pb2_grpc"]
