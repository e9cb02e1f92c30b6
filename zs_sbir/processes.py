"""Worker processes that fail instead of hanging: multiprocessing.Pool waits forever for the result of a worker
that died (killed for memory, a crash inside an image decoder, SIGBUS from a memory map on a full disk), so a
command that used it could hang until someone noticed. concurrent.futures notices the death; this turns it into
one line that says what stopped."""
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool

from zs_sbir.cli import UserError


class WorkerDied(UserError):
    """A worker process ended without a result (a signal, not an exception)."""


def map_in_processes(function, items, workers, what, chunksize=1):
    """Yield function(item) for each item, in order, computed in `workers` processes.

    A worker that dies raises WorkerDied naming `what` (e.g. "drawing the generated dataset"); an exception
    inside `function` reaches the caller as itself, as with a plain loop.
    """
    try:
        with ProcessPoolExecutor(max(1, workers)) as pool:
            yield from pool.map(function, items, chunksize=chunksize)
    except BrokenProcessPool as error:
        raise WorkerDied(f'{what} stopped: a worker process died ({error}); the usual causes are too little '
                         f'memory or disk space, so check those, or run with fewer --workers') from error
