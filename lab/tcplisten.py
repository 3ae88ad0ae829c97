"""The lab's messaging endpoints and bridge ports: plain TCP listeners (one asyncio process for
all of them).  A real WhatsApp or Viber endpoint, or an obfs4 bridge, speaks its own protocol
after the connection; the probe measures TCP reachability only (contract: tcp/obfs4 targets are
TCP steps), so the listener accepts, reads what the client sends (bounded) and closes when the
client does or after ``IDLE`` seconds.

Run as ``python -m kzprobe.lab.tcplisten CONFIG.json`` inside a lab namespace; CONFIG has
``listen`` ([address, port] pairs: each bound separately, never 0.0.0.0) and ``ready_file``.
"""

from __future__ import annotations

import asyncio
import json
import signal
import sys
from pathlib import Path

#: Seconds a silent client keeps its connection.
IDLE = 10.0
#: Bytes read from a client before the listener hangs up on it.
MAX_READ = 65536


async def _handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    seen = 0
    try:
        while seen < MAX_READ:
            chunk = await asyncio.wait_for(reader.read(4096), timeout=IDLE)
            if not chunk:
                break
            seen += len(chunk)
    except (TimeoutError, OSError):
        pass
    finally:
        writer.close()


async def main(config: dict[str, object]) -> None:
    listen = config["listen"]
    assert isinstance(listen, list)
    servers = [await asyncio.start_server(_handle, str(a), int(p), reuse_address=True) for a, p in listen]
    ready = config.get("ready_file")
    if isinstance(ready, str):
        Path(ready).write_text("ready\n")
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    for s in servers:
        s.close()


if __name__ == "__main__":
    asyncio.run(main(json.loads(Path(sys.argv[1]).read_text())))
