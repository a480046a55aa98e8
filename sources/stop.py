"""A process-wide request to stop reading input: sources finish their partitions at the next batch.

``meter run`` sets it on the first SIGINT/SIGTERM, so the flow drains what it has read, every sink
flushes and closes (the webhook outbox, the Kafka producers), the last snapshot is written, and the
process exits cleanly; a second signal interrupts at once.
"""

from __future__ import annotations

import threading

STOP = threading.Event()
