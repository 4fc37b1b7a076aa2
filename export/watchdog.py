"""The export's status-line writer, run as its own process by export.progress.

It reads what the export is doing from its standard input (one tab-separated message per line) and,
whenever the export has written nothing for INTERVAL seconds, writes the innermost activity's status
to standard error. A process of its own, because a thread of the export cannot speak while a library
call holds the GIL (onnx and the quantizers do, for tens of seconds on a large model). Standard library
only: it starts in milliseconds and ends when the export closes the pipe or exits.

Messages: `line` (the export wrote a line), `push<TAB>{json activity}`, `count<TAB>id<TAB>done<TAB>work_done`,
`pop<TAB>id`.
"""

from __future__ import annotations

import json
import os
import select
import sys
import time


def status(activity: dict, now: float) -> str:
    """Return an activity's status line: counted work with the time left, or a heartbeat."""
    elapsed = now - activity["started"]
    if activity.get("total") is None:
        expected = activity.get("expected")
        if expected and elapsed < expected:
            return f"{activity['what']}: {elapsed:.0f} s, about {expected - elapsed:.0f} s left"
        return f"{activity['what']}: still working, {elapsed:.0f} s"
    done, total = activity.get("done", 0), activity["total"]
    work, work_done = activity.get("work"), activity.get("work_done", 0.0)
    share_done, share_total = (work_done, work) if work else (done, total)
    left = "estimating the time left" if not share_done else \
        f"about {elapsed / share_done * max(0.0, share_total - share_done):.0f} s left"
    return f"{activity['what']}: {done}/{total} {activity.get('unit', 'inputs')}, {elapsed:.0f} s, {left}"


def handle(message: str, stack: list[dict]) -> bool:
    """Apply one message to the activity stack; return True if it says the export wrote a line."""
    kind, _, rest = message.partition("\t")
    if kind == "line":
        return True
    if kind == "push":
        stack.append(json.loads(rest))
    elif kind == "count":
        ident, done, work_done = rest.split("\t")
        for activity in stack:
            if activity["id"] == ident:
                activity["done"], activity["work_done"] = int(done), float(work_done)
    elif kind == "pop":
        stack[:] = [a for a in stack if a["id"] != rest]
    return False


def main(interval: float) -> None:
    stack: list[dict] = []
    last = time.monotonic()
    pending = b""
    source = sys.stdin.fileno()
    while True:
        ready, _, _ = select.select([source], [], [], 0.25)
        if ready:
            chunk = os.read(source, 65536)
            if not chunk:
                return
            pending += chunk
            *lines, pending = pending.split(b"\n")
            for line in lines:
                if handle(line.decode("utf-8", "replace"), stack):
                    last = time.monotonic()
        now = time.monotonic()
        current = stack[-1] if stack else None
        if current is not None and not current.get("bar") and now - last >= interval:
            os.write(2, f"{time.strftime('%H:%M:%S')}       {status(current, now)}\n".encode())
            last = now


if __name__ == "__main__":
    try:
        main(float(sys.argv[1]) if len(sys.argv) > 1 else 5.0)
    except KeyboardInterrupt:  # Ctrl-C reaches the whole process group; the export reports it
        pass
