"""Averaging adapters (``capeval average-adapters``): the merged weights are the average, exactly.

Tiny Llama models built from a config, LoRA adapters with random factors (so every update is
non-zero), loaded back with :func:`langchain_capeval.adapters.apply_adapter`, which is how the
transformers engine applies an adapter.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from langchain_capeval.adapters import SCOPE_FILE, adapter_policy, adapter_scope, apply_adapter, write_adapter_scope
from langchain_capeval.cli import main as capeval_main
from langchain_capeval.engines.vllm import adapter_rank, lora_rank_slot
from langchain_capeval.errors import CapEvalInputError
from langchain_capeval.training.averaging import average_adapters, read_lora_config

MODULES = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _tiny_model() -> torch.nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4
    )
    return LlamaForCausalLM(config).eval()


def _lora(folder: Path, seed: int, r: int, alpha: int, modules: list[str] = MODULES) -> Path:
    """A LoRA adapter of the tiny model with random A and B (``init_lora_weights=False``)."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    config = LoraConfig(r=r, lora_alpha=alpha, target_modules=modules, init_lora_weights=False)
    get_peft_model(_tiny_model(), config).save_pretrained(str(folder))
    return folder


def _weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_the_average_adapter_merges_to_the_weighted_average_of_the_updates(tmp_path: Path) -> None:
    """Sources of different rank and alpha, equal and unequal weights: each weight is base + sum w_i delta_i."""
    first = _lora(tmp_path / "a", seed=1, r=4, alpha=8)
    second = _lora(tmp_path / "b", seed=2, r=8, alpha=8)
    base = _weights(_tiny_model())
    updates = [
        {k: v - base[k] for k, v in _weights(apply_adapter(_tiny_model(), src)).items()} for src in (first, second)
    ]
    assert all(updates[0][f"model.layers.0.self_attn.{m}.weight"].abs().max() > 1e-3 for m in ("q_proj", "v_proj"))

    for weights, share in ((None, 0.5), ((1.0, 3.0), 0.25)):
        out = average_adapters([first, second], tmp_path / f"avg-{share}", weights=weights)
        assert read_lora_config(out)["r"] == 12
        assert lora_rank_slot(adapter_rank(out)) == 16  # the max_lora_rank vLLM's engine would start with
        merged = _weights(apply_adapter(_tiny_model(), out))
        for key, value in merged.items():
            want = base[key] + share * updates[0][key] + (1 - share) * updates[1][key]
            assert torch.allclose(value, want, atol=1e-6), key
        recorded = json.loads((out / "averaged_from.json").read_text())
        assert recorded["weights"] == pytest.approx([share, 1 - share])

    x = torch.tensor([[1, 5, 9, 2]])
    with torch.inference_mode():
        logits = [apply_adapter(_tiny_model(), p)(x).logits for p in (first, second, tmp_path / "avg-0.5")]
    assert not torch.allclose(logits[2], logits[0], atol=1e-4), "the average is neither source"
    assert not torch.allclose(logits[2], logits[1], atol=1e-4)


def test_scope_and_policy_are_kept_only_where_the_sources_agree(tmp_path: Path) -> None:
    first = _lora(tmp_path / "a", seed=1, r=4, alpha=8)
    second = _lora(tmp_path / "b", seed=2, r=4, alpha=8)
    for src in (first, second):
        write_adapter_scope(src, "every_token", {"accept_threshold": 0.7})
    out = average_adapters([first, second], tmp_path / "same")
    assert adapter_scope(out) == "every_token" and adapter_policy(out) == {"accept_threshold": 0.7}

    write_adapter_scope(second, "every_token", {"accept_threshold": 0.8})
    out = average_adapters([first, second], tmp_path / "differ")
    assert adapter_policy(out) == {} and not (out / SCOPE_FILE).exists()

    write_adapter_scope(second, "self_evaluation")
    with pytest.raises(CapEvalInputError, match="different scopes"):
        average_adapters([first, second], tmp_path / "scopes")


def test_what_cannot_be_averaged_is_refused_by_name(tmp_path: Path) -> None:
    first = _lora(tmp_path / "a", seed=1, r=4, alpha=8)
    fewer = _lora(tmp_path / "fewer", seed=2, r=4, alpha=8, modules=["q_proj", "v_proj"])
    with pytest.raises(CapEvalInputError, match="target_modules"):
        average_adapters([first, fewer], tmp_path / "out")
    with pytest.raises(CapEvalInputError, match="two or more"):
        average_adapters([first], tmp_path / "out")
    with pytest.raises(CapEvalInputError, match="2 weights for 3 adapters"):
        average_adapters([first, first, first], tmp_path / "out", weights=[1.0, 1.0])
    for weights in ([1.0, -1.0], [0.0, 0.0], [1.0, float("nan")]):
        with pytest.raises(CapEvalInputError, match="non-negative"):
            average_adapters([first, first], tmp_path / "out", weights=weights)

    dora = tmp_path / "dora"
    dora.mkdir()
    config = read_lora_config(first)
    (dora / "adapter_config.json").write_text(json.dumps(config | {"use_dora": True}))
    (dora / "adapter_model.safetensors").write_bytes((first / "adapter_model.safetensors").read_bytes())
    with pytest.raises(CapEvalInputError, match="use_dora"):
        average_adapters([first, dora], tmp_path / "out")
    other = tmp_path / "other"
    other.mkdir()
    (other / "adapter_config.json").write_text(json.dumps(config | {"base_model_name_or_path": "other/model"}))
    with pytest.raises(CapEvalInputError, match="base_model_name_or_path"):
        average_adapters([first, other], tmp_path / "out")
    assert not (tmp_path / "out").exists(), "nothing is written when the sources are refused"


def test_the_command_line_writes_the_average(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    first = _lora(tmp_path / "a", seed=1, r=4, alpha=8)
    second = _lora(tmp_path / "b", seed=2, r=4, alpha=8)
    out = tmp_path / "avg"
    argv = ["average-adapters", str(first), str(second), "--output-dir", str(out), "--weights", "1,1"]
    assert capeval_main(argv) == 0
    assert "rank 8" in capsys.readouterr().out
    assert read_lora_config(out)["r"] == 8
