"""Averaging self-evaluation adapters: checkpoint averaging and adapter soups, as one plain LoRA.

A LoRA adapter adds ``delta_W = (alpha / r) * B @ A`` to each adapted weight. The average of
``k`` adapters' updates, ``sum_i w_i * delta_W_i``, is itself a LoRA update of rank
``sum_i r_i``: stack the ``A_i`` as rows and the scaled ``B_i`` as columns. So averaging is
exact (no refit, no truncation), the result is an ordinary PEFT folder that the transformers
engine merges and the vLLM engine loads as a ``LoRARequest`` (it picks the ``max_lora_rank``
slot that holds the summed rank), and generation and self-evaluation still share one KV cache.

Why average: the self-evaluator's AUROC on a family left out of training moves by 0.1-0.16
between neighbouring checkpoints of one run (docs/training.md sections 21 and 24); averaging
checkpoints (Izmailov et al., 2018) or runs from the same initialisation ("model soups",
Wortsman et al., 2022) trades that variance for one adapter. docs/training.md section 25
measures it on the default's recipe: neither average tried there (the last two defaults; the
default with its run's step 200) beats the default on the held-out family.

The sources must adapt the same modules of the same base model with the same scope (an
``every_token`` adapter and a chunk-only one update different tokens, so their average means
nothing). The accept threshold an adapter records (``capeval_adapter.json``'s ``policy``) is
kept only where every source records the same one: an average has its own calibration.

Example:
    >>> import tempfile
    >>> from langchain_capeval.adapters import default_adapter_path
    >>> with tempfile.TemporaryDirectory() as tmp:  # the default adapter averaged with itself
    ...     read_lora_config(average_adapters([default_adapter_path()] * 2, tmp + "/avg"))["r"]
    32

    The command line:

    $ capeval average-adapters runs/ck/checkpoint-250 runs/ck/checkpoint-300 --output-dir runs/avg

"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from langchain_capeval.adapters import adapter_policy, adapter_scope, check_adapter, write_adapter_scope
from langchain_capeval.errors import CapEvalInputError

WEIGHTS_FILE = "adapter_model.safetensors"
CONFIG_FILE = "adapter_config.json"

SAME_IN_EVERY_SOURCE = ("base_model_name_or_path", "peft_type", "task_type", "layers_to_transform", "bias")
"""``adapter_config.json`` fields that must agree between the adapters averaged."""

UNSUPPORTED = {
    "use_dora": "a DoRA adapter's update is not linear in its factors",
    "use_rslora": "rank-stabilised scaling (alpha / sqrt(r)) is not handled",
    "modules_to_save": "fully trained modules are not LoRA factors",
    "rank_pattern": "per-module ranks are not handled",
    "alpha_pattern": "per-module alphas are not handled",
}
"""``adapter_config.json`` fields whose non-default values this exact average does not cover, and why."""


def read_lora_config(adapter: str | os.PathLike[str]) -> dict[str, Any]:
    """An adapter folder's ``adapter_config.json``, as a dict."""
    path = check_adapter(adapter) / CONFIG_FILE
    try:
        config = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise CapEvalInputError(f"{path}: not JSON ({e})") from e
    if not isinstance(config, dict) or config.get("peft_type") != "LORA":
        raise CapEvalInputError(f"{path}: not a PEFT LoRA config (peft_type must be 'LORA')")
    return config


def _check_averageable(paths: Sequence[Path], configs: Sequence[dict[str, Any]]) -> None:
    """Raise ``CapEvalInputError`` naming the folder and the field where the sources cannot be averaged."""
    for path, config in zip(paths, configs, strict=True):
        for field, why in UNSUPPORTED.items():
            if config.get(field):
                raise CapEvalInputError(f"{path}: {field}={config[field]!r} cannot be averaged exactly: {why}")
    first_path, first = paths[0], configs[0]
    for path, config in zip(paths[1:], configs[1:], strict=True):
        for field in SAME_IN_EVERY_SOURCE:
            if config.get(field) != first.get(field):
                raise CapEvalInputError(
                    f"{path}: {field}={config.get(field)!r} differs from {first_path}'s {first.get(field)!r}"
                )
        if sorted(config.get("target_modules") or []) != sorted(first.get("target_modules") or []):
            raise CapEvalInputError(
                f"{path}: target_modules {config.get('target_modules')} differ from {first_path}'s "
                f"{first.get('target_modules')}"
            )
    scopes = {adapter_scope(p) for p in paths}
    if len(scopes) > 1:
        raise CapEvalInputError(f"adapters of different scopes cannot be averaged: {', '.join(sorted(scopes))}")


def average_adapters(
    adapters: Sequence[str | os.PathLike[str]],
    output_dir: str | os.PathLike[str],
    weights: Sequence[float] | None = None,
) -> Path:
    """Write the weighted average of LoRA adapters' updates as one LoRA adapter, exactly.

    Args:
        adapters: Two or more adapter folders (``adapter_config.json`` + ``adapter_model.safetensors``),
            e.g. checkpoints of one ``capeval train --keep-checkpoints`` run.
        output_dir: The new adapter's folder (created; an existing adapter there is replaced).
        weights: One non-negative weight per adapter, normalised to sum to 1; ``None``: equal weights.

    Returns:
        ``output_dir``. Its rank is the sum of the sources' ranks and ``lora_alpha`` equals it
        (scaling 1: each source's own ``alpha / r`` and weight are folded into its ``B``).

    Raises:
        CapEvalInputError: fewer than two adapters; weights of the wrong length, negative, not finite or all zero;
            adapters that adapt different models, modules or tokens (the message names the folder and
            field); a variant this exact average does not cover (DoRA, rsLoRA, ``modules_to_save``).
        ModelNotInstalledError: a source is not a folder holding ``adapter_config.json``.

    """
    import torch
    from safetensors.torch import load_file, save_file

    if len(adapters) < 2:
        raise CapEvalInputError(f"averaging needs two or more adapters, got {len(adapters)}")
    paths = [check_adapter(a) for a in adapters]
    if weights is None:
        weights = [1.0] * len(paths)
    if len(weights) != len(paths):
        raise CapEvalInputError(f"got {len(weights)} weights for {len(paths)} adapters")
    if not all(math.isfinite(w) and w >= 0 for w in weights) or sum(weights) <= 0:
        raise CapEvalInputError(f"weights must be finite and non-negative with a positive sum, got {list(weights)}")
    norm = [w / sum(weights) for w in weights]
    configs = [read_lora_config(p) for p in paths]
    _check_averageable(paths, configs)

    tensors = []
    for path in paths:
        if not (path / WEIGHTS_FILE).is_file():
            raise CapEvalInputError(f"{path}: no {WEIGHTS_FILE}")
        tensors.append(load_file(str(path / WEIGHTS_FILE)))
    keys = set(tensors[0])
    for path, ts in zip(paths[1:], tensors[1:], strict=True):
        if set(ts) != keys:
            raise CapEvalInputError(f"{path}: holds other LoRA tensors than {paths[0]} (other layers or modules)")
    a_keys = sorted(k for k in keys if ".lora_A." in k)
    if not a_keys or len(a_keys) * 2 != len(keys):
        raise CapEvalInputError(f"{paths[0]}: expected only lora_A / lora_B tensors in {WEIGHTS_FILE}")

    averaged: dict[str, torch.Tensor] = {}
    for a_key in a_keys:
        b_key = a_key.replace(".lora_A.", ".lora_B.")
        averaged[a_key] = torch.cat([ts[a_key] for ts in tensors], dim=0).contiguous()
        averaged[b_key] = torch.cat(
            [ts[b_key] * (w * c["lora_alpha"] / c["r"]) for ts, w, c in zip(tensors, norm, configs, strict=True)],
            dim=1,
        ).contiguous()

    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    save_file(averaged, str(out / WEIGHTS_FILE), metadata={"format": "pt"})
    rank = sum(int(c["r"]) for c in configs)
    config = {**configs[0], "r": rank, "lora_alpha": rank, "lora_dropout": 0.0}
    (out / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")
    policies = [adapter_policy(p) for p in paths]
    same_policy = all(p == policies[0] for p in policies)
    write_adapter_scope(out, adapter_scope(paths[0]), policies[0] if same_policy else None)
    (out / "averaged_from.json").write_text(
        json.dumps({"adapters": [str(p) for p in paths], "weights": norm}, indent=2) + "\n"
    )
    return out
