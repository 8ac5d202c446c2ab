"""The API's files carry what app developers' code generators need, and buf guards comments.

buf itself runs in scripts/check (lint with STANDARD and COMMENTS, breaking against the last
release); this keeps the configuration and the per-language file options from drifting.
"""

from __future__ import annotations

from pathlib import Path

from google.protobuf import descriptor_pb2

from pulsesync.v1 import (
    common_pb2,
    devices_pb2,
    events_pb2,
    ingest_pb2,
    nudges_pb2,
    privacy_pb2,
    profiles_pb2,
    timeline_pb2,
)

ROOT = Path(__file__).resolve().parent.parent
MODULES = (
    common_pb2, devices_pb2, events_pb2, ingest_pb2,
    nudges_pb2, privacy_pb2, profiles_pb2, timeline_pb2,
)  # fmt: skip
EXPECTED = {
    "go_package": "github.com/pulsesync/pulsesync/gen/go/pulsesync/v1;pulsesyncv1",
    "java_package": "com.pulsesync.v1",
    "java_multiple_files": True,
    "objc_class_prefix": "PSX",
    "csharp_namespace": "PulseSync.V1",
    "swift_prefix": "PS",
}


def test_every_proto_file_is_in_this_list() -> None:
    on_disk = {p.name for p in (ROOT / "proto" / "pulsesync" / "v1").glob("*.proto")}
    assert on_disk == {m.DESCRIPTOR.name.rsplit("/", 1)[-1] for m in MODULES}


def test_every_file_has_the_options_of_the_languages_apps_use() -> None:
    for module in MODULES:
        proto = descriptor_pb2.FileDescriptorProto()
        module.DESCRIPTOR.CopyToProto(proto)
        options = {field.name: value for field, value in proto.options.ListFields()}
        assert {k: options.get(k) for k in EXPECTED} == EXPECTED, proto.name


def test_buf_lints_standard_and_comments() -> None:
    lines = [line.split("#")[0].rstrip() for line in (ROOT / "buf.yaml").read_text().splitlines()]
    lint = lines[lines.index("lint:") : lines.index("breaking:")]
    assert "    - STANDARD" in lint
    assert "    - COMMENTS" in lint
