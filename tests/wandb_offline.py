"""Read what an offline W&B run recorded, straight from its `.wandb` file.

wandb >= 0.18 writes offline runs through its Go core with no Python reader, so tests parse
the LevelDB-style log (7-byte file header, 32 KiB blocks, 7-byte record headers) and decode
the protobuf records themselves: the test checks what W&B would upload, not our own calls.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Any

BLOCK = 32768
HEADER = 7


def _records(path: Path) -> list[bytes]:
    data = path.read_bytes()
    records, partial, pos = [], b"", HEADER
    while pos + HEADER <= len(data):
        left = BLOCK - pos % BLOCK
        if left < HEADER:
            pos += left
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos : pos + HEADER])
        pos += HEADER
        chunk, pos = data[pos : pos + length], pos + length
        if kind == 1:
            records.append(chunk)
        elif kind == 2:
            partial = chunk
        elif kind == 3:
            partial += chunk
        elif kind == 4:
            records.append(partial + chunk)
    return records


def _key(item: Any) -> str:
    return item.key or "/".join(item.nested_key)


def read_offline_run(run_dir: Path) -> dict[str, Any]:
    """name, group, project, config (dict), summary (dict), exit_code of one offline run."""
    from wandb.proto import wandb_internal_pb2 as pb

    (wandb_file,) = Path(run_dir).glob("*.wandb")
    out: dict[str, Any] = {"config": {}, "summary": {}, "exit_code": None}
    for raw in _records(wandb_file):
        record = pb.Record()
        record.ParseFromString(raw)
        kind = record.WhichOneof("record_type")
        if kind == "run":
            out.update(
                name=record.run.display_name,
                group=record.run.run_group,
                project=record.run.project,
            )
        elif kind == "config":
            for item in record.config.update:
                out["config"][_key(item)] = json.loads(item.value_json)
        elif kind == "summary":
            for item in record.summary.update:
                out["summary"][_key(item)] = json.loads(item.value_json)
        elif kind == "exit":
            out["exit_code"] = record.exit.exit_code
    return out
