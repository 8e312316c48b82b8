"""What the recipe needs from accelerate when it runs in several processes, on GPUs or on the CPU.

On a machine without GPUs the processes train on the CPU over gloo (`use_cpu`); DeepSpeed is told to use gloo too
(it would otherwise look for oneCCL); and FSDP, which accelerate (1.15) enables only on accelerator backends —
on the CPU it silently trains plain DDP instead — is switched on for the CPU as well (`fsdp_on_cpu`).
"""

import os

import torch


def launched_with(name: str) -> bool:
    """Whether `accelerate launch` was asked for FSDP or DeepSpeed (it says so in the environment)."""
    return os.environ.get(f"ACCELERATE_USE_{name}", "false").lower() == "true"


def training_arguments() -> dict:
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
