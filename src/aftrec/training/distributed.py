"""Data-parallel training on PyTorch DistributedDataParallel, launched by torchrun.

``torchrun --nproc-per-node P -m aftrec.cli train ...`` (or the ``aftrec`` script) starts P
processes with ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK`` and the rendezvous address in their
environment; :func:`init` reads them and joins the process group (gloo on CPU, NCCL on CUDA).
Without those variables training is the plain single process it always was.

How the work is split (see docs/scale.md):

* the training examples are cut into ``S`` user shards (``train.data_shards``, default the
  number of ranks); rank ``r`` owns shards ``r, r + P, ...`` and reads only those (whole
  partitions of a partitioned dataset, else the users ``u`` with ``u % S`` in its shards),
  so every user's history lives on one rank;
* each global batch of ``train.batch_size`` takes ``batch_size / S`` examples from every
  shard; a rank's local batch is its shards' parts, and DDP averages the gradients, so P
  ranks take the same steps as one process given the same shards (a test checks it);
* rank 0 alone evaluates, decides early stopping and writes checkpoints (atomically); the
  others wait at a barrier. A checkpoint holds no per-rank state, so ``--resume`` works
  with any number of ranks.
"""

from __future__ import annotations

import atexit
import datetime
import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from aftrec.errors import ConfigError, TrainingError


@dataclass(frozen=True)
class Context:
    """Where this process stands: rank ``rank`` of ``world`` processes."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def distributed(self) -> bool:
        return self.world > 1

    @property
    def main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier()

    def broadcast(self, obj: Any) -> Any:
        """``obj`` as rank 0 has it, on every rank."""
        if not self.distributed:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def gather(self, obj: Any) -> list[Any]:
        """Every rank's ``obj``, in rank order, on every rank."""
        if not self.distributed:
            return [obj]
        out: list[Any] = [None] * self.world
        dist.all_gather_object(out, obj)
        return out

    def any(self, flags: tuple[bool, ...]) -> tuple[bool, ...]:
        """Each flag true on some rank, on every rank (one all-reduce of ``len(flags)``)."""
        if not self.distributed:
            return flags
        t = torch.tensor(flags, dtype=torch.int32)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return tuple(bool(v) for v in t.tolist())


SINGLE = Context()

#: the backend this process's group was made with (None: not made here), and whether a call
#: failed under torchrun, after which the ranks may be in different calls
_backend: str | None = None
_out_of_step = False


def init(device: str = "cpu", timeout_minutes: float = 60.0) -> Context:
    """Join the process group torchrun described in the environment, or run alone.

    The timeout bounds how long ranks wait for rank 0 (validation included) before failing.
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return SINGLE
    for key in ("RANK", "MASTER_ADDR", "MASTER_PORT"):
        if key not in os.environ:
            raise ConfigError(
                f"WORLD_SIZE={world} but {key} is not set: start distributed training with "
                "torchrun (e.g. torchrun --nproc-per-node 2 -m aftrec.cli train ...)"
            )
    rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    cuda = device.startswith("cuda")
    if cuda:  # before NCCL is asked for: each rank needs a device of its own
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if local >= count:
            raise ConfigError(
                f"runtime.device={device} under torchrun: rank {rank} needs CUDA device {local} "
                f"(LOCAL_RANK), and this torch build sees {count}"
            )
        if not dist.is_nccl_available():
            raise ConfigError(f"runtime.device={device} under torchrun: this torch has no NCCL")
    global _backend
    if _out_of_step:
        raise TrainingError(
            "an earlier aftrec.train call of this process failed under torchrun, so its ranks "
            "may be out of step: end the job and start it again"
        )
    # CPU tensors (the ranks' small agreements) take gloo beside NCCL on CUDA
    backend = "cpu:gloo,cuda:nccl" if cuda else "gloo"
    if not dist.is_initialized():  # once per process: a second call reuses the group
        dist.init_process_group(
            backend=backend, timeout=datetime.timedelta(minutes=timeout_minutes)
        )
        _backend = backend
        atexit.register(leave)
    elif _backend is not None and _backend != backend:
        raise ConfigError(
            f"runtime.device={device} under torchrun: this process joined the group for "
            f"{'CUDA' if 'nccl' in _backend else 'the CPU'} in an earlier call; train on one "
            "kind of device per job"
        )
    if cuda:
        torch.cuda.set_device(local)
    return Context(rank=rank, world=world, local_rank=local)


def check_device(device: str) -> None:
    """A :class:`~aftrec.errors.ConfigError` when this torch cannot use ``runtime.device``."""
    kind, _, index = device.partition(":")
    if kind == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0 or (index and int(index) >= count):
            have = f"{count} CUDA device(s)" if count else "no usable CUDA device"
            raise ConfigError(f"runtime.device={device}: this torch build sees {have}")
    elif kind == "mps" and not torch.backends.mps.is_available():
        raise ConfigError(f"runtime.device={device}: MPS is not available here")


def shutdown(ctx: Context, clean: bool = True) -> None:
    """The end of a call that trained under torchrun. After a clean run the ranks meet at a
    barrier, so that none goes on (or leaves) while a peer is still in its last collective;
    after an error there is none, since the other ranks may never reach it. The process
    group stays for the process's next call (a script that trains, then resumes): a group
    made again on torchrun's store met the old one's keys there and hung. :func:`leave`
    ends it, at exit at the latest. After a failed call no next call joins: a rank that did
    not fail may still be in the failed one, and the two would wait on each other."""
    global _out_of_step
    if ctx.distributed and dist.is_initialized() and clean:
        dist.barrier()
    elif ctx.distributed:  # a rank may still be in the failed call: no next one joins
        _out_of_step = True


def leave() -> None:
    """Leave the process group, if this process is in one. Registered to run at exit, before
    torch's C++ teardown (which could abort a rank of a finished run); the CLI calls it
    before it ends a finished rank with ``os._exit``."""
    global _backend
    if dist.is_initialized():
        dist.destroy_process_group()
    _backend = None


def shards_of(ctx: Context, n_shards: int) -> list[int]:
    """The data shards rank ``ctx.rank`` owns: ``rank, rank + world, ...``."""
    if n_shards % ctx.world:
        raise ConfigError(
            f"train.data_shards={n_shards} must be a multiple of the number of ranks ({ctx.world})"
        )
    return list(range(ctx.rank, n_shards, ctx.world))


class LossForward(torch.nn.Module):
    """Routes a model's loss method through ``forward``, the call DDP instruments.

    DDP all-reduces gradients from hooks it arms in ``forward``; the models compute their
    losses in ``loss`` / ``losses``, so the step calls this wrapper (itself wrapped by DDP
    when distributed) instead of the method. ``owner``: the module whose parameters DDP
    reduces (the model's, by default); ``sync``: batch norm's statistics over the global
    batch (:func:`~aftrec.models.layers.synced_batch_statistics`).
    """

    def __init__(
        self,
        model: torch.nn.Module,
        method: str,
        owner: torch.nn.Module | None = None,
        sync: bool = False,
    ) -> None:
        super().__init__()
        self.owner = model if owner is None else owner  # registered: DDP sees its parameters
        self.loss = getattr(model, method)  # a bound method: the model is not registered twice
        self.sync = sync

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        if not self.sync:
            return self.loss(*args, **kwargs)
        from aftrec.models.layers import synced_batch_statistics

        with synced_batch_statistics():
            return self.loss(*args, **kwargs)


def loss_forward(
    model: torch.nn.Module, method: str, ctx: Context, owner: torch.nn.Module | None = None
) -> torch.nn.Module:
    """The module a step calls to get ``model.<method>(...)``: plain in one process, under
    DistributedDataParallel across ranks, with batch norm over the global batch. DDP reduces
    the gradients of ``owner``'s parameters (the model's by default); parameters a step
    leaves unused, as AFT's warm-up does, are allowed, except sparse ones (an unused sparse
    table is an error of DDP's reducer): a step that trains only part of a model gives that
    part as ``owner``."""
    module = LossForward(model, method, owner, sync=ctx.distributed)
    if not ctx.distributed:
        return module
    from torch.nn.parallel import DistributedDataParallel

    ids = [ctx.local_rank] if next(model.parameters()).is_cuda else None
    return DistributedDataParallel(module, device_ids=ids, find_unused_parameters=True)


def peak_rss_mib() -> float:
    """This process's peak resident memory in MiB (``ru_maxrss``: KiB on Linux, bytes on
    macOS)."""
    import resource
    import sys

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 2**10
