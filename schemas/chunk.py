"""One consume call of a Kafka partition as one stream item, for ``pipeline.core = "native"`` (a schema: the
source makes it, mediation reads it, so it lives below both).

The Kafka source (sources/kafka.py, ``chunks=True``) emits one :class:`SourceChunk` per consume call instead
of one ``((topic, partition, offset), value)`` tuple per message: its offsets and values come out of the
consumer's messages through ``map`` over the C methods (no Python bytecode per message), and the native mediator
(native/src/mediate.rs ``Mediator.run_chunk``) reads them from the two lists. Message ``k``'s item is
``((topic, part, offsets[k]), values[k])``, built only where something needs it (:func:`chunk_items`; a line
the native mediator hands to the Python Mediator).
"""

from __future__ import annotations

from itertools import repeat
from typing import Any, List, Optional, Sequence, Tuple


class SourceChunk:
    """Consecutive messages of one partition: ``offsets[k]`` and ``values[k]`` (bytes, or None for a
    tombstone) of message ``k``, in log order."""

    __slots__ = ("topic", "part", "offsets", "values")

    def __init__(self, topic: str, part: int, offsets: List[Any], values: List[Optional[bytes]]) -> None:
        self.topic, self.part, self.offsets, self.values = topic, part, offsets, values

    def __len__(self) -> int:
        return len(self.values)

    def item(self, k: int) -> Tuple[Tuple[str, int, Any], Optional[bytes]]:
        """Message ``k`` as the source's per-message item ``((topic, part, offset), value)``."""
        return (self.topic, self.part, self.offsets[k]), self.values[k]

    def __repr__(self) -> str:
        return f"SourceChunk({self.topic!r}, {self.part}, {len(self.values)} messages)"


def chunk_items(batch: Sequence[Any]) -> List[Any]:
    """``batch`` with every :class:`SourceChunk` replaced by its messages' ``(src, raw)`` items, in order (the
    Python Mediator's input); other items are kept as they are."""
    out: List[Any] = []
    for it in batch:
        if type(it) is SourceChunk:
            out += zip(zip(repeat(it.topic), repeat(it.part), it.offsets), it.values)
        else:
            out.append(it)
    return out
