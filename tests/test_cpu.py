"""CPU specifics of the transformers engine: the packed output projection and loading on a thread of its own."""

from __future__ import annotations

import threading

import pytest
import torch
from torch import nn

from langchain_capeval.engines.cpu import PackedLinear, pack_output_projection, packing_available, run_in_own_thread
from langchain_capeval.engines.transformers import TransformersEngine

needs_onednn = pytest.mark.skipif(not packing_available(), reason="this torch build has no oneDNN prepacked linear")


@needs_onednn
@pytest.mark.parametrize("bias", [False, True])
def test_packed_linear_equals_f_linear_for_any_batch_shape(bias: bool) -> None:
    torch.manual_seed(0)
    linear = nn.Linear(64, 300, bias=bias)
    packed = PackedLinear.from_linear(linear)
    with torch.inference_mode():
        for shape in [(1, 64), (5, 64), (16, 64), (2, 1, 64), (3, 7, 64)]:
            x = torch.randn(*shape)
            torch.testing.assert_close(packed(x), linear(x), rtol=1e-5, atol=1e-5)
    assert packed.weight is linear.weight and packed.bias is linear.bias
    assert packed.state_dict().keys() == linear.state_dict().keys()


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


def test_the_engine_packs_its_output_projection_and_keeps_the_tie(engine: TransformersEngine) -> None:
    head = engine.model.get_output_embeddings()
    if not packing_available():
        assert type(head) is nn.Linear
        return
    assert isinstance(head, PackedLinear)
    assert head.weight is engine.model.get_input_embeddings().weight  # SmolLM2 ties them
    assert pack_output_projection(engine.model) is False  # already packed: not an nn.Linear any more


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
