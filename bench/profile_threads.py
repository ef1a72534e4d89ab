"""Run a `fedhft` command with cProfile in every thread (cProfile alone sees only the main thread).

Times are each thread's CPU time (wall time would charge GIL and scheduler waits to whatever call was running).
``python bench/profile_threads.py OUT.prof server run ...``: on exit (SIGTERM stops the server cleanly) the
threads' profiles are merged into OUT.prof (read it with ``pstats``). Used by ``bench/server_ingest.py
--profile-server``.
"""

from __future__ import annotations

import cProfile
import pstats
import sys
import threading
import time

PROFILES: list[cProfile.Profile] = []
LOCK = threading.Lock()


def _thread_profile(frame, event, arg):  # noqa: ANN001, ANN202 - the threading.setprofile hook
    """Installed in each new thread: swap in a cProfile.Profile of its own for the rest of the thread."""
    prof = cProfile.Profile(time.thread_time)
    with LOCK:
        PROFILES.append(prof)
    sys.setprofile(None)
    prof.enable()


def main() -> None:
    out, args = sys.argv[1], sys.argv[2:]
    threading.setprofile(_thread_profile)
    main_prof = cProfile.Profile(time.thread_time)
    PROFILES.append(main_prof)
    from fedhft.cli import main as cli

    main_prof.enable()
    try:
        cli.main(args=args, prog_name="fedhft", standalone_mode=False)
    finally:
        main_prof.disable()
        with LOCK:
            for p in PROFILES:
                p.disable()
            stats = pstats.Stats(PROFILES[0])
            for p in PROFILES[1:]:
                try:
                    stats.add(p)
                except TypeError:  # a thread that never ran a profiled call
                    continue
        stats.dump_stats(out)


if __name__ == "__main__":
    main()
