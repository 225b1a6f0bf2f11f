"""The optional compiled UNet step of stages 2 and 3 (--torch_compile, --compile_mode).

Only the training forward (and so its backward) goes through `torch.compile`; the module itself is not replaced:
its state dict, the LoRA files written from it and the validation renders (other shapes, no gradient) use the plain
module, so a compiled run writes the same kind of files as an eager one and validation does not recompile.
"""

from __future__ import annotations

import contextlib
import logging
import sys
from collections.abc import Callable, Iterator

import torch

from clif.errors import RunFailed, UserError

CUDA_GRAPHS = "reduce-overhead"


def check_compile(*, torch_compile: bool, mode: str, cuda: bool, prior_preservation: bool = False) -> None:
    """Refuse, in one line and before anything is written, what the compiled step cannot serve here."""
    if not torch_compile:
        if mode != "default":
            raise UserError(f"--compile_mode {mode} needs --torch_compile")
        return
    import torch._dynamo

    if not torch._dynamo.is_dynamo_supported():
        raise UserError("--torch_compile: torch.compile does not support this Python/platform; run without it")
    if mode == CUDA_GRAPHS:
        if not cuda:
            raise UserError(f"--compile_mode {mode} records CUDA graphs and needs a CUDA device; use 'default'")
        if prior_preservation:  # two UNet calls before one backward: the first call's graph outputs are overwritten
            raise UserError(
                f"--compile_mode {mode} cannot serve --with_prior_preservation (two UNet calls per backward); "
                "use 'default' or 'max-autotune-no-cudagraphs'"
            )
    if cuda:
        from torch.utils._triton import has_triton

        if not has_triton():
            raise UserError("--torch_compile on CUDA needs triton (pip install triton); run without it")
    elif not has_cpp_compiler():
        raise UserError("--torch_compile on CPU needs a C++ compiler (g++ or clang++; or set CXX); run without it")


def has_cpp_compiler() -> bool:
    """Whether inductor finds the C++ compiler it builds CPU kernels with (its own search, CXX honoured)."""
    from torch._inductor import cpp_builder

    try:
        cpp_builder.get_cpp_compiler()
    except (RuntimeError, OSError):  # inductor's InvalidCxxCompiler is a RuntimeError
        return False
    return True


def inductor_settings(mode: str, device: torch.device, backend) -> dict:
    """torch.compile's mode, or on CPU the same mode's options without inductor's channels_last layout: on CPU its
    fused normalisation kernels then cost 0.75 s instead of 0.12 s per full-size SD1.5 step (README, Performance)."""
    if backend != "inductor":
        return {}
    if device.type != "cpu":
        return {"mode": mode}
    from torch._inductor import list_mode_options

    return {"options": {**list_mode_options(mode), "layout_optimization": False}}


class CompiledUNet:
    """The UNet's training forward through torch.compile: call it like the UNet.

    On CUDA the weights go channels_last (the layout the convolution kernels prefer in half precision). With
    CUDA graphs ('reduce-overhead') every call starts a new graph step: stages 2 and 3 call the UNet once per
    micro-batch and back-propagate before the next call. A compile failure ends the run with one line.
    """

    def __init__(self, unet: torch.nn.Module, *, mode: str, device: torch.device, backend: str | Callable = "inductor"):
        if device.type == "cuda":
            unet.to(memory_format=torch.channels_last)
        self.unet, self.mode = unet, mode
        self.forward = torch.compile(unet, backend=backend, **inductor_settings(mode, device, backend))

    def __call__(self, *args, **kwargs):
        if self.mode == CUDA_GRAPHS:
            torch.compiler.cudagraph_mark_step_begin()
        with compile_errors():
            return self.forward(*args, **kwargs)


@contextlib.contextmanager
def compile_errors(fail: Callable[[str], None] | None = None) -> Iterator[None]:
    """A torch.compile failure inside the block as one RunFailed line (via `fail` when given: the step loop closes
    its progress bar first). The forward compiles at the first call; the compiled backward is built at the first
    backward, which the step loop runs inside this block too."""
    try:
        yield
    except Exception as err:
        # an eager run never imported dynamo (a slow import) and cannot raise its errors: nothing to import here
        dynamo = sys.modules.get("torch._dynamo.exc")
        if dynamo is None or not isinstance(err, dynamo.TorchDynamoException):  # inductor's InductorError is one
            raise
        cause = getattr(err, "inner_exception", None) or err  # the backend's own error, when it raised one
        first = next((line for line in str(cause).splitlines() if line.strip()), "")
        message = (
            f"torch.compile failed on the UNet ({type(cause).__name__}: {first.strip()[:300]}); "
            "run without --torch_compile"
        )
        if fail is not None:
            fail(message)
        raise RunFailed(message) from None


def training_unet(model, *, torch_compile: bool, mode: str, device: torch.device):
    """What the training loss calls: the model's UNet, or its compiled forward with --torch_compile."""
    if not torch_compile:
        return model.unet
    logging.getLogger(__name__).info(f"torch.compile ({mode}): the first training step compiles the UNet")
    return CompiledUNet(model.unet, mode=mode, device=device)
