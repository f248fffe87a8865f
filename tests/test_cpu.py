"""CPU specifics of the transformers engine: packed linear layers and loading on a thread of its own."""

from __future__ import annotations

import threading

import pytest
import torch
from torch import nn

from langchain_capeval.engines.cpu import (
    PackedLinear,
    pack_decoder_linears,
    pack_output_projection,
    packing_available,
    run_in_own_thread,
)
from langchain_capeval.engines.transformers import TransformersEngine

needs_onednn = pytest.mark.skipif(not packing_available(), reason="this torch build has no oneDNN prepacked linear")
needs_mkl = pytest.mark.skipif(not packing_available("mkl"), reason="this torch build has no MKL packed GEMM")


@needs_onednn
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize(("layout", "max_rows"), [("onednn", None), ("mkl", 4)])
def test_packed_linear_equals_f_linear_for_any_batch_shape(bias: bool, layout: str, max_rows: int | None) -> None:
    torch.manual_seed(0)
    linear = nn.Linear(64, 300, bias=bias)
    packed = PackedLinear.from_linear(linear, layout=layout, max_rows=max_rows)  # type: ignore[arg-type]
    with torch.inference_mode():
        # with max_rows=4: 1, 3 and 2 x 1 rows packed; 5, 16 and 3 x 7 through F.linear
        for shape in [(1, 64), (3, 64), (5, 64), (16, 64), (2, 1, 64), (3, 7, 64)]:
            x = torch.randn(*shape)
            torch.testing.assert_close(packed(x), linear(x), rtol=1e-5, atol=1e-5)
    assert packed.weight is linear.weight and packed.bias is linear.bias
    assert packed.state_dict().keys() == linear.state_dict().keys()
    assert f"layout={layout}" in repr(packed)


@needs_onednn
def test_packed_linear_follows_in_place_weight_edits_and_gives_gradients() -> None:
    torch.manual_seed(1)
    linear = nn.Linear(32, 50, bias=False)
    packed = PackedLinear.from_linear(linear)
    x = torch.randn(4, 32)
    with torch.no_grad():
        linear.weight.mul_(2.0)  # e.g. a LoRA merge after packing
    with torch.inference_mode():
        torch.testing.assert_close(packed(x), x @ linear.weight.T, rtol=1e-5, atol=1e-5)
    loss = packed(x.requires_grad_()).sum()  # gradients wanted: F.linear, which autograd knows
    loss.backward()
    assert linear.weight.grad is not None and x.grad is not None


@needs_onednn
def test_from_linear_refuses_what_it_cannot_pack() -> None:
    with pytest.raises(ValueError, match="CPU float32"):
        PackedLinear.from_linear(nn.Linear(8, 8).to(torch.float64))
    with pytest.raises(ValueError, match="layout must be 'onednn' or 'mkl', got 'blas'"):
        PackedLinear.from_linear(nn.Linear(8, 8), layout="blas")  # type: ignore[arg-type]


@needs_mkl
def test_pack_decoder_linears_packs_every_linear_within_the_budget() -> None:
    model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Sequential(nn.Linear(32, 8, bias=False)))
    x = torch.randn(5, 16)
    with torch.inference_mode():
        expected = model(x)
    assert pack_decoder_linears(model, max_bytes=100) == 0  # (16*32 + 32*8) floats do not fit in 100 bytes
    assert type(model[0]) is nn.Linear
    assert pack_decoder_linears(model) == 2
    assert isinstance(model[0], PackedLinear) and isinstance(model[2][0], PackedLinear)
    assert model[0].layout == "mkl"
    with torch.inference_mode():
        torch.testing.assert_close(model(x), expected, rtol=1e-5, atol=1e-5)
    assert pack_decoder_linears(model) == 0  # nothing left to pack


def test_the_engine_packs_its_output_projection_and_keeps_the_tie(engine: TransformersEngine) -> None:
    head = engine.model.get_output_embeddings()
    if not packing_available():
        assert type(head) is nn.Linear
        return
    assert isinstance(head, PackedLinear) and head.layout == "onednn"
    assert head.weight is engine.model.get_input_embeddings().weight  # SmolLM2 ties them
    assert pack_output_projection(engine.model) is False  # already packed: not an nn.Linear any more


def test_the_engine_packs_its_decoder_linears(engine: TransformersEngine) -> None:
    packed = [m for m in engine.model.modules() if isinstance(m, PackedLinear) and m.layout == "mkl"]
    plain = [m for m in engine.model.modules() if type(m) is nn.Linear]
    if not packing_available("mkl"):
        assert not packed
        return
    layers = engine.model.config.num_hidden_layers
    assert len(packed) == 7 * layers  # q, k, v, o, gate, up, down
    assert not plain


def test_run_in_own_thread_returns_and_raises() -> None:
    names: list[str] = []

    def work() -> int:
        names.append(threading.current_thread().name)
        return 42

    assert run_in_own_thread(work) == 42
    assert names == ["capeval-load"]

    def fail() -> None:
        raise KeyError("no such model")

    with pytest.raises(KeyError, match="no such model"):
        run_in_own_thread(fail)
