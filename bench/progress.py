"""Progress lines with an estimate of the time left.

A run is planned as steps, each with its estimated seconds. When a step finishes, its line gets
the elapsed time and the time left: the planned seconds of the steps still to come, scaled by how
long the finished steps took against their plan (shrunk towards the plan while little has run,
so one slow first step does not multiply every estimate).
"""

import time

PRIOR_SECONDS = 10.0  # the plan counts as this many seconds of evidence that it is right


def format_duration(seconds):
    """``42 s``, ``3 min 05 s``."""
    seconds = max(0, round(seconds))
    return f"{seconds} s" if seconds < 60 else f"{seconds // 60} min {seconds % 60:02d} s"


class Progress:
    """``planned``: ``{step: estimated seconds}``; ``finish(step, text)`` prints ``text`` with the
    elapsed time (since ``started``, a ``time.perf_counter()``) and the time left."""

    def __init__(self, planned, started=None, out=None):
        self.left = dict(planned)
        self.started = time.perf_counter() if started is None else started
        self.out = out or (lambda line: print(line, flush=True))
        self.planned_done = self.actual_done = 0.0
        self.last = time.perf_counter()

    def seconds_left(self):
        """The planned seconds still to come, scaled by actual / planned of the finished steps."""
        scale = (self.actual_done + PRIOR_SECONDS) / (self.planned_done + PRIOR_SECONDS)
        return scale * sum(self.left.values())

    def finish(self, step, text):
        now = time.perf_counter()
        self.planned_done += self.left.pop(step, 0.0)
        self.actual_done += now - self.last
        self.last = now
        left = f", about {format_duration(self.seconds_left())} left" if self.left else ""
        self.out(f"{text} [{format_duration(now - self.started)} elapsed{left}]")
