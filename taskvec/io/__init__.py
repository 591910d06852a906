"""Checkpoint I/O: read any format lazily, tensor by tensor; write sharded safetensors atomically."""
from taskvec.io.base import Source, TensorMeta
from taskvec.io.lora import LoraSource
from taskvec.io.safetensors_format import SafetensorsFileWriter, read_header, save_safetensors
from taskvec.io.sources import (
    SafetensorsSource,
    StateDictSource,
    TorchFileSource,
    check_same_keys,
    download_from_hub,
    open_source,
)
from taskvec.io.writer import ShardedWriter, check_output_path, parse_size

__all__ = [
    "Source", "TensorMeta", "open_source", "SafetensorsSource", "StateDictSource", "TorchFileSource", "LoraSource",
    "ShardedWriter", "SafetensorsFileWriter", "save_safetensors", "read_header", "check_same_keys",
    "check_output_path", "download_from_hub", "parse_size",
]
