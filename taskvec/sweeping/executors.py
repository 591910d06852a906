"""Where sweep points run: in this process, in local processes, on a Ray or a Dask cluster.

Every executor has one job: run `fn(job)` for each job and yield `(index, result)`
as each finishes, so the caller can cache and report points one by one. Jobs carry
model *paths* and parameters only; each worker opens the checkpoints itself and
streams them through `taskvec.merge`, so no weights go through pickles or object stores.
"""
from __future__ import annotations

import importlib
import os
from typing import Any, Callable, Iterator, Sequence

from taskvec.errors import ParameterError

EXECUTORS = ("serial", "local", "ray", "dask")


def require(module: str, what: str):
    """Import an optional dependency of `what` (e.g. "executor='ray'"), or a clear error naming the extra."""
    try:
        return importlib.import_module(module)
    except ImportError:
        raise ParameterError(f"{what} needs {module.split('.')[0]}, which is not installed: "
                             "pip install 'taskvec[scale]'") from None


class Executor:
    """A context manager that runs jobs; subclasses implement `run`."""

    name = "?"
    in_process = False  # jobs may hold in-memory models (no pickling)

    def __init__(self, workers: int | None = None, **options):
        if workers is not None and (not isinstance(workers, int) or isinstance(workers, bool) or workers < 1):
            raise ParameterError(f"workers: expected a positive integer, got {workers!r}")
        self.workers = workers
        self.options = options

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def run(self, fn: Callable[[Any], Any], jobs: Sequence[Any]) -> Iterator[tuple[int, Any]]:
        raise NotImplementedError


class SerialExecutor(Executor):
    """In this process, one point after another: notebooks, in-memory models, debugging (tracebacks as is)."""

    name = "serial"
    in_process = True

    def run(self, fn, jobs):
        for i, job in enumerate(jobs):
            yield i, fn(job)


def _init_worker(threads: int) -> None:
    import torch

    torch.set_num_threads(threads)


def _call_pickled(blob: bytes) -> Any:
    import pickle

    fn, job = pickle.loads(blob)
    return fn(job)


def _by_value(fn, job) -> bytes | None:
    """(fn, job) pickled with cloudpickle (shipped with ray and dask), which carries classes and functions
    defined in a notebook or script by value: spawned workers could not import them by name. None without it."""
    try:
        import cloudpickle
    except ImportError:
        return None
    return cloudpickle.dumps((fn, job))


class LocalExecutor(Executor):
    """`workers` spawned processes on this machine (spawn: no forked torch state), each computing on
    cpu_count / workers threads so that the cores are shared, not oversubscribed."""

    name = "local"

    def __enter__(self):
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor

        workers = self.workers or os.cpu_count() or 1
        threads = max(1, (os.cpu_count() or 1) // workers)
        self._pool = ProcessPoolExecutor(max_workers=workers, mp_context=multiprocessing.get_context("spawn"),
                                         initializer=_init_worker, initargs=(threads,))
        return self

    def __exit__(self, *exc):
        self._pool.shutdown(wait=True, cancel_futures=True)
        return False

    def run(self, fn, jobs):
        from concurrent.futures import as_completed

        futures = {}
        for i, job in enumerate(jobs):
            blob = _by_value(fn, job)
            futures[self._pool.submit(fn, job) if blob is None else self._pool.submit(_call_pickled, blob)] = i
        try:
            for fut in as_completed(futures):
                yield futures[fut], fut.result()
        finally:
            for fut in futures:
                fut.cancel()


class RayExecutor(Executor):
    """Ray: the cluster at RAY_ADDRESS, one already initialised in this process, or a local one with
    `workers` CPUs (shut down again at the end). One CPU per point."""

    name = "ray"

    def __enter__(self):
        ray = require("ray", f"executor={self.name!r}")
        self._owned = False
        if not ray.is_initialized():
            address = os.environ.get("RAY_ADDRESS")
            kw = dict(include_dashboard=False, log_to_driver=False, **self.options)
            if address:
                ray.init(address=address, **kw)
            else:
                ray.init(num_cpus=self.workers, **kw)
            self._owned = True
        self._ray = ray
        return self

    def __exit__(self, *exc):
        if self._owned:
            self._ray.shutdown()
        return False

    def run(self, fn, jobs):
        ray = self._ray
        remote = ray.remote(num_cpus=1, max_retries=0)(fn)
        pending = {remote.remote(job): i for i, job in enumerate(jobs)}
        try:
            while pending:
                done, _ = ray.wait(list(pending), num_returns=1)
                yield pending.pop(done[0]), ray.get(done[0])
        finally:
            for ref in pending:
                ray.cancel(ref)


class DaskExecutor(Executor):
    """Dask distributed: the scheduler at DASK_SCHEDULER_ADDRESS, else a LocalCluster of `workers`
    single-threaded workers (`executor_options` go to LocalCluster, e.g. processes=False)."""

    name = "dask"

    def __enter__(self):
        distributed = require("distributed", f"executor={self.name!r}")
        address = os.environ.get("DASK_SCHEDULER_ADDRESS")
        if address:
            self._cluster, self._client = None, distributed.Client(address)
        else:
            kw = dict(n_workers=self.workers or os.cpu_count() or 1, threads_per_worker=1,
                      dashboard_address=None, **self.options)
            self._cluster = distributed.LocalCluster(**kw)
            self._client = distributed.Client(self._cluster)
        self._distributed = distributed
        return self

    def __exit__(self, *exc):
        self._client.close()
        if self._cluster is not None:
            self._cluster.close()
        return False

    def run(self, fn, jobs):
        futures = [self._client.submit(fn, job, pure=False) for job in jobs]
        index = {f.key: i for i, f in enumerate(futures)}
        try:
            for fut in self._distributed.as_completed(futures):
                yield index[fut.key], fut.result()
        finally:
            self._client.cancel(futures)


_CLASSES = {c.name: c for c in (SerialExecutor, LocalExecutor, RayExecutor, DaskExecutor)}


def get_executor(executor: str | Executor, workers: int | None = None, **options) -> Executor:
    """An executor by name ("serial", "local", "ray", "dask"), or an Executor instance as is."""
    if isinstance(executor, Executor):
        return executor
    if executor not in _CLASSES:
        raise ParameterError(f"executor: unknown {executor!r}; choose from {', '.join(EXECUTORS)}")
    if executor in ("ray", "dask"):
        require("ray" if executor == "ray" else "distributed", f"executor={executor!r}")  # say so before any work
    return _CLASSES[executor](workers, **options)
