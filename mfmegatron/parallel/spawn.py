"""Run a function on N local processes that form one torch.distributed world.

Used by the tests (gloo ranks on CPU) and by ``python -m mfmegatron.selfcheck`` when it is not
started under torchrun. Each rank gets the torchrun environment variables, calls
``fn(*args, **kwargs)`` and sends back its return value; the parent returns the per-rank results in
rank order. If a rank raises, or dies without reporting, the other ranks are killed (they may be
blocked in a collective waiting for it) and :class:`RankFailure` carries that rank's traceback.
"""

from __future__ import annotations

import io
import multiprocessing as mp
import os
import queue
import socket
import time
import traceback
from typing import Any, Callable


class RankFailure(RuntimeError):
    """A rank raised or died. ``rank`` is the first one that failed; the message has its traceback."""

    def __init__(self, rank: int, message: str) -> None:
        super().__init__(message)
        self.rank = rank


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _serialize(value: Any) -> bytes:
    # torch.save pickles tensors by value; a tensor put on a multiprocessing queue directly would
    # travel as shared memory that dies with the child process.
    import torch

    buffer = io.BytesIO()
    torch.save(value, buffer)
    return buffer.getvalue()


def _deserialize(payload: bytes) -> Any:
    import torch

    return torch.load(io.BytesIO(payload), weights_only=False)


def _rank_main(
    rank: int,
    world_size: int,
    port: int,
    results: mp.Queue,
    fn: Callable[..., Any],
    args: tuple,
    kwargs: dict,
    env: dict[str, str],
) -> None:
    os.environ.update(env)
    os.environ.update(
        {
            "RANK": str(rank),
            "LOCAL_RANK": str(rank),
            "WORLD_SIZE": str(world_size),
            "LOCAL_WORLD_SIZE": str(world_size),
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(port),
        }
    )
    try:
        value = fn(*args, **kwargs)
        results.put((rank, "ok", _serialize(value)))
    except BaseException as error:  # noqa: BLE001  (report everything, including SystemExit)
        results.put((rank, "error", f"{type(error).__name__}: {error}\n\n{traceback.format_exc()}"))
    finally:
        import torch.distributed as dist

        if dist.is_initialized():
            try:
                from mfmegatron.parallel.state import destroy_parallel

                destroy_parallel()
            except Exception:  # noqa: BLE001  (a failed teardown must not mask the result)
                pass


def _summarize(failures: dict[int, str]) -> RankFailure:
    """One exception for all failed ranks, led by the most likely root cause.

    A rank that died without reporting, or raised something other than a lost-peer error, is the
    cause; ranks that then failed inside a collective are listed after it.
    """

    def is_secondary(message: str) -> bool:
        lost_peer = ("Connection reset by peer", "Connection closed by peer", "Broken pipe")
        return any(text in message for text in lost_peer)

    ordered = sorted(failures, key=lambda rank: is_secondary(failures[rank]))
    primary = ordered[0]
    message = failures[primary]
    others = [f"  {failures[rank].splitlines()[0]}" for rank in ordered[1:]]
    if others:
        message += "\nother ranks failed too (likely as a consequence):\n" + "\n".join(others)
    return RankFailure(primary, message)


def run_on_ranks(
    fn: Callable[..., Any],
    world_size: int,
    *args: Any,
    timeout: float = 600.0,
    env: dict[str, str] | None = None,
    **kwargs: Any,
) -> list[Any]:
    """Runs ``fn(*args, **kwargs)`` on ``world_size`` fresh processes; returns results by rank.

    ``fn`` must be importable by name (a module-level function): ranks are started with the
    ``spawn`` method so each gets a clean interpreter, as under torchrun.
    """
    context = mp.get_context("spawn")
    results: mp.Queue = context.Queue()
    port = free_port()
    processes = [
        context.Process(
            target=_rank_main,
            args=(rank, world_size, port, results, fn, args, kwargs, dict(env or {})),
            name=f"rank{rank}",
            daemon=False,
        )
        for rank in range(world_size)
    ]
    for process in processes:
        process.start()

    collected: dict[int, Any] = {}
    failures: dict[int, str] = {}  # rank -> why, in the order they were noticed
    deadline = time.monotonic() + timeout
    first_failure_at: float | None = None
    try:
        while len(collected) + len(failures) < world_size:
            try:
                rank, status, payload = results.get(timeout=0.2)
                if status == "error":
                    failures.setdefault(rank, f"rank {rank} of {world_size} failed:\n{payload}")
                else:
                    collected[rank] = _deserialize(payload)
            except queue.Empty:
                for rank, process in enumerate(processes):
                    # exitcode is set only after the rank's queue writes were flushed, so an empty
                    # queue here means the rank really ended without reporting.
                    if process.exitcode is not None and rank not in collected and rank not in failures:
                        if results.empty():
                            failures[rank] = (
                                f"rank {rank} of {world_size} died with exit code "
                                f"{process.exitcode} before reporting a result (killed, out of "
                                "memory or a crash)"
                            )
            now = time.monotonic()
            if failures and first_failure_at is None:
                first_failure_at = now
            # Peers of a failed rank fail soon after it (a collective loses its partner); wait
            # briefly so the report leads with the rank that failed first for its own reasons.
            if first_failure_at is not None and now - first_failure_at > 2.0:
                break
            if now > deadline:
                missing = sorted(set(range(world_size)) - set(collected) - set(failures))
                failures[missing[0]] = (
                    f"timed out after {timeout:.0f} s waiting for ranks {missing} of "
                    f"{world_size} (a rank is stuck, e.g. in a collective its peers never join)"
                )
                break
    finally:
        for process in processes:
            if failures and process.is_alive():
                process.kill()
        for process in processes:
            process.join(timeout=30)
            if process.is_alive():
                process.kill()
                process.join()
        results.close()
    if failures:
        raise _summarize(failures)
    return [collected[rank] for rank in range(world_size)]
