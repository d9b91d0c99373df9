"""Reading and writing mlx-lm style safetensors folders, with checks that turn truncated
or corrupt files into one-line MlxqErrors instead of crashes deep inside MLX."""

import json
import os
import struct
from pathlib import Path

import mlx.core as mx

from .errors import MlxqError

INDEX_FILE = "model.safetensors.index.json"
MAX_SHARD_BYTES = 5 << 30  # mlx-lm's 5 GB shards


def check_safetensors(path: Path) -> dict:
    """Validate the header of a safetensors file against its size; return the header."""
    try:
        size = os.path.getsize(path)
        with open(path, "rb") as f:
            raw = f.read(8)
            if len(raw) < 8:
                raise ValueError("file shorter than its 8-byte header length")
            (n,) = struct.unpack("<Q", raw)
            if n > size - 8:
                raise ValueError("header length beyond end of file")
            header = json.loads(f.read(n))
        if not isinstance(header, dict):
            raise ValueError("its header is not a JSON object")
    except OSError as e:
        raise MlxqError(f"cannot read {path}: {e.strerror or e}") from None
    except (ValueError, UnicodeDecodeError, RecursionError) as e:
        raise MlxqError(f"{path} is not a valid safetensors file (truncated or corrupt: {e})") from None
    end = 0
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            end = max(end, int(info["data_offsets"][1]))
        except (KeyError, TypeError, IndexError, ValueError):
            raise MlxqError(f"{path} is not a valid safetensors file (bad header entry {name!r})") from None
    if 8 + n + end > size:
        raise MlxqError(
            f"{path} is truncated: its header describes {8 + n + end} bytes but the file has {size}"
        )
    return header


def weight_files(folder: Path) -> list[Path]:
    """The safetensors files of a model folder (sharded via the index, or model*.safetensors)."""
    index = folder / INDEX_FILE
    if index.exists():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
            files = sorted({folder / name for name in weight_map.values()})
        except (OSError, ValueError, KeyError, TypeError, AttributeError, RecursionError) as e:
            raise MlxqError(f"cannot read {index}: {type(e).__name__}: {e}") from None
        missing = [f.name for f in files if not f.exists()]
        if missing:
            raise MlxqError(f"{folder}: shard(s) listed in {INDEX_FILE} are missing: {', '.join(missing)}")
        return files
    files = sorted(folder.glob("model*.safetensors"))
    if not files:
        files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise MlxqError(f"{folder} has no .safetensors weight files")
    return files


def load_weights(folder: Path) -> dict:
    """All tensors of a folder (lazily mapped by MLX), after validating every file."""
    weights = {}
    for f in weight_files(folder):
        check_safetensors(f)
        try:
            weights.update(mx.load(str(f)))
        except (RuntimeError, ValueError) as e:
            raise MlxqError(f"cannot load {f}: {e}") from None
    return weights


def _shards(weights: dict, max_bytes: int) -> list[dict]:
    shards, size = [], 0
    for k, v in weights.items():
        if not shards or size + v.nbytes > max_bytes:
            shards.append({})
            size = 0
        shards[-1][k] = v
        size += v.nbytes
    return shards


def save_weights(folder: Path, weights: dict, max_shard_bytes: int = MAX_SHARD_BYTES) -> list[Path]:
    """Write ``model.safetensors`` (or numbered shards) plus mlx-lm's index file."""
    shards = _shards(weights, max_shard_bytes)
    n = len(shards)
    names = ["model.safetensors"] if n == 1 else [
        f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)
    ]
    weight_map, paths = {}, []
    for name, shard in zip(names, shards):
        mx.save_safetensors(str(folder / name), shard, metadata={"format": "mlx"})
        weight_map.update({k: name for k in shard})
        paths.append(folder / name)
    index = {
        "metadata": {"total_size": sum(v.nbytes for v in weights.values())},
        "weight_map": dict(sorted(weight_map.items())),
    }
    (folder / INDEX_FILE).write_text(json.dumps(index, indent=4))
    return paths
