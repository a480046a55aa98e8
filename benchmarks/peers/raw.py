"""The ceiling: a bare confluent-kafka consumer that only decodes each message (msgspec, the project's
``EVENT_DECODER``). No dedupe, no aggregation, no output: what this machine can consume at all."""

from __future__ import annotations

import sys
import time

import msgspec

from benchmarks.peers.common import TopicReader, base_args, write_result
from meterflow.schemas.events import EVENT_DECODER


def main() -> int:
    args = base_args(__doc__).parse_args()
    reader = TopicReader(args.bootstrap, args.topic, to_end=True)
    decode = EVENT_DECODER.decode
    ok = bad = 0
    for batch in reader.batches():
        for _key, value in batch:
            try:
                decode(value)
                ok += 1
            except (msgspec.DecodeError, UnicodeDecodeError, TypeError):
                bad += 1
    t_end = time.time()
    reader.close()
    write_result(args.out, "raw", events=reader.count, t_first=reader.t_first, t_end=t_end,
                 counters={"decoded": ok, "undecodable": bad},
                 notes="decode only (no totals); clock from the first poll")
    return 0


if __name__ == "__main__":
    sys.exit(main())
