"""A self-evaluation-scoped LoRA, run beside the base weights instead of merged into a copy of them.

An adapter scoped to the self-evaluation chunk (:mod:`langchain_capeval.adapters`) must run
on the chunk only, over the KV cache the base weights wrote. The engine decodes with the
base model as it is, and self-evaluates inside :meth:`SelfEvaluationLoRA.active`, where every
adapted linear layer's output gains the low-rank update ``scale * B(A(x))``: the adapter's
function, with the adapter's own tensors (19.6 MB for the shipped one) instead of a second,
merged copy of the model's weights (540 MB for SmolLM2-135M in fp32).

The update is added by forward hooks registered for the duration of the ``with`` block, so
decoding runs exactly the code and the weights it runs without an adapter (including the
CPU-packed linear layers of :mod:`langchain_capeval.engines.cpu`, which are ``nn.Linear`` too).

Example:
    >>> lora = SelfEvaluationLoRA.load(model, "path/to/adapter")  # doctest: +SKIP
    >>> with lora.active():  # doctest: +SKIP
    ...     logits = model(input_ids=chunk_ids, **{cache_keyword(model): base_cache}).logits

"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from langchain_capeval.errors import CapEvalInputError, UnsupportedFeatureError

PEFT_PREFIX = "base_model.model."
"""How PEFT prefixes the module paths of the weights it saves."""

_UNSUPPORTED_IF_SET = ("use_dora", "fan_in_fan_out", "lora_bias", "modules_to_save", "alora_invocation_tokens")
_UNSUPPORTED_IF_NONEMPTY = ("rank_pattern", "alpha_pattern", "layer_replication")


class SelfEvaluationLoRA:
    """The low-rank updates of a PEFT LoRA adapter, added to a model's linear layers only inside :meth:`active`.

    Args:
        model: The base model the updates apply to (never modified).
        updates: Per module path (``model.get_submodule`` names), the adapter's ``A`` (``[r, in]``) and
            its ``B`` already multiplied by the LoRA scale (``[out, r]``).

    """

    def __init__(self, model: nn.Module, updates: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> None:
        self.model = model
        self.updates = updates
        # the layers are found once here, not at every self-evaluation
        self._layers = [(model.get_submodule(path), a, b) for path, (a, b) in updates.items()]

    @classmethod
    def load(cls, model: nn.Module, adapter: str | os.PathLike[str]) -> SelfEvaluationLoRA:
        """Read a plain PEFT LoRA folder (``adapter_config.json`` + ``adapter_model.safetensors``) for ``model``.

        Raises:
            UnsupportedFeatureError: The adapter uses a LoRA variant this runner does not compute (DoRA,
                per-module ranks, biases, saved modules, ...); the message names the setting.
            CapEvalInputError: The weights name a module ``model`` does not have, or a tensor of the wrong
                shape: an adapter for another model.

        """
        from safetensors.torch import load_file

        folder = Path(adapter)
        config: dict[str, Any] = json.loads((folder / "adapter_config.json").read_text())
        if config.get("peft_type", "LORA") != "LORA":
            raise UnsupportedFeatureError(f"{folder}: peft_type {config['peft_type']!r}; only LORA adapters run here")
        for key in _UNSUPPORTED_IF_SET:
            if config.get(key):
                raise UnsupportedFeatureError(
                    f"{folder}: {key}={config[key]!r} is not supported for this adapter scope"
                )
        for key in _UNSUPPORTED_IF_NONEMPTY:
            if config.get(key):
                raise UnsupportedFeatureError(f"{folder}: {key} is not supported for this adapter scope")
        if config.get("bias", "none") != "none":
            raise UnsupportedFeatureError(f"{folder}: bias={config['bias']!r} is not supported for this adapter scope")
        r, alpha = int(config["r"]), float(config["lora_alpha"])
        scale = alpha / math.sqrt(r) if config.get("use_rslora") else alpha / r

        param = next(model.parameters())
        tensors = load_file(str(folder / "adapter_model.safetensors"))
        pairs: dict[str, dict[str, torch.Tensor]] = {}
        for name, tensor in tensors.items():
            path, _, kind = name.removeprefix(PEFT_PREFIX).rpartition(".lora_")
            if kind not in ("A.weight", "B.weight"):
                raise CapEvalInputError(f"{folder}: unexpected tensor {name!r} in adapter_model.safetensors")
            pairs.setdefault(path, {})[kind[0]] = tensor.to(device=param.device, dtype=param.dtype)
        updates: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        for path, pair in sorted(pairs.items()):
            try:
                layer = model.get_submodule(path)
            except AttributeError as e:
                raise CapEvalInputError(f"{folder}: the adapter adapts {path!r}, which the model does not have") from e
            a, b = pair.get("A"), pair.get("B")
            if a is None or b is None:
                raise CapEvalInputError(f"{folder}: {path!r} has lora_A or lora_B but not both")
            if not isinstance(layer, nn.Linear):  # packed layers (engines.cpu) are nn.Linear too
                raise CapEvalInputError(f"{folder}: {path!r} is a {type(layer).__name__}, not a linear layer")
            out_features, in_features = layer.out_features, layer.in_features
            if a.shape != (r, in_features) or b.shape != (out_features, r):
                raise CapEvalInputError(
                    f"{folder}: {path!r} needs A [{r}, {in_features}] and B [{out_features}, {r}], "
                    f"got {list(a.shape)} and {list(b.shape)}: an adapter for another model?"
                )
            updates[path] = (a, b * scale)
        if not updates:
            raise CapEvalInputError(f"{folder}: adapter_model.safetensors holds no LoRA weights")
        return cls(model, updates)

    @property
    def nbytes(self) -> int:
        """Memory the updates hold."""
        return sum(t.numel() * t.element_size() for pair in self.updates.values() for t in pair)

    @contextmanager
    def active(self) -> Iterator[None]:
        """Within the block, every adapted layer of the model adds its update; after it, nothing is left."""
        handles = []
        try:
            for layer, a, b in self._layers:
                handles.append(layer.register_forward_hook(_adds_update(a, b)))
            yield
        finally:
            for handle in handles:
                handle.remove()


def _adds_update(a: torch.Tensor, b: torch.Tensor) -> Any:
    """A forward hook that adds ``b @ a @ x`` (``b`` already scaled) to a linear layer's output."""

    def hook(module: nn.Module, args: tuple[torch.Tensor, ...], output: torch.Tensor) -> torch.Tensor:
        return output + F.linear(F.linear(args[0], a), b)

    return hook
