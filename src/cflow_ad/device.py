"""Where a run computes: the device, the precision and the CPU threads, decided here alone.

The device is a run setting, not part of the model: checkpoints hold CPU tensors and load on
any device, and `CFlowConfig` (hence the experiments' run hashes) never sees it. No other file
of the package calls `torch.cuda`: they ask a `Compute` for the device, an autocast context,
the loader settings and the copies back to the host.

PyTorch is imported by the functions that use it, not by this module: the torch-free scoring
runtime (`runtime`, `inference`, `serve` on an .onnx file) imports this file for its core count.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass, field, fields
from typing import TYPE_CHECKING

from .errors import CflowInputError

if TYPE_CHECKING:
    import torch

PRECISIONS = ("fp32", "bf16", "fp16")
FLOW_PRECISIONS = ("fp32", "bf16")  # of the flows' matrix products (`flow_decoder.matmul`)
MAX_DEFAULT_WORKERS = 4


def _dtype(precision: str):
    """The autocast dtype of a precision, None for fp32."""
    import torch

    return {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)


def available_cores() -> int:
    """Cores this process may run on (its affinity mask, where the OS has one)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def local_threads(cores: int) -> int:
    """Threads per rank: the cores shared by the ranks on this node (too many threads collapse throughput)."""
    return max(1, cores // int(os.environ.get("LOCAL_WORLD_SIZE", "1")))


def set_threads(n: int | None = None) -> int:
    """Torch's CPU threads: `n`, or this rank's share of the cores available; returns the count."""
    import torch

    torch.set_num_threads(max(1, n or local_threads(available_cores())))
    return torch.get_num_threads()


def default_workers() -> int:
    """Image-decoding worker processes: min(4, cores - 1), so the model keeps a core; none on 2 cores or
    fewer, where a worker beside the model's threads made `test` 0.75x as fast (benchmarks/RESULTS.md)."""
    cores = available_cores()
    return min(MAX_DEFAULT_WORKERS, cores - 1) if cores > 2 else 0


def cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


def cuda_count() -> int:
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def _mps_available() -> bool:
    import torch

    mps = getattr(torch.backends, "mps", None)
    return bool(mps is not None and mps.is_available())


def resolve_device(name: str = "auto") -> torch.device:
    """`auto` (CUDA when present, else the CPU), `cpu`, `cuda`, `cuda:N` or `mps`, checked to exist.
    Under torchrun `auto` and `cuda` mean this rank's GPU, cuda:LOCAL_RANK."""
    import torch

    name = str(name).strip().lower()
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if name == "auto":
        name = "cuda" if cuda_available() else "cpu"
    if name == "cpu":
        return torch.device("cpu")
    if name == "mps":
        if not _mps_available():
            raise CflowInputError("--device mps: this machine has no Apple GPU (MPS) available: use --device cpu")
        return torch.device("mps")
    if name == "cuda" or name.startswith("cuda:"):
        index = local if name == "cuda" else name.partition(":")[2]
        if not str(index).isdigit():
            raise CflowInputError(f"--device {name}: a CUDA device is cuda or cuda:N with N a number")
        count = cuda_count()
        if count == 0:
            raise CflowInputError(f"--device {name}: PyTorch sees no CUDA GPU here: use --device cpu"
                                  " (or install a CUDA build of PyTorch)")
        if int(index) >= count:
            raise CflowInputError(f"--device {name}: there are {count} CUDA device(s), cuda:0 to cuda:{count - 1}")
        return torch.device("cuda", int(index))
    raise CflowInputError(f"unknown --device '{name}': use auto, cpu, cuda, cuda:N or mps")


def _no_bf16(device: torch.device) -> str | None:
    """Why `device` cannot compute in bfloat16, or None where it can."""
    import torch

    if device.type == "cuda" and not torch.cuda.is_bf16_supported():
        return f"{torch.cuda.get_device_name(device)} has no bfloat16"
    return "MPS does not support it" if device.type == "mps" else None


def _check_precision(precision: str, device: torch.device) -> None:
    if precision not in PRECISIONS:
        raise CflowInputError(f"unknown --precision '{precision}': use one of {', '.join(PRECISIONS)}")
    if precision == "fp16" and device.type == "cpu":
        raise CflowInputError("--precision fp16 needs a GPU: on the CPU use --precision bf16 (or fp32)")
    if precision == "bf16" and _no_bf16(device):
        raise CflowInputError(f"--precision bf16: {_no_bf16(device)}: use fp16")


def _check_flow_precision(flow_precision: str, device: torch.device) -> None:
    if flow_precision not in FLOW_PRECISIONS:
        raise CflowInputError(f"unknown --flow-precision '{flow_precision}': use one of {', '.join(FLOW_PRECISIONS)}")
    if flow_precision == "bf16" and _no_bf16(device):
        raise CflowInputError(f"--flow-precision bf16: {_no_bf16(device)}: use --flow-precision fp32")


@dataclass(frozen=True)
class Compute:
    """The run settings every command takes (`--device`, `--precision`, `--workers`, `--flow-precision`)."""

    device: str = field(default="auto", metadata={
        "help": "auto (CUDA when present, else the CPU), cpu, cuda, cuda:N or mps; a run setting, not saved"})
    precision: str = field(default="fp32", metadata={
        "help": "fp32, or bf16 / fp16 autocast for the encoder (the flows: --flow-precision); bf16 also runs on CPUs."
                " A model runs in the precision it was trained or last calibrated in"})
    workers: int | None = field(default=None, metadata={
        "help": f"image-decoding worker processes (0: in the main process; default min({MAX_DEFAULT_WORKERS},"
                " cores - 1), 0 on 2 cores or fewer)"})
    flow_precision: str = field(default="fp32", metadata={
        "help": "the flows' matrix products: fp32, or bf16 (fast on GPUs and on CPUs with avx512_bf16 or"
                " amx_bf16); their scales, log-determinants and likelihoods stay fp32. A model runs with the flow"
                " precision it was trained or last calibrated with"})

    def __post_init__(self) -> None:
        if self.workers is not None and self.workers < 0:
            raise CflowInputError(f"--workers must be >= 0, got {self.workers}")
        object.__setattr__(self, "torch_device", resolve_device(self.device))
        _check_precision(self.precision, self.torch_device)
        _check_flow_precision(self.flow_precision, self.torch_device)

    @property
    def type(self) -> str:
        return self.torch_device.type

    @property
    def onnx_device(self):
        """The device for `onnx_providers`: `auto` as asked (onnxruntime's CPU provider, quietly, where it has no
        CUDA one), else this run's device, which then must get CUDA's provider if it is a GPU."""
        return "auto" if self.device.strip().lower() == "auto" else self.torch_device

    @property
    def loader_workers(self) -> int:
        return default_workers() if self.workers is None else self.workers

    @property
    def pin_memory(self) -> bool:
        return self.type == "cuda"

    def autocast(self):
        """The encoder's precision context: autocast to bf16 / fp16, or nothing for fp32."""
        import torch

        if self.precision == "fp32":
            return contextlib.nullcontext()
        return torch.autocast(self.type, dtype=_dtype(self.precision))

    def flows(self, model: torch.nn.Module) -> list:
        """The model's flows (`ConditionalFlow`), refusing a flow precision other than fp32 for a model
        without any (the baselines)."""
        from .flow_decoder import ConditionalFlow

        flows = [m for m in model.modules() if isinstance(m, ConditionalFlow)]
        if not flows and self.flow_precision != "fp32":
            raise CflowInputError(f"--flow-precision {self.flow_precision} applies to CFLOW-AD's flows: a"
                                  f" {model.config.method} model has none: leave it at fp32")
        return flows

    def place(self, model: torch.nn.Module) -> torch.nn.Module:
        """`model` moved to the device, its encoder autocast to the precision and its flows' matrix products
        set to the flow precision (the rest of the flows and the likelihood stay fp32)."""
        import torch

        model.to(self.torch_device)
        model.encoder.autocast_dtype = _dtype(self.precision)
        for flow in self.flows(model):
            flow.matmul_precision = self.flow_precision
        if self.type == "cuda":  # fp32 means fp32: cuDNN would otherwise run convolutions in TF32 (10 bits)
            torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
        return model

    def put(self, t: torch.Tensor) -> torch.Tensor:
        """A host tensor on the device (non-blocking from pinned memory)."""
        return t.to(self.torch_device, non_blocking=self.pin_memory)

    def host(self, *tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Device tensors back on the host, copied together and waited for once (one sync per batch)."""
        if self.type == "cpu":
            return tensors
        out = tuple(t.to("cpu", non_blocking=True) for t in tensors)
        synchronize(self.torch_device)
        return out

    def describe(self) -> str:
        import torch

        name = str(self.torch_device)
        if self.type == "cuda":
            name += f" ({torch.cuda.get_device_name(self.torch_device)})"
        return f"{name}, {self.precision}" + (f", {self.flow_precision} flows" if self.flow_precision != "fp32" else "")


def synchronize(device: torch.device | str) -> None:
    """Wait for the device's queued work (for timings and host copies); nothing on the CPU."""
    import torch

    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()


def make_current(device: torch.device) -> None:
    """Make a GPU this process's current one, before anything asks for the current one (nccl, a loader's
    pin-memory thread), each of which would otherwise open a context on GPU 0; nothing elsewhere."""
    import torch

    if device.type == "cuda":
        torch.cuda.set_device(device)


def distributed_backend(device: torch.device) -> str:
    """nccl for CUDA ranks, gloo otherwise (nccl refuses CPU tensors)."""
    return "nccl" if device.type == "cuda" else "gloo"


def onnx_providers(device="cpu") -> list:
    """onnxruntime's execution providers for `device` (a torch.device, or its name: auto, cpu, cuda, cuda:N):
    `auto` takes CUDA's when onnxruntime has it, else the CPU's; an explicit CUDA device without CUDA's
    provider is a one-line error, never a silent run on the CPU (`check_provider` catches one that fails to start)."""
    import onnxruntime as ort

    name = str(device).strip().lower()  # a torch.device's str is cpu, cuda or cuda:N
    kind, _, index = name.partition(":")
    gpu = "CUDAExecutionProvider" in ort.get_available_providers()
    if name not in ("auto", "cpu", "cuda") and not (kind == "cuda" and index.isdigit()):
        raise CflowInputError(f"--device {device}: onnxruntime scores on auto, cpu, cuda or cuda:N")
    if name == "cpu" or name == "auto" and not gpu:
        return ["CPUExecutionProvider"]
    if not gpu:
        raise CflowInputError(f"--device {device} --runtime onnx: this onnxruntime has no CUDA execution provider:"
                              " install onnxruntime-gpu, or use --device cpu")
    return [("CUDAExecutionProvider", {"device_id": int(index or 0)}), "CPUExecutionProvider"]


def check_provider(device, ran: str) -> None:
    """Refuse a session that runs on `ran` where `device` asked for CUDA explicitly: onnxruntime-gpu without
    its CUDA libraries falls back to the CPU with no more than a logged warning."""
    if str(device).strip().lower().startswith("cuda") and ran != "CUDAExecutionProvider":
        raise CflowInputError(f"--device {device} --runtime onnx: onnxruntime could not start its CUDA execution"
                              f" provider and would run on {ran}: check the CUDA libraries, or use --device cpu")


COMPUTE_FIELDS = tuple(f.name for f in fields(Compute))
