"""CPU specifics of the transformers engine: one OpenMP team, and linear layers packed for small batches.

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

**Packed linear layers.** A decode step multiplies a few rows of hidden states by every
weight matrix of the model. Through ``F.linear`` MKL re-blocks each matrix at every call,
so a step of 4 to 16 rows (the batches concurrent requests make) costs far more than a step
of one, although the weights are read once either way. A copy of the weight packed once
removes that work. Two packings, each where it measured fastest on the development VM:

* the output projection (``layout="onednn"``, :func:`pack_output_projection`): oneDNN's
  blocked layout, for any batch. For SmolLM2-135M a 49,152 x 576 matrix (113 MB, tied to
  the token embeddings), the largest of the step: ~2 ms for one row and ~9 ms for eight
  through ``F.linear``, ~4 ms for eight packed;
* the decoder's linear layers (``layout="mkl"``, :func:`pack_decoder_linears`): MKL's packed
  GEMM (``cblas_sgemm_pack``/``cblas_sgemm_compute``), for at most :data:`MKL_PACKED_MAX_ROWS`
  rows; larger inputs (prefills, self-evaluation suffixes of many rows), where it is no
  faster, go through ``F.linear``. For SmolLM2-135M's 210 matrices: 4 rows ~29 -> ~22 ms,
  8 rows ~35 -> ~27 ms, one row about the same.

The price is a second copy of each packed matrix (113 MB + 406 MB for SmolLM2).
:class:`PackedLinear` is an ``nn.Linear`` (same weight ``Parameter``, same ``state_dict``,
tying intact) whose forward uses the packed copy while the weight is unchanged since
packing, and ``F.linear`` otherwise (weights edited in place, or gradients wanted).
Results equal ``F.linear``'s to float32 rounding (the summation order differs).

Example:
    >>> import torch
    >>> from langchain_capeval.engines.cpu import PackedLinear, run_in_own_thread
    >>> linear = torch.nn.Linear(16, 100, bias=False)
    >>> x = torch.randn(3, 16)
    >>> for layout in ("onednn", "mkl"):
    ...     packed = PackedLinear.from_linear(linear, layout=layout)
    ...     print(layout, bool(torch.allclose(packed(x), linear(x), atol=1e-5)))
    onednn True
    mkl True
    >>> run_in_own_thread(lambda: 6 * 7)
    42

"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from typing import Any, Literal, TypeVar

import torch
import torch.nn.functional as F
from torch import nn

logger = logging.getLogger(__name__)

T = TypeVar("T")

PACK_HINT_ROWS = 8
"""The batch size the packed layouts are chosen for (any batch size works with them)."""

MKL_PACKED_MAX_ROWS = 16
"""Inputs of at most this many rows use MKL's packed GEMM; larger ones ``F.linear``."""

Layout = Literal["onednn", "mkl"]
"""``onednn``: oneDNN's blocked layout. ``mkl``: MKL's packed GEMM."""


def packing_available(layout: Layout = "onednn") -> bool:
    """Whether this torch build has the packed linear of ``layout`` (CPU builds with MKL-DNN, and MKL)."""
    onednn = torch.backends.mkldnn.is_available() and all(
        hasattr(torch.ops.mkldnn, op) for op in ("_reorder_linear_weight", "_linear_pointwise")
    )
    if layout == "onednn":
        return bool(onednn)
    return bool(
        onednn
        and torch.backends.mkl.is_available()
        and all(hasattr(torch.ops.mkl, op) for op in ("_mkl_reorder_linear_weight", "_mkl_linear"))
    )


class PackedLinear(nn.Linear):
    """An ``nn.Linear`` whose inference forward runs on a copy of its weight packed for oneDNN or MKL.

    Build it with :meth:`from_linear`; it shares the original's ``weight`` and ``bias``.
    """

    layout: Layout
    max_rows: int | None
    """Inputs of more rows go through ``F.linear`` (``None``: no limit)."""
    _packed: torch.Tensor
    _packed_version: int

    @classmethod
    def from_linear(cls, linear: nn.Linear, layout: Layout = "onednn", max_rows: int | None = None) -> PackedLinear:
        """A packed view of ``linear`` (CPU, fp32); the weight itself is shared, not copied.

        Args:
            linear: The layer to pack.
            layout: ``"onednn"`` or ``"mkl"``.
            max_rows: Inputs of more rows go through ``F.linear``; ``None``: no limit.

        Raises:
            ValueError: The weight is not a CPU float32 tensor, or ``layout`` is unknown.
            RuntimeError: This torch build lacks that packing.

        """
        weight = linear.weight
        if weight.device.type != "cpu" or weight.dtype != torch.float32:
            raise ValueError(f"PackedLinear needs a CPU float32 weight, got {weight.dtype} on {weight.device}")
        if layout not in ("onednn", "mkl"):
            raise ValueError(f"layout must be 'onednn' or 'mkl', got {layout!r}")
        if not packing_available(layout):
            raise RuntimeError(f"this torch build has no {layout} packed linear")
        packed = cls.__new__(cls)
        nn.Module.__init__(packed)
        packed.in_features, packed.out_features = linear.in_features, linear.out_features
        packed.weight = weight
        packed.bias = linear.bias
        packed.layout, packed.max_rows = layout, max_rows
        packed.repack()
        return packed

    def repack(self) -> None:
        """Pack the current weight (done at build; again by itself after in-place edits)."""
        with torch.no_grad():
            weight = self.weight.detach()
            if self.layout == "mkl":
                self._packed = torch.ops.mkl._mkl_reorder_linear_weight(weight, PACK_HINT_ROWS)
            else:
                self._packed = torch.ops.mkldnn._reorder_linear_weight(weight, PACK_HINT_ROWS)
        self._packed_version = self.weight._version

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x @ weight.T + bias``; through ``F.linear`` when gradients are wanted or the input is large."""
        if torch.is_grad_enabled() and (x.requires_grad or self.weight.requires_grad):
            return F.linear(x, self.weight, self.bias)
        rows = x.numel() // max(x.shape[-1], 1)
        if (self.max_rows is not None and rows > self.max_rows) or rows == 0:
            return F.linear(x, self.weight, self.bias)
        if self.weight._version != self._packed_version:
            self.repack()
        bias = None if self.bias is None else self.bias.detach()
        out: torch.Tensor
        if self.layout == "mkl":  # the op checks that ``rows`` is the batch it is given
            out = torch.ops.mkl._mkl_linear(x, self._packed, self.weight.detach(), bias, rows)
        else:
            out = torch.ops.mkldnn._linear_pointwise(x, self._packed, bias, "none", [], "")
        return out

    def extra_repr(self) -> str:
        """``nn.Linear``'s, plus the layout."""
        limit = f", max_rows={self.max_rows}" if self.max_rows is not None else ""
        return f"{super().extra_repr()}, layout={self.layout}{limit}"


def pack_output_projection(model: nn.Module) -> bool:
    """Swap ``model``'s output projection for a :class:`PackedLinear` (oneDNN), when it is a CPU fp32 ``nn.Linear``.

    Returns:
        Whether it was swapped (``False`` on GPU, other dtypes, builds without oneDNN, a
        non-``Linear`` head, or a packed result that does not match ``F.linear``).

    """
    get_head = getattr(model, "get_output_embeddings", None)
    set_head = getattr(model, "set_output_embeddings", None)
    head = get_head() if get_head else None
    if set_head is None or type(head) is not nn.Linear or not _packable(head) or not packing_available("onednn"):
        return False
    packed = PackedLinear.from_linear(head, layout="onednn")
    if not _matches_f_linear(packed):
        return False
    set_head(packed)
    return True


DECODER_PACK_MAX_BYTES = 2 * 2**30
""":func:`pack_decoder_linears` packs nothing when the copies would take more (models over ~500M parameters)."""


def pack_decoder_linears(model: nn.Module, max_bytes: int = DECODER_PACK_MAX_BYTES) -> int:
    """Swap every CPU fp32 ``nn.Linear`` of ``model`` but its output projection for a :class:`PackedLinear` (MKL).

    Inputs of up to :data:`MKL_PACKED_MAX_ROWS` rows (decode steps) then use the packed copy.

    Returns:
        How many layers were swapped: 0 on GPU, for other dtypes, in builds without MKL's
        packed GEMM, when the copies would take more than ``max_bytes``, or when a packed
        result does not match ``F.linear``.

    """
    get_head = getattr(model, "get_output_embeddings", None)
    head = get_head() if get_head else None
    found: list[tuple[nn.Module, str, nn.Linear]] = [
        (parent, name, child)
        for parent in model.modules()
        for name, child in parent.named_children()
        if type(child) is nn.Linear and child is not head and _packable(child)
    ]
    if not found or not packing_available("mkl"):
        return 0
    layers = {id(child): child for _, _, child in found}
    size = sum(linear.weight.numel() * linear.weight.element_size() for linear in layers.values())
    if size > max_bytes:
        logger.info("not packing %d linear layers: the copies would take %.0f MiB", len(layers), size / 2**20)
        return 0
    packed = {key: PackedLinear.from_linear(linear, "mkl", MKL_PACKED_MAX_ROWS) for key, linear in layers.items()}
    if not all(_matches_f_linear(p) for p in packed.values()):
        return 0
    for parent, name, child in found:
        setattr(parent, name, packed[id(child)])
    return len(packed)


def _packable(linear: nn.Linear) -> bool:
    return linear.weight.device.type == "cpu" and linear.weight.dtype == torch.float32


def _matches_f_linear(packed: PackedLinear) -> bool:
    """Whether ``packed`` gives ``F.linear``'s result on a probe of 3 rows (warns if not)."""
    probe = torch.randn(3, packed.in_features, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        expected, got = F.linear(probe, packed.weight, packed.bias), packed(probe)
    if torch.allclose(got, expected, rtol=1e-4, atol=1e-4):
        return True
    logger.warning("the %s-packed linear differs from F.linear; keeping F.linear", packed.layout)
    return False


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
