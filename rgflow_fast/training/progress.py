"""Progress of long loops: a tqdm bar on a terminal, a plain line now and then otherwise."""
from __future__ import annotations

import shutil
import sys
import time

from tqdm import tqdm

__all__ = ["Progress", "LOG_SECONDS"]

# Without a terminal (nohup, a log file, CI) a line is logged at most this often.
LOG_SECONDS = 30.0


class Progress:
    """Report ``total`` units of work on stderr.

    On a terminal: a tqdm bar. Otherwise: one plain line every :data:`LOG_SECONDS` and one
    at the end, so that a log shows the run is alive. Nothing when ``enabled`` is false
    (``--quiet``, ranks other than 0).
    """

    def __init__(self, total: int, desc: str, *, initial: int = 0, unit: str = "step", enabled: bool = True):
        self.total, self.desc, self.unit, self.n = total, desc, unit, initial
        self.enabled = enabled
        self.bar = None
        if enabled and sys.stderr.isatty():
            # the terminal's width, 80 where it reports none (tqdm would then draw nothing)
            width = shutil.get_terminal_size((80, 24)).columns
            self.bar = tqdm(total=total, initial=initial, desc=desc, unit=unit, ncols=width, leave=True)
        self._t0 = self._last = time.perf_counter()
        self._start = initial

    def update(self, n: int = 1, **status) -> None:
        """``n`` more units done; ``status`` (name → value) is shown beside the count."""
        self.n += n
        text = ", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in status.items())
        if self.bar is not None:
            self.bar.set_postfix_str(text, refresh=False)
            self.bar.update(n)
            return
        now = time.perf_counter()
        if self.enabled and (now - self._last >= LOG_SECONDS or self.n >= self.total):
            self._last = now
            rate = (self.n - self._start) / max(now - self._t0, 1e-9)
            eta = (self.total - self.n) / rate if rate > 0 else float("inf")
            print(f"{self.desc}: {self.n}/{self.total} {self.unit}s" + (f", {text}" if text else "")
                  + f" ({rate:.3g} {self.unit}s/s, {now - self._t0:.0f} s elapsed, eta {eta:.0f} s)",
                  file=sys.stderr, flush=True)

    def write(self, line: str) -> None:
        """Print a line (on stdout) without breaking the bar."""
        if self.enabled:
            (self.bar.write if self.bar is not None else print)(line)
            sys.stdout.flush()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
