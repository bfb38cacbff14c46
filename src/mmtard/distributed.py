"""torchrun environment and rank helpers.

``torchrun --nproc_per_node=8 -m mmtard distill --config ...`` sets RANK/WORLD_SIZE/LOCAL_RANK;
without them everything runs as a single process. NCCL on GPUs, gloo on CPU.

A rank that dies leaves the others blocked in a collective: torchrun's agent stops them at once,
and without an agent the process-group timeout does (``MMTARD_DIST_TIMEOUT`` seconds, default
600), after which they exit with an error and the run resumes from its last checkpoint.
"""

from __future__ import annotations

import contextlib
import datetime
import os
from dataclasses import dataclass
from typing import Any, Callable, Iterator, TypeVar

import torch
import torch.distributed as dist

from mmtard.errors import ConfigError, MmtardError

T = TypeVar("T")
TIMEOUT_ENV = "MMTARD_DIST_TIMEOUT"
# What gloo and NCCL put in the RuntimeError of a collective whose peer died or never answered.
# Not the bare backend names: a local failure (NCCL out of memory, a bad tensor) names them too,
# and blaming it on a peer would send the user to rerun a command that fails the same way.
_LOST_PEER_MARKERS = ("Timed out", "timed out", "Connection closed by peer", "Connection reset", "ncclRemoteError",
                      "remote process exit", "communicator was aborted", "Watchdog caught collective operation timeout")


class RankLostError(MmtardError):
    """Another rank died or stopped answering within the process-group timeout."""


@dataclass(frozen=True)
class DistEnv:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    #: which machine: ranks with the same node share local files (the clean-teacher cache)
    node: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def timeout_seconds() -> float:
    """How long a collective waits for a missing rank: ``MMTARD_DIST_TIMEOUT`` or 600 s."""
    text = os.environ.get(TIMEOUT_ENV, "600")
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if value <= 0:
        raise ConfigError(f"{TIMEOUT_ENV}={text!r}: expected a positive number of seconds")
    return value


def _env_int(name: str, default: str | None = None) -> int:
    """An integer torchrun sets in the environment; a missing or malformed one is named (a process
    started by hand with WORLD_SIZE but no RANK would otherwise fail with a bare KeyError)."""
    text = os.environ.get(name, default)
    if text is None:
        raise ConfigError(f"{name} is not set although WORLD_SIZE={os.environ.get('WORLD_SIZE')}: launch the "
                          "ranks with torchrun, which sets RANK, LOCAL_RANK and WORLD_SIZE")
    try:
        return int(text)
    except ValueError:
        raise ConfigError(f"{name}={text!r}: expected an integer (torchrun sets it)") from None


def env_world_size() -> int:
    """The number of ranks torchrun launched (1 without torchrun), known before joining the group."""
    return _env_int("WORLD_SIZE", "1")


def node_index(rank: int) -> int:
    """The machine a rank runs on, from torchrun's ``GROUP_RANK`` (or ``rank // LOCAL_WORLD_SIZE``).

    Without either, each rank counts as its own node: sharing a file between ranks is only safe
    when they are known to share a machine.
    """
    if "GROUP_RANK" in os.environ:
        return _env_int("GROUP_RANK")
    if "LOCAL_WORLD_SIZE" in os.environ:
        return rank // max(1, _env_int("LOCAL_WORLD_SIZE"))
    return rank


def init_distributed(device_type: str, timeout_s: float | None = None) -> DistEnv:
    """Join the process group torchrun describes in the environment (once)."""
    world_size = env_world_size()
    if world_size <= 1:
        return DistEnv()
    timeout_s = timeout_seconds() if timeout_s is None else timeout_s
    rank, local_rank = _env_int("RANK"), _env_int("LOCAL_RANK", "0")
    if not dist.is_initialized():
        backend = "nccl" if device_type == "cuda" else "gloo"
        if device_type == "cuda":
            torch.cuda.set_device(local_rank)
        dist.init_process_group(backend=backend, timeout=datetime.timedelta(seconds=timeout_s))
    return DistEnv(rank=rank, world_size=world_size, local_rank=local_rank, node=node_index(rank))


def current_env() -> DistEnv:
    if dist.is_available() and dist.is_initialized():
        rank = dist.get_rank()
        return DistEnv(rank, dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")), node_index(rank))
    return DistEnv()


def all_reduce_mean(tensor: torch.Tensor) -> torch.Tensor:
    """Mean over ranks; the identity in a single process."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        tensor = tensor.clone()
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
        tensor /= dist.get_world_size()
    return tensor


def barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def destroy() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def run_on_main(fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """Run ``fn`` on rank 0 alone and hand its result, or its refusal, to every rank.

    For steps that touch shared files (clearing a run folder, choosing the checkpoint to resume
    from, reading an evaluation record): the other ranks never race rank 0, and a refusal on rank 0
    stops every rank with the same message instead of leaving them blocked in the next collective.
    """
    env = current_env()
    if not env.enabled:
        return fn(*args, **kwargs)
    payload: list = [None]
    failure: BaseException | None = None
    if env.is_main:
        try:
            payload[0] = ("ok", fn(*args, **kwargs))
        except BaseException as exc:  # every rank stops (an interrupt too); rank 0 keeps its own traceback
            failure = exc
            payload[0] = ("error", exc if isinstance(exc, MmtardError) else MmtardError(f"rank 0 failed: {exc!r}"))
    dist.broadcast_object_list(payload, src=0)
    if failure is not None:
        raise failure
    kind, value = payload[0]
    if kind == "error":
        raise value
    return value


def broadcast_object(obj: T) -> T:
    """Rank 0's ``obj`` on every rank; the identity in a single process."""
    if not current_env().enabled:
        return obj
    payload = [obj]
    dist.broadcast_object_list(payload, src=0)
    return payload[0]


def all_gather_object(obj: Any) -> list:
    """Every rank's ``obj``, in rank order (picklable objects, over gloo or NCCL)."""
    env = current_env()
    if not env.enabled:
        return [obj]
    out: list = [None] * env.world_size
    dist.all_gather_object(out, obj)
    return out


@contextlib.contextmanager
def lost_ranks_reported(hint: str) -> Iterator[None]:
    """Turn the backend's error for a dead or silent peer into one readable refusal (exit code 2)."""
    try:
        yield
    except RuntimeError as exc:
        env = current_env()
        peer = isinstance(exc, (dist.DistNetworkError, dist.DistStoreError)) or any(
            m in str(exc) for m in _LOST_PEER_MARKERS)
        if not (env.enabled and peer):
            raise
        first = str(exc).strip().splitlines()[-1][:300] if str(exc).strip() else type(exc).__name__
        raise RankLostError(f"rank {env.rank}: another rank died or did not answer within {TIMEOUT_ENV}="
                            f"{timeout_seconds():g} s ({first}); {hint}") from exc
