"""One process, or DDP / FSDP2 under torchrun: `Dist` (rank, world, device, all-reduce), `resolve_device`
and `setup_distributed` (gloo on CPU, nccl on GPU)."""

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from nanoglm5.training.train_config import TrainError


@dataclass
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def enabled(self) -> bool:
        return self.world > 1

    @property
    def main(self) -> bool:
        return self.rank == 0

    def all_reduce(self, t: torch.Tensor) -> torch.Tensor:
        """Sum over ranks, in place (no-op on one process)."""
        if self.enabled:
            dist.all_reduce(t)
        return t

    def barrier(self) -> None:
        if self.enabled:
            dist.barrier()


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise TrainError(f"--device {device}: no CUDA GPU is visible to torch {torch.__version__}; use --device cpu")
    return torch.device(device)


def setup_distributed(device: str = "auto") -> Dist:
    """One process: Dist(). Under `torchrun --nproc_per_node N`: init the process group
    (nccl on GPU, gloo on CPU), one GPU per local rank, CPU threads split between local ranks."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    dev = resolve_device(device)
    if world <= 1:
        return Dist(device=dev)
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", str(world)))
    if dev.type == "cuda":
        dev = torch.device("cuda", local_rank)
        torch.cuda.set_device(dev)
    else:
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // local_world))
    if not dist.is_initialized():
        dist.init_process_group("nccl" if dev.type == "cuda" else "gloo")
    return Dist(rank, world, local_rank, dev)


def teardown_distributed() -> None:
    """Destroy the process group, if torchrun made one (train.py calls this on the way out)."""
    if dist.is_initialized():
        dist.destroy_process_group()
