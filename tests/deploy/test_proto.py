"""The generated gRPC modules match protos/icecache.proto (regenerate with the command in
protos/README.md if this fails)."""

import pathlib
import subprocess
import sys

from google.protobuf import descriptor_pb2

from protos import icecache_pb2

ROOT = pathlib.Path(__file__).resolve().parents[2]


def test_generated_modules_match_the_proto(tmp_path):
    out = tmp_path / "icecache.desc"
    subprocess.run([sys.executable, "-m", "grpc_tools.protoc", "-I.", f"--descriptor_set_out={out}",
                    "protos/icecache.proto"], cwd=ROOT, check=True)
    fresh = descriptor_pb2.FileDescriptorSet.FromString(out.read_bytes()).file[0]
    for message in fresh.message_type:  # protoc adds json names that the embedded descriptor omits
        for field in message.field:
            field.ClearField("json_name")
    committed = descriptor_pb2.FileDescriptorProto.FromString(icecache_pb2.DESCRIPTOR.serialized_pb)
    assert fresh == committed
    assert (ROOT / "protos" / "icecache_pb2_grpc.py").read_text().count("def add_IceCacheServicer_to_server") == 1
