"""Mediation as Bytewax operators with named, typed outputs (in the style of Bytewax's ``BranchOut`` and
``KafkaOpOut``): what goes on to the meter step, keyed by shard, and the dead letters, which go straight
to the sinks and join the meter step's outputs after it.

Each operator runs its mediator once per input batch (``flat_map_batch``) into one typed item per batch
(:class:`~meterflow.operators.mediate.Mediated` bundled per shard, or
:class:`~meterflow.operators.changelog.Changes`); two ``flat_map_batch`` steps then split that stream into
its outputs, so the whole operator costs three Python calls per batch and none per event, shard or key.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Generic, List, Optional, Tuple, TypeVar, Union

import bytewax.operators as op
from bytewax.dataflow import Stream, operator
from bytewax.operators import KeyedStream

from meterflow.operators.changelog import ChangelogMediator, Changes
from meterflow.operators.entitlements import EntitlementUpdate
from meterflow.operators.mediate import Bundle, Mediator, bundle_shards, raw_columns, shard_of
from meterflow.schemas.chunk import SourceChunk, chunk_items
from meterflow.schemas.records import DeadLetter, Emission, RawEvents, RawRows

V = TypeVar("V")

Raw = Tuple[Any, Optional[bytes]]  # (source location, the message's bytes)


@dataclass(frozen=True)
class MediateOut(Generic[V]):
    """The streams of a mediation step."""

    events: KeyedStream[V]
    """What the meter step takes, keyed by shard (:func:`~meterflow.operators.mediate.shard_of`)."""

    dead_letters: Stream[Emission]
    """One ``Emission(dead_letters=[...], raw_events=...)`` per input batch that had dead letters or archived
    events (only those two set), in the epoch of the batch: the sinks take it as they take the meter step's
    Emissions."""


# One batch's mediation on its way to the split: (per-shard items, dead letters, raw archive columns).
_Split = Tuple[List[Tuple[str, Any]], List[DeadLetter], Optional[Union[RawEvents, RawRows]]]


def _keyed(batch: List[_Split]) -> List[Tuple[str, Any]]:
    if len(batch) == 1:
        return batch[0][0]
    return [item for keyed, _dead, _raw in batch for item in keyed]


def _dead_letters(batch: List[_Split]) -> List[Emission]:
    return [Emission(dead_letters=dead, raw_events=raw) for _keyed, dead, raw in batch if dead or raw]


@operator
def mediate(step_id: str, up: Stream[Raw], mediator: Mediator, shards: int,
            archive_raw: bool = False) -> MediateOut[Bundle]:
    """Mediate usage events: ``events`` carries one ``(shard, {tenant|customer: [MeteredEvent, ...]})`` bundle
    per shard with events in an input batch (:func:`~meterflow.operators.mediate.bundle_shards`),
    ``dead_letters`` the batch's dead letters and, with ``archive_raw``, its accepted events as raw archive
    columns (:func:`~meterflow.operators.mediate.raw_columns`).

    :arg step_id: Unique ID.
    :arg up: ``(src, raw)`` items, as every source emits them, or :class:`~meterflow.schemas.chunk.SourceChunk`
        items (the Kafka source's ``chunks``), which the native mediator reads as they are.
    :arg mediator: Called once per batch; a :class:`~meterflow.operators.native.NativeMediator` (``split``)
        makes native shard bundles instead (``pipeline.core = "native"``).
    :arg shards: ``pipeline.shards``.
    :arg archive_raw: ``pipeline.archive_raw``.
    """

    def run(batch: List[Raw]) -> List[_Split]:
        if batch and type(batch[0]) is SourceChunk:
            batch = chunk_items(batch)
        groups, dead = mediator(batch)
        return [(bundle_shards(groups, shards), dead, raw_columns(groups) if archive_raw else None)]

    split: Any = getattr(mediator, "split", None)  # a NativeMediator (pipeline.core = "native"): native bundles

    def run_native(batch: List[Raw]) -> List[_Split]:
        return [split(batch, archive_raw)]

    mediated = op.flat_map_batch("mediate", up, run if split is None else run_native)
    return MediateOut(op.flat_map_batch("events", mediated, _keyed),
                      op.flat_map_batch("dead_letters", mediated, _dead_letters))


@operator
def mediate_changelog(step_id: str, up: Stream[Raw], mediator: ChangelogMediator,
                      shards: int) -> MediateOut[EntitlementUpdate]:
    """Mediate entitlement changelog records: ``events`` carries each valid record as ``(shard,
    EntitlementUpdate)``, the shard being its customer's, in log order; ``dead_letters`` the batch's
    ``invalid_entitlement`` dead letters.

    :arg step_id: Unique ID.
    :arg up: ``(src, raw)`` changelog records.
    :arg mediator: Called once per batch.
    :arg shards: ``pipeline.shards``.
    """

    def run(batch: List[Raw]) -> List[_Split]:
        changes: Changes = mediator(batch)
        return [([(shard_of(key, shards), update) for key, update in changes.updates], changes.dead_letters, None)]

    mediated = op.flat_map_batch("mediate", up, run)
    return MediateOut(op.flat_map_batch("events", mediated, _keyed),
                      op.flat_map_batch("dead_letters", mediated, _dead_letters))
