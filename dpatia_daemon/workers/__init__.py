"""Running analyses in supervised worker processes.

In the main daemon process: :mod:`.supervisor` (the ``workers`` service) composes a
:mod:`.pool` (the processes: spawn, hello, heartbeats, TERM/KILL, restart backoff; no
jobs) and a :mod:`.dispatcher` (the jobs: :mod:`.candidates`, claiming, deadlines,
cancellation, each job's fate), with one job's SPS writes in :mod:`.run`, its folder in
:mod:`.folders` and the folder's file names in :mod:`.workfolder`; :mod:`.interpreter`
checks ``[workers] python`` at start.  Failures are judged
transient or permanent in :mod:`.faults`; the shared view of each SPS's health is
:mod:`.health`, and the jobs held back (deferred, or waiting for their SPS) are in
:mod:`.waiting`.  :mod:`.child` is the
worker process itself, and :mod:`.commands` is the AMP conversation between the two,
by direction."""
