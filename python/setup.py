"""Builds the package with its gRPC stubs generated from ../proto (or $TASKMASTER_PROTO_DIR)."""

import os
import sys

from setuptools import setup

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import generate_stubs  # noqa: E402  (found through the line above)

# Into the source tree, before setuptools looks for packages: taskmaster.v1 is then packaged like
# any other (git ignores it).
generate_stubs.generate(os.environ.get("TASKMASTER_PROTO_DIR", os.path.join(HERE, "..", "proto")),
                        HERE)
setup()
