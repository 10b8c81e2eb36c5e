"""Several processes (`accelerate launch`): which rows each holds, and collecting tensors over them.

lmpg splits every minibatch evenly over the processes, each prompt's G samples on one process, so
N processes take, step for step, the optimizer steps one process takes on the whole batch. The
helpers here are the only place that knows about process ranks; everything else sees its share.
"""

from __future__ import annotations

import torch


def no_accelerator() -> bool:
    """True on a machine with no GPU: Accelerator(cpu=True) then runs N launched processes as a
    MULTI_CPU (gloo) group instead of N independent single-process runs."""
    mps = getattr(torch.backends, "mps", None)
    xpu = getattr(torch, "xpu", None)
    return not (torch.cuda.is_available() or (mps is not None and mps.is_available())
                or (xpu is not None and xpu.is_available()))


def allow_new_mixed_precision(mixed_precision: str) -> None:
    """accelerate keeps one AcceleratorState per process and refuses a second Accelerator with another
    mixed precision. In a single process (a notebook, a test session) a later trainer may ask for
    another one: drop the old state, keeping the process group."""
    from accelerate.state import AcceleratorState, PartialState

    state = AcceleratorState._shared_state
    if state and state.get("_mixed_precision") not in (None, mixed_precision) and PartialState().num_processes == 1:
        AcceleratorState._reset_state(reset_partial_state=False)


def shards_parameters(accelerator) -> bool:
    """Whether each process holds only a shard of the weights between forwards (FSDP, DeepSpeed),
    gathered by hooks that run per module call."""
    from accelerate import DistributedType

    return accelerator.distributed_type not in (DistributedType.NO, DistributedType.MULTI_CPU,
                                                DistributedType.MULTI_GPU)


def supports_shared_prompt_forward(accelerator) -> bool:
    """The shared-prompt forward runs the model twice per backward and needs its KV cache: fine
    through DDP (each weight's gradient is still ready once per backward), not through FSDP /
    DeepSpeed, whose hooks gather and free shards per forward."""
    return not shards_parameters(accelerator)


def supports_chunked_logprobs(accelerator) -> bool:
    """The chunked log-probs (lmpg.chunked_logprobs) read the output layer's weight after the model's
    forward has returned: fine with whole weights on every process (one process, DDP), not where
    FSDP / DeepSpeed have freed the gathered shards by then."""
    return not shards_parameters(accelerator)


def prompt_positions(prompts_per_iteration: int, prompts_per_minibatch: int, num_processes: int,
                     rank: int) -> list[int]:
    """Positions (in the global batch of prompts) process `rank` samples and trains on.

    Each minibatch is a contiguous block of the global batch, split evenly over the processes, so
    process r holds sub-block r of every minibatch.
    """
    share = prompts_per_minibatch // num_processes
    return [block + rank * share + i for block in range(0, prompts_per_iteration, prompts_per_minibatch)
            for i in range(share)]


def gather(accelerator, t: torch.Tensor) -> torch.Tensor:
    """Concatenate a tensor over processes in rank order along dim 0 (identity on one process).
    A CPU tensor comes back on the CPU."""
    if accelerator.num_processes == 1:
        return t
    if t.device.type == "cpu":
        return accelerator.gather(t.to(accelerator.device)).cpu()
    return accelerator.gather(t)


def gather_rows(accelerator, t: torch.Tensor, pad_value=0) -> torch.Tensor:
    """Like `gather`, for (B, T, ...) tensors whose T differs between processes: each is right-padded
    with `pad_value` to the longest T first."""
    if accelerator.num_processes == 1 or t.dim() < 2:
        return gather(accelerator, t)
    width = int(gather(accelerator, torch.tensor([t.shape[1]], device=t.device)).max())
    if t.shape[1] < width:
        pad = t.new_full((t.shape[0], width - t.shape[1], *t.shape[2:]), pad_value)
        t = torch.cat([t, pad], 1)
    return gather(accelerator, t)


def gather_objects(accelerator, objects: list) -> list:
    """Concatenate python lists over processes in rank order (identity on one process)."""
    if accelerator.num_processes == 1:
        return list(objects)
    from accelerate.utils import gather_object

    return gather_object(list(objects))


def in_global_order(accelerator, rows: torch.Tensor | list, global_index: torch.Tensor):
    """Rows of every process in the order one process would hold them: `rows` (a (B, ...) tensor,
    right-padded over processes by `gather_rows`, or a list) gathered, then sorted by each row's
    position `global_index` (B,) in the whole batch. Identity on one process."""
    if accelerator.num_processes == 1:
        return rows
    order = torch.argsort(gather(accelerator, global_index.cpu())).tolist()
    if isinstance(rows, list):
        every = gather_objects(accelerator, rows)
        return [every[i] for i in order]
    every = gather_rows(accelerator, rows)
    return every[torch.tensor(order, device=every.device)]
