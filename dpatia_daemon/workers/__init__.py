"""Running analyses in supervised worker processes.

The daemon side (the pool of processes, dispatch, one job's run, the work-folder
contract) runs in the main daemon process; :mod:`.child` is the worker process itself,
and :mod:`.commands` is the AMP conversation between the two."""
