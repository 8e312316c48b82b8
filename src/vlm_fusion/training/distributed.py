"""What the recipe needs to know of its processes, and from accelerate when it runs in several, on GPUs or on the CPU.

Which process this is and how many there are is read here only (`rank`, `world_size`: the environment
`accelerate launch` / `torchrun` set, before any process group exists).

On a machine without GPUs the processes train on the CPU over gloo (`use_cpu`); DeepSpeed is told to use gloo too
(it would otherwise look for oneCCL); and FSDP, which accelerate (1.15) enables only on accelerator backends —
on the CPU it silently trains plain DDP instead — is switched on for the CPU as well (`fsdp_on_cpu`).
"""

import os

import torch


def rank() -> int:
    """This process's number among the launch's (0 in a single process)."""
    return int(os.environ.get("RANK", "0"))


def world_size() -> int:
    """The number of processes of the launch (1 in a single process)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def is_main_process() -> bool:
    """The process that speaks: writes the output folder's files, shows progress, clears caches."""
    return rank() == 0


def launched_with(name: str) -> bool:
    """Whether `accelerate launch` was asked for FSDP or DeepSpeed (it says so in the environment)."""
    return os.environ.get(f"ACCELERATE_USE_{name}", "false").lower() == "true"


def machine_arguments() -> dict:
    """`TrainingArguments` fields for this machine and launch."""
    if torch.cuda.is_available():
        return {}
    arguments = {"use_cpu": True}
    if launched_with("DEEPSPEED"):
        arguments["ddp_backend"] = "gloo"
    if launched_with("FSDP"):
        fsdp_on_cpu()
    return arguments


def fsdp_on_cpu() -> None:
    """Make accelerate's state FSDP when an FSDP launch runs on the CPU (where it stays MULTI_CPU: plain DDP)."""
    from accelerate import state
    from accelerate.utils import DistributedType

    if getattr(state.AcceleratorState.__init__, "fsdp_on_cpu", False):
        return
    original = state.AcceleratorState.__init__

    def init(self, *args, fsdp_plugin=None, **kwargs):
        original(self, *args, fsdp_plugin=fsdp_plugin, **kwargs)
        if fsdp_plugin is not None and self.distributed_type == DistributedType.MULTI_CPU:
            self.distributed_type = DistributedType.FSDP
            self.fsdp_plugin = fsdp_plugin
            state.PartialState._shared_state["distributed_type"] = DistributedType.FSDP

    init.fsdp_on_cpu = True
    state.AcceleratorState.__init__ = init


def end_process_group(wait: bool = False) -> None:
    """The process group destroyed at the end of a launched run: gloo's threads stopped before the interpreter exits
    (left running, a process that had finished its work could die at exit with `terminate called without an active
    exception`, SIGABRT, failing the launch). With `wait` (a run that finished), every process first waits for the
    others, the main one's merging and saving included, so that none tears its group down while another still works
    (a second process did abort so once, in a full-suite run, while the first was writing the merged LoRA model)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        if wait:
            torch.distributed.barrier()
        torch.distributed.destroy_process_group()
