"""CPU specifics of the transformers engine: one OpenMP team, and a packed output projection.

**One OpenMP team.** PyTorch's CPU wheels parallelise with GNU OpenMP (libgomp). Each
thread that runs a parallel op owns a team of worker threads, and the workers of a team
spin-wait between ops, which is what makes the several hundred small ops of a decode
step cheap. Once the teams of a process hold more threads than there are cores, libgomp
cuts that spinning to almost nothing, and every op pays a futex wake-up: on the 2-core
development VM a one-row decode step goes from ~31 ms to ~58 ms, slower than on one
thread (``bench/decode_bench.py``). The engine runs every model call on its scheduler
thread, so that thread's team should be the only one that lasts: the engine loads its
model through :func:`run_in_own_thread`, on a thread that ends and takes its team with it.
Heavy torch work of the application on a long-lived thread (embedding a corpus on the main
thread, say) creates a second team and slows the engine the same way; run it through
:func:`run_in_own_thread` too, or on the engine's thread with ``engine.scheduler.run(fn)``.

**Packed output projection.** Every decode step multiplies the batch's hidden states by
the output projection: for SmolLM2-135M a 49,152 x 576 fp32 matrix (113 MB, tied to the
token embeddings), the largest single matrix of the step. Through ``F.linear`` MKL
re-blocks that matrix at every call, so each extra row costs about as much as the first:
~2 ms for one row and ~9 ms for eight on the development VM. Reordered once into
oneDNN's blocked layout, eight rows take ~4 ms; decode steps of 4 to 12 rows (the batches
concurrent requests make) run 10-15% faster, steps of one row or of 16 as before. The
price is a second copy of that one matrix (113 MB for SmolLM2).
:class:`PackedLinear` is an ``nn.Linear`` (same weight ``Parameter``, same ``state_dict``,
tying intact) whose forward uses the reordered copy while the weight is unchanged since
packing, and ``F.linear`` otherwise (weights edited in place, or gradients wanted).

Example:
    >>> import torch
    >>> from langchain_capeval.engines.cpu import PackedLinear, run_in_own_thread
    >>> linear = torch.nn.Linear(16, 100, bias=False)
    >>> packed = PackedLinear.from_linear(linear)
    >>> x = torch.randn(3, 16)
    >>> bool(torch.allclose(packed(x), linear(x), atol=1e-5))
    True
    >>> run_in_own_thread(lambda: 6 * 7)
    42

"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from typing import Any, TypeVar

import torch
import torch.nn.functional as F
from torch import nn

logger = logging.getLogger(__name__)

T = TypeVar("T")

PACK_HINT_ROWS = 8
"""The batch size oneDNN chooses the blocked layout for (any batch size works with it)."""


def packing_available() -> bool:
    """Whether this torch build has oneDNN's prepacked linear (CPU builds with MKL-DNN)."""
    ops = torch.ops.mkldnn
    return bool(
        torch.backends.mkldnn.is_available()
        and hasattr(ops, "_reorder_linear_weight")
        and hasattr(ops, "_linear_pointwise")
    )


class PackedLinear(nn.Linear):
    """An ``nn.Linear`` whose inference forward runs on a copy of its weight reordered for oneDNN.

    Build it with :meth:`from_linear`; it shares the original's ``weight`` and ``bias``.
    """

    _packed: torch.Tensor
    _packed_version: int

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> PackedLinear:
        """A packed view of ``linear`` (CPU, fp32); the weight itself is shared, not copied."""
        weight = linear.weight
        if weight.device.type != "cpu" or weight.dtype != torch.float32:
            raise ValueError(f"PackedLinear needs a CPU float32 weight, got {weight.dtype} on {weight.device}")
        if not packing_available():
            raise RuntimeError("this torch build has no oneDNN (MKL-DNN) prepacked linear")
        packed = cls.__new__(cls)
        nn.Module.__init__(packed)
        packed.in_features, packed.out_features = linear.in_features, linear.out_features
        packed.weight = weight
        packed.bias = linear.bias
        packed.repack()
        return packed

    def repack(self) -> None:
        """Reorder the current weight (done at build; again by itself after in-place edits)."""
        with torch.no_grad():
            self._packed = torch.ops.mkldnn._reorder_linear_weight(self.weight.detach(), PACK_HINT_ROWS)
        self._packed_version = self.weight._version

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x @ weight.T + bias``; through ``F.linear`` when gradients are wanted."""
        if torch.is_grad_enabled() and (x.requires_grad or self.weight.requires_grad):
            return F.linear(x, self.weight, self.bias)
        if self.weight._version != self._packed_version:
            self.repack()
        bias = None if self.bias is None else self.bias.detach()
        out: torch.Tensor = torch.ops.mkldnn._linear_pointwise(x, self._packed, bias, "none", [], "")
        return out


def pack_output_projection(model: nn.Module) -> bool:
    """Swap ``model``'s output projection for a :class:`PackedLinear`, when it is a CPU fp32 ``nn.Linear``.

    Returns:
        Whether it was swapped (``False`` on GPU, other dtypes, builds without oneDNN, a
        non-``Linear`` head, or a packed result that does not match ``F.linear``).

    """
    get_head = getattr(model, "get_output_embeddings", None)
    set_head = getattr(model, "set_output_embeddings", None)
    head = get_head() if get_head else None
    if set_head is None or type(head) is not nn.Linear:
        return False
    if head.weight.device.type != "cpu" or head.weight.dtype != torch.float32 or not packing_available():
        return False
    packed = PackedLinear.from_linear(head)
    probe = torch.randn(3, head.in_features, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        expected, got = F.linear(probe, head.weight, head.bias), packed(probe)
    if not torch.allclose(got, expected, rtol=1e-4, atol=1e-4):
        logger.warning("oneDNN's packed output projection differs from F.linear; keeping F.linear")
        return False
    set_head(packed)
    return True


def run_in_own_thread(fn: Callable[[], T]) -> T:
    """Run ``fn`` on a new thread and return its result (or raise its exception).

    The thread ends before this returns, and with it the OpenMP team that ``fn``'s
    parallel ops created: the calling thread stays without one.
    """
    box: dict[str, Any] = {}

    def target() -> None:
        try:
            box["result"] = fn()
        except BaseException as e:  # re-raised in the caller, with its traceback
            box["error"] = e

    thread = threading.Thread(target=target, name="capeval-load")
    thread.start()
    thread.join()
    if "error" in box:
        raise box["error"]
    result: T = box["result"]
    return result
