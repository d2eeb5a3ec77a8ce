"""Progress of a long command on stderr, where it never mixes with a report printed on stdout."""

from __future__ import annotations

import time

from rich.console import Console

from edgeprune.errors import raise_if_stopped

err = Console(stderr=True, highlight=False)


class Progress:
    """Progress on stderr: a timestamped line per event and, on a terminal, a live status line with a spinner and
    the elapsed time while a long step (a message ending in '...') runs. Logs and CI get the plain lines."""

    def __init__(self) -> None:
        self.start = time.perf_counter()
        self.status = err.status("") if err.is_terminal else None
        self.live = False

    def __call__(self, message: str) -> None:
        raise_if_stopped()  # each step of a build starts here: a stop signal lost in a library stops it now
        err.print(f"[dim]{time.perf_counter() - self.start:6.1f}s[/dim] {message}", soft_wrap=True)
        if self.status is None:
            return
        if message.endswith("..."):
            self.status.update(message)
            if not self.live:
                self.status.start()
                self.live = True
        else:  # the step ended (or said something): the status line waits for the next long step
            self.stop()

    def stop(self) -> None:
        if self.status is not None and self.live:
            self.status.stop()
            self.live = False
