"""A clock for training runs bounded by `train.max_time` that does not depend on the machine's
speed: each reading of train.py's clock is `tick` seconds after the one before. A run of max_time
T then makes the same number of steps on an idle machine and on one whose other core is busy, so
its tests count steps instead of hoping for them.

In-process: `install(monkeypatch, tick)`. In a process of its own:
`python -m tests.fake_clock TICK ARGS...` runs `mtkit ARGS...` on this clock (cwd: the repository).
"""

import itertools
import sys
import types


def clock(tick: float):
    readings = itertools.count()
    return types.SimpleNamespace(perf_counter=lambda: next(readings) * tick)


def install(monkeypatch, tick: float) -> None:
    import mtkit.train

    monkeypatch.setattr(mtkit.train, "time", clock(tick))


if __name__ == "__main__":
    import mtkit.train
    from mtkit.cli import main

    mtkit.train.time = clock(float(sys.argv[1]))
    main(sys.argv[2:])
