"""Stage 6, shard streaming: our bounded-memory streamer and transformers' loader as the reference."""

from stages.stream.bounded import BoundedStreamer
from stages.stream.hf_loader import TransformersStreamer

__all__ = ["BoundedStreamer", "TransformersStreamer"]
