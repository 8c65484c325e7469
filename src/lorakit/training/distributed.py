"""How a training run spreads over processes: one process, DDP through Accelerate, or FSDP2.

`AccelerateRuntime` (strategy "single" or "ddp") keeps the whole model on every process and lets Accelerate
average the gradients. `FsdpRuntime` (strategy "fsdp", `lorakit train --fsdp` under torchrun) shards the base and
adapter parameters over the processes with PyTorch FSDP2 (`torch.distributed.fsdp.fully_shard`: one group per
transformer block plus the root; every parameter becomes a DTensor of which each process holds 1/N along dim 0).
Module names do not change under FSDP2; what is saved (adapter, optimizer state) is gathered to full tensors on
every process, then written by process 0, so the files are the same whichever strategy wrote them.

Both runtimes offer what the loop and `evaluate_loss` need: `process_index`, `num_processes`,
`is_main_process`, `device`, `reduce`, `gather_object`, `wait_for_everyone`, `autocast`, `backward`,
`gradient_sync`, `prepare`, `unwrap`, `full_adapter`, `optimizer_state`.
"""

from __future__ import annotations

import contextlib
import os
import warnings

import torch
from torch import nn

from ..errors import ConfigError
from ..inject import adapter_layers

LAUNCH_HINT = "torchrun --nproc_per_node N -m lorakit train ... --fsdp"


def _flag_set(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes")


def make_runtime(precision: str, fsdp: bool):
    if not fsdp and _flag_set("ACCELERATE_USE_FSDP"):
        # Accelerate would shard with its own FSDP wrapper (or, on CPU, silently fall back to DDP)
        raise ConfigError(
            "accelerate launch --use_fsdp is not supported; pass --fsdp to lorakit train instead "
            f"({LAUNCH_HINT}, or accelerate launch without --use_fsdp)"
        )
    runtime = FsdpRuntime(precision) if fsdp else AccelerateRuntime(precision)
    if precision == "bf16" and runtime.device.type == "cpu" and cpu_bf16_is_emulated():
        warnings.warn(BF16_EMULATED, stacklevel=2)
    return runtime


BF16_EMULATED = (
    "--precision bf16 on a CPU without native bfloat16 (no AVX512-BF16 or AMX) is emulated: much slower than "
    "float32 (28x a training step of SmolLM2-135M on an AVX2 CPU); use --precision no on this machine"
)


def cpu_bf16_is_emulated() -> bool:
    """True on an x86 CPU whose bfloat16 matrix products PyTorch must emulate (neither AVX512-BF16 nor AMX); False
    where it has them, or where it cannot tell (other architectures)."""
    import platform

    if platform.machine().lower() not in ("x86_64", "amd64", "i386", "i686"):
        return False
    checks = [getattr(torch.cpu, name, None) for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported")]
    if not all(callable(check) for check in checks):
        return False  # a PyTorch without these probes: do not guess
    return not any(check() for check in checks)


class AccelerateRuntime:
    """One process, or data-parallel (DDP) processes through Accelerate; every process holds the whole model."""

    def __init__(self, precision: str):
        from accelerate import Accelerator
        from accelerate.state import AcceleratorState

        # Accelerate keeps one process-wide state and refuses a second Accelerator with another mixed precision
        # (a ValueError telling the user to restart Python). A library user who trains in float32 and then in bf16
        # in one process (or runs a Trainer after lorakit) is not wrong: a state of another precision is dropped
        # here, and the state this run created is dropped by close(). The process group (PartialState) stays.
        state = AcceleratorState._shared_state
        if state and state.get("_mixed_precision") not in (None, precision):
            AcceleratorState._reset_state(reset_partial_state=False)
        self._owns_state = not AcceleratorState._shared_state
        self._owns_group = not torch.distributed.is_initialized()
        # cpu=True lets Accelerate run data-parallel over gloo when there is no GPU (torchrun on CPU)
        self.accelerator = Accelerator(mixed_precision=precision, cpu=not torch.cuda.is_available())
        self.process_index = self.accelerator.process_index
        self.num_processes = self.accelerator.num_processes
        self.is_main_process = self.accelerator.is_main_process
        self.device = self.accelerator.device
        self.strategy = "ddp" if self.num_processes > 1 else "single"
        self.precision_details = {"mode": precision, "how": "Accelerate autocast" if precision != "no" else None}

    def shard(self, model: nn.Module) -> nn.Module:
        return model

    def prepare(self, model, optimizer):
        return self.accelerator.prepare(model, optimizer)

    def unwrap(self, model):
        return self.accelerator.unwrap_model(model)

    def autocast(self):
        return self.accelerator.autocast()

    def backward(self, loss) -> None:
        self.accelerator.backward(loss)

    def unscale_gradients(self, optimizer) -> None:
        """Under fp16 (a GradScaler), divide the gradients by the loss scale now; the optimizer step then does not
        unscale again (and still skips a step with inf/nan). Otherwise nothing."""
        self.accelerator.unscale_gradients(optimizer)

    def gradient_sync(self, model, sync: bool):
        """Context for one micro-batch: gradients are averaged over processes only where `sync`."""
        return contextlib.nullcontext() if sync else self.accelerator.no_sync(model)

    def reduce(self, tensor, reduction: str = "sum"):
        return self.accelerator.reduce(tensor, reduction=reduction)

    def gather_object(self, obj) -> list:
        if self.num_processes == 1:
            return [obj]
        gathered = [None] * self.num_processes
        torch.distributed.all_gather_object(gathered, obj)
        return gathered

    def wait_for_everyone(self) -> None:
        self.accelerator.wait_for_everyone()

    def reshard(self, model) -> None:
        pass

    @contextlib.contextmanager
    def full_adapter(self, model):
        yield self.unwrap(model)

    def optimizer_state(self, optimizer) -> dict:
        return optimizer.state_dict()

    def close(self) -> None:
        from accelerate.state import AcceleratorState

        if self._owns_group and self.num_processes > 1:
            # The process group this run's Accelerator created ends with it. Left to the interpreter's exit, gloo's
            # threads could be torn down in any order: a process that had trained and saved aborted ("terminate
            # called without an active exception", SIGABRT) and torchrun failed the run. Accelerate's PartialState
            # is dropped with it, so a later Accelerator in this process starts a new group.
            self.accelerator.end_training()
            AcceleratorState._reset_state(reset_partial_state=True)
        elif self._owns_state:
            AcceleratorState._reset_state(reset_partial_state=False)


class FsdpRuntime:
    """FSDP2 over every process torchrun started: gloo on CPU, NCCL on GPUs."""

    strategy = "fsdp"

    def __init__(self, precision: str):
        import torch.distributed as dist

        if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
            raise ConfigError(f"--fsdp shards the model over several processes; launch with {LAUNCH_HINT}")
        self.dist = dist
        cuda = torch.cuda.is_available()
        if cuda:
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
        self.owns_group = not dist.is_initialized()
        if self.owns_group:
            dist.init_process_group("nccl" if cuda else "gloo")
        self.process_index = dist.get_rank()
        self.num_processes = dist.get_world_size()
        self.is_main_process = self.process_index == 0
        self.device = torch.device("cuda", torch.cuda.current_device()) if cuda else torch.device("cpu")
        self.precision = precision
        self.precision_details = {
            "mode": precision,
            "how": (
                "FSDP2 MixedPrecisionPolicy (parameters gathered in bfloat16, gradients reduced in float32, "
                "float32 sharded master parameters) + bfloat16 autocast"
                if precision == "bf16"
                else None
            ),
        }

    def shard(self, model: nn.Module) -> nn.Module:
        """Shard every transformer block, then the root (embeddings, final norm, head), in place."""
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        mesh = init_device_mesh(self.device.type, (self.num_processes,))
        policy = (
            MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
            if self.precision == "bf16"
            else MixedPrecisionPolicy()
        )
        for block in transformer_blocks(model):
            fully_shard(block, mesh=mesh, mp_policy=policy)
        fully_shard(model, mesh=mesh, mp_policy=policy)
        return model

    def prepare(self, model, optimizer):
        return model, optimizer

    def unwrap(self, model):
        return model

    def autocast(self):
        # Autocast too: buffers (LoRA-Mini's frozen outer matrices) stay float32 and must meet bfloat16 parameters
        if self.precision == "bf16":
            return torch.autocast(self.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def backward(self, loss) -> None:
        loss.backward()  # FSDP2 reduce-scatters and averages the gradients over processes

    def unscale_gradients(self, optimizer) -> None:
        pass  # no loss scaling (--fsdp refuses fp16)

    def gradient_sync(self, model, sync: bool):
        model.set_requires_gradient_sync(sync)
        return contextlib.nullcontext()

    def reduce(self, tensor, reduction: str = "sum"):
        if reduction != "sum":
            raise ValueError(f"unsupported reduction {reduction!r}")
        total = tensor.clone()
        self.dist.all_reduce(total)
        return total

    def gather_object(self, obj) -> list:
        gathered = [None] * self.num_processes
        self.dist.all_gather_object(gathered, obj)
        return gathered

    def wait_for_everyone(self) -> None:
        self.dist.barrier()

    @contextlib.contextmanager
    def full_adapter(self, model):
        """Within the block the adapter tensors are full (unsharded) tensors; a collective: every process enters.

        Only the adapter is gathered (not the base), one tensor at a time, in the same order on every process.
        """
        from torch.distributed.tensor import DTensor

        self.reshard(model)
        swapped = []
        try:
            for _, layer in adapter_layers(model):
                for name in layer.stored:
                    value = layer._parameters.get(name)
                    if isinstance(value, DTensor):
                        swapped.append((layer, name, value))
                        layer._parameters[name] = nn.Parameter(
                            value.detach().full_tensor(), requires_grad=value.requires_grad
                        )
            yield model
        finally:
            for layer, name, value in swapped:
                layer._parameters[name] = value

    def optimizer_state(self, optimizer) -> dict:
        """optimizer.state_dict() with every sharded tensor gathered to full (a collective)."""
        from torch.distributed.tensor import DTensor

        state_dict = optimizer.state_dict()
        full = {}
        for index in sorted(state_dict["state"]):
            values = state_dict["state"][index]
            full[index] = {
                key: value.full_tensor() if isinstance(value, DTensor) else value for key, value in values.items()
            }
        return {"state": full, "param_groups": state_dict["param_groups"]}

    def reshard(self, model) -> None:
        """Back to the sharded state everywhere (FSDP2 keeps the root unsharded after a forward without backward)."""
        from torch.distributed.fsdp import FSDPModule

        for module in model.modules():
            if isinstance(module, FSDPModule):
                module.reshard()

    def close(self) -> None:
        if self.owns_group and self.dist.is_initialized():
            # every process past its last collective before the group goes: under load a process that had trained
            # and saved still aborted at exit once ("terminate called without an active exception", SIGABRT, in
            # the clean-clone CI run of 2026-12-07 16:54), with gloo work of the other rank still in flight
            self.dist.barrier()
            self.dist.destroy_process_group()


def transformer_blocks(model: nn.Module) -> list[nn.Module]:
    """The repeated blocks of a transformer (e.g. LlamaDecoderLayer): transformers' `_no_split_modules` classes,
    else the children of the longest ModuleList of same-typed modules."""
    names = set(getattr(model, "_no_split_modules", None) or ())
    found = {name: m for name, m in model.named_modules() if name and type(m).__name__ in names}
    outermost = [m for name, m in found.items() if not any(name.startswith(other + ".") for other in found)]
    if outermost:
        return outermost
    lists = [
        m for m in model.modules() if isinstance(m, nn.ModuleList) and len(m) > 1 and len({type(c) for c in m}) == 1
    ]
    return list(max(lists, key=len)) if lists else []


def local_base_elements(model: nn.Module) -> int:
    """Elements of the frozen (base) parameters this process holds: its shards under FSDP, all of them otherwise."""
    total = 0
    for param in model.parameters():
        if not param.requires_grad:
            local = param.to_local() if hasattr(param, "to_local") else param
            total += local.numel()
    return total
