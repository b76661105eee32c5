"""A `with` block during which a background thread samples something every `period` seconds."""
from __future__ import annotations

import threading
import time


class Poller:
    """Subclasses define `_sample()`; `__enter__` may set up state first and then call super()."""

    period = 0.05

    def _sample(self) -> None:
        raise NotImplementedError

    def __enter__(self):
        self._stop = False

        def poll():
            while not self._stop:
                self._sample()
                time.sleep(self.period)
        self._thread = threading.Thread(target=poll, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop = True
        self._thread.join()
        self._sample()  # the state at the end of the block counts too
