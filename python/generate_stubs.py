"""Generates taskmaster's gRPC stubs from proto/ with grpc_tools (Debian's python3-grpc-tools).

Used by setup.py when the package is built and by CMake for the build tree:
    python3 generate_stubs.py PROTO_DIR OUT_DIR
writes OUT_DIR/taskmaster/v1/{__init__,taskmaster_pb2,taskmaster_pb2_grpc}.py.
"""

import os
import sys


def generate(proto_dir: str, out_dir: str) -> None:
    from grpc_tools import protoc  # imported here: setup.py loads this module before building

    proto = os.path.join("taskmaster", "v1", "taskmaster.proto")
    if not os.path.isfile(os.path.join(proto_dir, proto)):
        raise SystemExit(f"generate_stubs: no {proto} under {proto_dir}")
    target = os.path.join(out_dir, "taskmaster", "v1")
    os.makedirs(target, exist_ok=True)
    args = ["grpc_tools.protoc", f"-I{proto_dir}", f"--python_out={out_dir}",
            f"--grpc_python_out={out_dir}", os.path.join(proto_dir, proto)]
    if protoc.main(args) != 0:
        raise SystemExit(f"generate_stubs: protoc failed on {proto}")
    with open(os.path.join(target, "__init__.py"), "w", encoding="utf-8") as f:
        f.write("# Generated from proto/taskmaster/v1 by generate_stubs.py: do not edit.\n")


if __name__ == "__main__":
    if len(sys.argv) != 3:
        raise SystemExit("usage: generate_stubs.py PROTO_DIR OUT_DIR")
    generate(sys.argv[1], sys.argv[2])
