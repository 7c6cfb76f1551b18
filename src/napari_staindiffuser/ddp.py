"""Data-parallel training over several processes (torch DDP), as launched by ``torchrun``.

``iter_train`` uses this module when it runs under ``torchrun`` (the environment holds ``RANK``
and ``WORLD_SIZE``), when the caller has initialised a process group, or when it is asked to
(``distributed=True``). Every process (rank) builds the same model, takes its slice of the same
global batch and averages its gradients with the others, so a run on N processes trains like one
process with the same global batch (up to the order of float additions).

- Devices: each process uses ``cuda:LOCAL_RANK`` (NCCL) or the CPU (gloo). Apple MPS has no
  process-group backend here.
- Batch: ``TrainConfig.batch_size`` is the **global** batch; each rank takes rows
  ``[rank * B / N, (rank + 1) * B / N)`` of it, so it must be a multiple of N.
- Collectives per step: the DDP gradient all-reduce, one small all-reduce of the losses (for the
  log and the divergence check: every rank sees the same global loss, so all raise together), and
  one of the stop flag (a stop asked on any rank stops them all after the same step).

(Slide-scale *staining* on a dask cluster is another matter: docs/cluster.md.)
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

_ENV = ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


def launched_by_torchrun() -> bool:
    """True when the environment says this process is one rank of a torchrun launch."""
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def env_rank() -> int:
    """This process's global rank from the environment (0 when not launched by torchrun)."""
    return int(os.environ.get("RANK", "0"))


class _Forward(torch.nn.Module):
    def __init__(self, module: torch.nn.Module, fn: Callable[..., Any]) -> None:
        super().__init__()
        self.module = module
        self.fn = fn

    def forward(self, *args: Any) -> Any:
        return self.fn(self.module, *args)


@dataclass
class DistContext:
    """This process's place in a data-parallel run.

    ``owns_group``: the process group was created by :meth:`start` (and is destroyed by
    :meth:`close`); a group the caller created is left to the caller.
    """

    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    owns_group: bool = False

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def shard(self, global_batch: int) -> tuple[int, int]:
        """First row and row count of this rank's slice of a global batch."""
        if global_batch % self.world_size:
            raise ValueError(
                f"the batch size is the global batch over all {self.world_size} processes and "
                f"must be a multiple of it; got {global_batch} (try "
                f"{max(1, round(global_batch / self.world_size)) * self.world_size})"
            )
        n = global_batch // self.world_size
        return self.rank * n, n

    def start(self) -> None:
        """Join (or create) the process group. Collective: every rank must call it."""
        import torch.distributed as dist

        if dist.is_initialized():
            self.owns_group = False
        else:
            missing = [k for k in _ENV if k not in os.environ]
            if missing:
                raise ValueError(
                    "distributed training needs the environment that torchrun sets "
                    f"({', '.join(_ENV)}); missing {missing}. Launch with "
                    "`torchrun --nproc_per_node N -m napari_staindiffuser.cli train ...`"
                )
            kw = {"device_id": self.device} if self.device.type == "cuda" else {}
            dist.init_process_group("nccl" if self.device.type == "cuda" else "gloo", **kw)
            self.owns_group = True
        if (dist.get_rank(), dist.get_world_size()) != (self.rank, self.world_size):
            raise ValueError(
                f"the process group has rank {dist.get_rank()} of {dist.get_world_size()}; "
                f"the environment says {self.rank} of {self.world_size}"
            )

    def wrap(
        self, module: torch.nn.Module, fn: Callable[..., Any], find_unused_parameters: bool
    ) -> torch.nn.Module:
        """``DistributedDataParallel`` over ``fn(module, *args)`` (collective).

        Calling the result with ``*args`` runs ``fn(module, *args)`` as the wrapper's forward
        pass, so DDP sees the pass even though ``fn`` calls the module's own methods (``encode``,
        ``denoise``) rather than ``forward``. Construction broadcasts rank 0's weights.
        """
        from torch.nn.parallel import DistributedDataParallel

        ids = [self.device] if self.device.type == "cuda" else None
        return DistributedDataParallel(
            _Forward(module, fn), device_ids=ids, find_unused_parameters=find_unused_parameters
        )

    def any(self, flag: bool) -> bool:
        """True on every rank if ``flag`` is true on any rank (collective)."""
        import torch.distributed as dist

        t = torch.tensor([1.0 if flag else 0.0], device=self.device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return bool(t.item() > 0)

    def reduce_losses(
        self,
        total: torch.Tensor,
        parts: dict[str, torch.Tensor],
        stain: torch.Tensor,
        keys: Sequence[tuple[str, int]],
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Global-batch losses from every rank's shard losses (collective).

        Parameters
        ----------
        total : Tensor () this shard's mean loss (shards are equal in size)
        parts : dict of Tensor () per-branch means over this shard's samples of one stain
        stain : Tensor (b,) int64 stain index of each sample of this shard
        keys : every possible part name with its stain index, the same list on every rank

        Returns
        -------
        The global mean loss and the per-branch means over the global batch (a part is left out
        when no rank had a sample of its stain), as one process with the whole batch reports them.
        """
        import torch.distributed as dist

        n_stains = max(i for _, i in keys) + 1
        counts = torch.bincount(stain, minlength=n_stains).to(torch.float32)
        zero = counts.new_zeros(())
        sums = [parts[k].detach().float() * counts[i] if k in parts else zero for k, i in keys]
        ns = [counts[i] if k in parts else zero for k, i in keys]
        vec = torch.stack([total.detach().float(), *sums, *ns])
        dist.all_reduce(vec)
        vec = vec.cpu()
        out = {}
        for j, (k, _) in enumerate(keys):
            n = vec[1 + len(keys) + j]
            if n > 0:
                out[k] = vec[1 + j] / n
        return vec[0] / self.world_size, out

    def barrier(self) -> None:
        import torch.distributed as dist

        kw = {"device_ids": [self.device.index]} if self.device.type == "cuda" else {}
        dist.barrier(**kw)

    def close(self) -> None:
        """Destroy the process group if :meth:`start` created it (also after an error)."""
        import torch.distributed as dist

        if self.owns_group and dist.is_initialized():
            dist.destroy_process_group()
        self.owns_group = False


def plan(device: str | torch.device, distributed: bool | None) -> DistContext | None:
    """Decide whether this run is data-parallel and on which device; nothing is started yet.

    ``distributed=None``: data-parallel when launched by torchrun or when a process group is
    already initialised. Returns None for a single-process run.
    """
    import torch.distributed as dist

    available = dist.is_available()
    if distributed is None:
        distributed = launched_by_torchrun() or (available and dist.is_initialized())
    if not distributed:
        return None
    if not available:
        raise ValueError(
            "distributed training was asked for but this torch has no torch.distributed"
        )
    if dist.is_initialized():
        rank, world = dist.get_rank(), dist.get_world_size()
    else:
        rank, world = int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    name = str(device)
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    dev = torch.device(name)
    if dev.type == "cpu":
        return DistContext(rank, world, local_rank, torch.device("cpu"))
    if dev.type != "cuda":
        raise ValueError(
            f"distributed training runs on CUDA GPUs (NCCL) or the CPU (gloo); got device {name!r}"
        )
    if dev.index is not None:
        raise ValueError(
            f"under torchrun each process uses the GPU cuda:LOCAL_RANK; give the device as "
            f"'cuda' or 'auto', not {name!r} (choose GPUs with CUDA_VISIBLE_DEVICES)"
        )
    if not torch.cuda.is_available():
        raise ValueError("device 'cuda' was asked for but no CUDA GPU is available")
    n = torch.cuda.device_count()
    if local_rank < n:
        index = local_rank
    elif n == 1:  # one GPU per process (e.g. srun --gpus-per-task=1)
        index = 0
    else:
        raise ValueError(
            f"LOCAL_RANK is {local_rank} but this node has {n} visible GPUs: start at most one "
            "process per GPU (--nproc_per_node)"
        )
    dev = torch.device("cuda", index)
    torch.cuda.set_device(dev)
    return DistContext(rank, world, local_rank, dev)
