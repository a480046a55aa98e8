"""``python tests/e2e/failing_step.py KIND METER-ARGS...``: the real ``meter`` main() with a failing meter step.

The configured flow is built and run as usual (source, mediation, the meter step, sinks), except that
the meter step's batch handler raises on its first batch: ``meter`` a MeterError (as the step does on
purpose, e.g. for a snapshot it cannot read), ``bug`` a ZeroDivisionError (a programming error).
Bytewax runs the step in Rust, so the failure arrives the way every step failure does: a Rust panic
report on fd 2, then a BytewaxRuntimeError chained to the original exception.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

MESSAGE = "meter step: customer acme|cust_1: state version 99 is newer than this build's 4; upgrade meterflow"


def main() -> int:
    import meterflow.dataflows.metering as metering
    from meterflow.base.errors import MeterError
    from meterflow.cli import main as meter_main

    kind, argv = sys.argv[1], sys.argv[2:]

    def on_batch(self, values):
        if kind == "meter":
            raise MeterError(MESSAGE)
        return 1 / 0

    metering._ShardLogic.on_batch = on_batch
    return meter_main(argv)


if __name__ == "__main__":
    sys.exit(main())
