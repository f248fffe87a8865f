"""The self-evaluation trainer: a LoRA taught to answer "Would you do better if you started over?".

:class:`SelfEvalTrainer` and :class:`~langchain_capeval.training.config.SelfEvalTrainingConfig`
are a pair, as in TRL. The trainer wraps a causal LM in a PEFT LoRA and minimises, per
evaluated (full or truncated) response with win-or-tie target ``p``, the soft
cross-entropy of the answer token::

    answer_loss = -(p * log P("No") + (1 - p) * log P("Yes"))

under the full softmax (``answer_loss="full_vocab"``) or renormalised over the two answers
(``"two_way"``), plus a regularizer on the response tokens that keeps generation as good
as the base model's, since the adapter is merged and serves generation too:

- ``"sft"``: the NLL of the on-policy response tokens, from the same forward pass (free);
- ``"kl"``: KL(base || adapted) on those positions (one extra no-grad forward of the base).

Examples are tree-packed (:mod:`~langchain_capeval.training.examples`): one sequence per
sample holds the prompt and response once and one self-evaluation branch per evaluated
length. Batches group sequences of similar length under a token budget.

With ``scope="self_evaluation"`` the adapter is trained as the engine will run it: on the
self-evaluation chunk only (:class:`~langchain_capeval.training.examples.ChunkExample`: the
pending last token and the turn), over the KV cache the base weights wrote for the prompt
and the response (:func:`chunk_answer_logits`). Generation is then the base model's, so no
regularizer is needed; the saved folder records the scope (``capeval_adapter.json``).

Example:
    >>> from langchain_capeval.training import SelfEvalTrainer, SelfEvalTrainingConfig
    >>> config = SelfEvalTrainingConfig(data="results/training/data/preferences.jsonl", output_dir="/tmp/adapter")
    >>> trainer = SelfEvalTrainer.from_config(config)  # doctest: +SKIP
    >>> result = trainer.train()  # doctest: +SKIP
    >>> trainer.save()  # adapter_config.json + adapter_model.safetensors  # doctest: +SKIP

"""

from __future__ import annotations

import json
import logging
import math
import random
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F

from langchain_capeval.adapters import write_adapter_scope
from langchain_capeval.chat_format import ChatFormat
from langchain_capeval.engines.kv_batch import cache_keyword, left_padded_chunk, output_cache
from langchain_capeval.errors import MissingExtraError
from langchain_capeval.training.config import SelfEvalTrainingConfig
from langchain_capeval.training.dataset import PromptRecord, SampleRecord, read_records
from langchain_capeval.training.examples import (
    Batch,
    ChunkExample,
    PackedSample,
    collate,
    pack_sample,
    unpack_sample,
)

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

logger = logging.getLogger(__name__)

HF_BASE_MODEL_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
"""Hub id written as ``base_model_name_or_path`` of adapters trained on the embedded default."""


def build_examples(
    records: Sequence[PromptRecord],
    chat_format: ChatFormat,
    *,
    pack: bool = True,
    exclude_families: Sequence[str] = (),
    samples_per_prompt: int | None = None,
    prefixes: bool = True,
) -> list[PackedSample]:
    """Turn preference records into training sequences: per sample, its full response and its prefixes.

    Args:
        records: Prompts with labelled samples (``preferences.jsonl``).
        chat_format: The chat format of the model to train (gives the self-evaluation turn).
        pack: One tree-packed sequence per sample; else one plain sequence per evaluated length.
        exclude_families: Task families to leave out.
        samples_per_prompt: Train on the first this many samples of each prompt (their targets were
            computed among all the prompt's samples); ``None`` takes all.
        prefixes: Also evaluate each sample at its truncated prefixes; ``False`` keeps full responses only.

    Example:
        >>> build_examples([], chat_format)  # doctest: +SKIP
        []

    """
    suffix = chat_format.self_evaluation_suffix
    eos = chat_format.eos_token_ids
    out: list[PackedSample] = []
    for record, s, lengths in _evaluated_lengths(records, exclude_families, samples_per_prompt, prefixes):
        targets = [s.target] * len(lengths)
        if pack:
            out.append(pack_sample(record.prompt_ids, s.token_ids, suffix, lengths, targets, eos))
        else:
            out.extend(unpack_sample(record.prompt_ids, s.token_ids, suffix, lengths, targets, eos))
    return out


def _evaluated_lengths(
    records: Sequence[PromptRecord], exclude_families: Sequence[str], samples_per_prompt: int | None, prefixes: bool
) -> Iterator[tuple[PromptRecord, SampleRecord, list[int]]]:
    """The samples training selects, each with its evaluated lengths: the full response, then its prefixes."""
    for record in records:
        if record.family in exclude_families:
            continue
        for s in record.samples[:samples_per_prompt]:
            yield record, s, [len(s.token_ids), *(s.prefix_lengths if prefixes else ())]


def build_chunk_examples(
    records: Sequence[PromptRecord],
    chat_format: ChatFormat,
    *,
    exclude_families: Sequence[str] = (),
    samples_per_prompt: int | None = None,
    prefixes: bool = True,
) -> list[ChunkExample]:
    """Training examples of a self-evaluation-scoped adapter: per sample, its full response, then its prefixes.

    Same selection as :func:`build_examples`; each evaluated length is one
    :class:`~langchain_capeval.training.examples.ChunkExample` (no packing: the trunk runs without gradients).

    Example:
        >>> build_chunk_examples([], chat_format)  # doctest: +SKIP
        []

    """
    suffix = chat_format.self_evaluation_suffix
    eos = chat_format.eos_token_ids
    return [
        ChunkExample.of(record.prompt_ids, s.token_ids, k, suffix, s.target, eos)
        for record, s, lengths in _evaluated_lengths(records, exclude_families, samples_per_prompt, prefixes)
        for k in lengths
    ]


def chunk_answer_logits(model: Any, examples: Sequence[ChunkExample]) -> torch.Tensor:
    """``[B, V]`` logits of the answer token, with the adapter on the self-evaluation chunk only.

    The trunks (prompt and response but its last token) run through the base weights, adapter
    disabled and without gradients, as the engine's base model writes its KV cache; the chunks run
    through the adapter over that cache, left-padded so every row's last position is its answer.

    Args:
        model: A PEFT model (``disable_adapter()`` gives the base weights).
        examples: The evaluated responses.

    Example:
        >>> logits = chunk_answer_logits(peft_model, examples)  # doctest: +SKIP
        >>> p_no = logits[:, [no_id, yes_id]].softmax(-1)[:, 0]  # doctest: +SKIP

    """
    trunk_ids, trunk_mask = left_padded_chunk([e.trunk for e in examples])
    chunk_ids, chunk_mask = left_padded_chunk([e.chunk for e in examples])
    trunk_mask, chunk_mask = trunk_mask.long(), chunk_mask.long()
    with torch.no_grad(), model.disable_adapter():
        cache = output_cache(
            model(
                input_ids=trunk_ids,
                attention_mask=trunk_mask,
                position_ids=(trunk_mask.cumsum(1) - 1).clamp_min(0),
                use_cache=True,
            )
        )
    out = model(
        input_ids=chunk_ids,
        attention_mask=torch.cat([trunk_mask, chunk_mask], 1),
        position_ids=(trunk_mask.sum(1, keepdim=True) + chunk_mask.cumsum(1) - 1).clamp_min(0),
        **{cache_keyword(model): cache},
        use_cache=True,
        logits_to_keep=1,
    )
    logits: torch.Tensor = out.logits[:, -1]
    return logits


def length_batches(lengths: Sequence[int], batch_tokens: int, rng: random.Random) -> list[list[int]]:
    """Group indices into batches of similar length whose padded size stays under ``batch_tokens``.

    Indices are sorted by length (ties shuffled), cut greedily, and the batch order is shuffled.

    Example:
        >>> length_batches([5, 3, 9, 4], batch_tokens=10, rng=random.Random(0))
        [[1, 3], [0], [2]]

    """
    order = sorted(range(len(lengths)), key=lambda i: (lengths[i], rng.random()))
    batches = _cut(order, lengths, batch_tokens)
    rng.shuffle(batches)
    return batches


def shuffled_batches(lengths: Sequence[int], batch_tokens: int, rng: random.Random) -> list[list[int]]:
    """Group indices in a random order into batches whose padded size stays under ``batch_tokens``.

    Unlike :func:`length_batches`, a batch mixes lengths (more padding) and so task families, whose
    lengths differ: every step then sees the spread of targets the whole data has.

    Example:
        >>> shuffled_batches([5, 3, 9, 4], batch_tokens=10, rng=random.Random(0))
        [[2], [0, 1], [3]]

    """
    order = list(range(len(lengths)))
    rng.shuffle(order)
    return _cut(order, lengths, batch_tokens)


def _cut(order: Sequence[int], lengths: Sequence[int], batch_tokens: int) -> list[list[int]]:
    """Cut ``order`` greedily into batches whose padded size (longest x count) stays under ``batch_tokens``."""
    batches: list[list[int]] = []
    current: list[int] = []
    for i in order:
        width = max(lengths[i], max((lengths[j] for j in current), default=0))
        if current and width * (len(current) + 1) > batch_tokens:
            batches.append(current)
            current = []
        current.append(i)
    if current:
        batches.append(current)
    return batches


def soft_answer_loss(
    logits: torch.Tensor, targets: torch.Tensor, no_id: int, yes_id: int, *, two_way: bool = False
) -> torch.Tensor:
    """Soft cross-entropy of the answer token over {"No": p, "Yes": 1 - p}, averaged.

    Args:
        logits: ``[A, V]`` logits at the answer positions.
        targets: ``[A]`` P("No") targets.
        no_id: Token id of "No".
        yes_id: Token id of "Yes".
        two_way: Renormalise over the two answers before the cross-entropy.

    Example:
        >>> logits = torch.tensor([[0.0, 0.0, 0.0]])
        >>> round(float(soft_answer_loss(logits, torch.tensor([1.0]), 0, 1)), 4)  # -log(1/3)
        1.0986
        >>> round(float(soft_answer_loss(logits, torch.tensor([1.0]), 0, 1, two_way=True)), 4)  # -log(1/2)
        0.6931

    """
    logits = logits.float()
    if two_way:
        logp = torch.log_softmax(logits[:, [no_id, yes_id]], dim=-1)
        no, yes = logp[:, 0], logp[:, 1]
    else:
        logp = torch.log_softmax(logits, dim=-1)
        no, yes = logp[:, no_id], logp[:, yes_id]
    return -(targets * no + (1 - targets) * yes).mean()


def target_entropy(targets: torch.Tensor) -> torch.Tensor:
    """Mean binary entropy of the targets: the least the answer loss can reach (all mass on "No" and "Yes").

    Example:
        >>> round(float(target_entropy(torch.tensor([0.5, 1.0]))), 4)
        0.3466

    """
    p = targets.double().clamp(1e-12, 1 - 1e-12)
    h = -(p * p.log() + (1 - p) * (1 - p).log())
    return h.where((targets > 0) & (targets < 1), torch.zeros_like(h)).mean().float()


@dataclass
class TrainResult:
    """What a training run did.

    Attributes:
        steps: Optimiser steps taken.
        examples: Training sequences (tree-packed samples) in the data.
        seconds: Wall time of the run.
        history: Per logged step: step, losses, learning rate, seconds.

    """

    steps: int
    examples: int
    seconds: float
    history: list[dict[str, float]] = field(default_factory=list)


class SelfEvalTrainer:
    """Trains a self-evaluation LoRA on win-or-tie targets, keeping generation close to the base model.

    Args:
        model: The causal LM to adapt (the model that sampled the data); it is wrapped in a LoRA in place.
        tokenizer: Its tokenizer (with its chat template).
        config: The training config.
        records: The preference data; ``None`` reads ``config.data``.

    """

    def __init__(
        self,
        model: PreTrainedModel,
        tokenizer: PreTrainedTokenizerBase,
        config: SelfEvalTrainingConfig,
        records: Sequence[PromptRecord] | None = None,
    ) -> None:
        try:
            from peft import LoraConfig, get_peft_model
        except ImportError as e:  # pragma: no cover - peft is a core dependency
            raise MissingExtraError("training a self-evaluation adapter needs peft: pip install peft") from e
        self.config = config
        if config.num_threads:
            torch.set_num_threads(config.num_threads)
        self.tokenizer = tokenizer
        self.chat_format = ChatFormat(tokenizer)
        self.no_id, self.yes_id = self.chat_format.answer_token_ids
        if records is None:
            records = read_records(config.data)
            if not records:
                raise ValueError(f"data: no records in {config.data}; build them with `capeval build-data`")
        select: dict[str, Any] = {
            "exclude_families": config.exclude_families,
            "samples_per_prompt": config.samples_per_prompt,
            "prefixes": config.train_prefixes,
        }
        self.examples: list[PackedSample] | list[ChunkExample] = (
            build_chunk_examples(records, self.chat_format, **select)
            if config.scope == "self_evaluation"
            else build_examples(records, self.chat_format, pack=config.pack_prefixes, **select)
        )
        if not self.examples:
            raise ValueError("no training examples left (every family excluded?)")
        torch.manual_seed(config.seed)
        lora = LoraConfig(
            r=config.lora_r,
            lora_alpha=config.lora_alpha,
            lora_dropout=config.lora_dropout,
            target_modules=list(config.target_modules),
            layers_to_transform=list(config.layers_to_transform) if config.layers_to_transform else None,
            bias="none",
            task_type="CAUSAL_LM",
        )
        self.model = get_peft_model(model, lora)
        base: Any = self.model.get_base_model()
        self._decoder: torch.nn.Module = base.get_decoder()
        self._lm_head: torch.nn.Module = base.get_output_embeddings()
        self._eager = getattr(base.config, "_attn_implementation", "sdpa") == "eager"

    @classmethod
    def from_config(cls, config: SelfEvalTrainingConfig) -> SelfEvalTrainer:
        """Load the model ``config.model`` and the data ``config.data``, and build the trainer."""
        from langchain_capeval.models import load_model

        loaded = load_model(config.model)
        return cls(loaded.model, loaded.tokenizer, config)

    def _hidden(self, batch: Batch, width: int | None = None) -> torch.Tensor:
        """``[B * W, H]`` last hidden states of a batch's first ``width`` columns (all if ``None``)."""
        w = width or batch.input_ids.shape[1]
        mask: torch.Tensor = batch.attention_mask[:, :, :w, :w]
        if self._eager:  # eager attention adds the mask: turn it into 0 / -inf
            mask = torch.zeros(mask.shape).masked_fill(~mask, torch.finfo(torch.float32).min)
        out = self._decoder(
            input_ids=batch.input_ids[:, :w], attention_mask=mask, position_ids=batch.position_ids[:, :w]
        )
        hidden: torch.Tensor = out.last_hidden_state
        return hidden.reshape(-1, hidden.shape[-1])

    def _base_response_logits(self, batch: Batch) -> torch.Tensor:
        """``[R, V]`` logits of the base model (adapter off) at the response positions.

        Only the trunks are run: trunk tokens never attend to the branches after them, so
        cutting the columns after the longest response leaves their hidden states unchanged.
        """
        length = batch.input_ids.shape[1]
        width = int(batch.response_index.remainder(length).max()) + 1
        index = batch.response_index // length * width + batch.response_index.remainder(length)
        with torch.no_grad(), self.model.disable_adapter():
            return self._lm_head(self._hidden(batch, width)[index]).float()

    def compute_loss(self, batch: Batch | Sequence[ChunkExample]) -> tuple[torch.Tensor, dict[str, float]]:
        """Return the training loss of one batch, and its parts (answer loss, regularizer).

        A batch is a collated :class:`Batch` of packed samples, or, with ``scope="self_evaluation"``,
        a list of :class:`~langchain_capeval.training.examples.ChunkExample`.

        Example:
            >>> loss, parts = trainer.compute_loss(collate(trainer.examples[:4]))  # doctest: +SKIP
            >>> sorted(parts)  # doctest: +SKIP
            ['answer_loss', 'excess_answer_loss', 'loss', 'regularizer']

        """
        cfg = self.config
        two_way = cfg.answer_loss == "two_way"
        if not isinstance(batch, Batch):  # the chunk only, over the base weights' cache; no regularizer
            targets = torch.tensor([e.target for e in batch])
            answer = soft_answer_loss(
                chunk_answer_logits(self.model, batch), targets, self.no_id, self.yes_id, two_way=two_way
            )
            return answer, _loss_parts(answer, answer, torch.zeros(()), targets)
        hidden = self._hidden(batch)
        answer_logits = self._lm_head(hidden[batch.answer_index])
        answer = soft_answer_loss(answer_logits, batch.targets, self.no_id, self.yes_id, two_way=two_way)
        reg = torch.zeros(())
        if cfg.regularizer != "none" and cfg.regularizer_weight > 0 and batch.response_index.numel():
            logits = self._lm_head(hidden[batch.response_index]).float()
            if cfg.regularizer == "sft":
                reg = F.cross_entropy(logits, batch.response_labels)
            else:
                base_logits = self._base_response_logits(batch)
                reg = F.kl_div(
                    torch.log_softmax(logits, -1),
                    torch.log_softmax(base_logits, -1),
                    log_target=True,
                    reduction="batchmean",
                )
        loss = answer + cfg.regularizer_weight * reg
        return loss, _loss_parts(loss, answer, reg, batch.targets)

    def train(self, *, progress: bool = True) -> TrainResult:
        """Run the optimiser over the examples for ``epochs`` (or ``max_steps``); return the history."""
        from tqdm.auto import tqdm

        cfg = self.config
        rng = random.Random(cfg.seed)
        lengths = [len(e) for e in self.examples]
        make_batches = shuffled_batches if cfg.batch_order == "shuffled" else length_batches
        per_epoch = len(make_batches(lengths, cfg.batch_tokens, random.Random(0)))
        total = cfg.max_steps or max(1, math.ceil(cfg.epochs * per_epoch))
        params = [p for p in self.model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=cfg.learning_rate, weight_decay=cfg.weight_decay)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _warmup_cosine(cfg.warmup_steps, total))
        self.model.train()
        history: list[dict[str, float]] = []
        running: dict[str, float] = {}
        start = time.perf_counter()
        bar = tqdm(total=total, desc="train", disable=not progress)
        step = 0
        while step < total:
            for idx in make_batches(lengths, cfg.batch_tokens, rng):
                if step >= total:
                    break
                chosen = [self.examples[i] for i in idx]
                batch = chosen if self.config.scope == "self_evaluation" else collate(chosen)  # type: ignore[arg-type]
                loss, parts = self.compute_loss(batch)  # type: ignore[arg-type]
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
                optimizer.step()
                scheduler.step()
                step += 1
                for k, v in parts.items():
                    running[k] = running.get(k, 0.0) + v
                running["n"] = running.get("n", 0.0) + 1
                if step % cfg.log_every == 0 or step == total:
                    n = running.pop("n")
                    row = {"step": float(step), **{k: round(v / n, 5) for k, v in running.items()}}
                    row["lr"] = float(scheduler.get_last_lr()[0])
                    row["seconds"] = round(time.perf_counter() - start, 1)
                    history.append(row)
                    logger.info("train %s", row)
                    bar.set_postfix(loss=row["loss"], answer=row["answer_loss"])
                    running = {}
                bar.update(1)
                if cfg.save_every and step % cfg.save_every == 0 and step < total:
                    self.result = TrainResult(step, len(self.examples), time.perf_counter() - start, history)
                    self.save()
                    if cfg.keep_checkpoints:
                        self.save(str(Path(cfg.output_dir) / f"checkpoint-{step}"))
        bar.close()
        self.model.eval()
        self.result = TrainResult(step, len(self.examples), time.perf_counter() - start, history)
        return self.result

    def save(self, path: str | None = None) -> Path:
        """Save the adapter (PEFT format; vLLM serves it unless scoped), its scope, the config and the log.

        Returns:
            The folder written (``config.output_dir`` unless ``path`` is given).

        """
        out = Path(path or self.config.output_dir)
        out.mkdir(parents=True, exist_ok=True)
        self.model.save_pretrained(str(out))
        config_path = out / "adapter_config.json"
        adapter_config: dict[str, Any] = json.loads(config_path.read_text())
        if self.config.model is None:
            adapter_config["base_model_name_or_path"] = HF_BASE_MODEL_ID
        config_path.write_text(json.dumps(adapter_config, indent=2, sort_keys=True) + "\n")
        write_adapter_scope(out, self.config.scope)  # engines run a scoped adapter on the chunk only
        (out / "training_config.json").write_text(self.config.model_dump_json(indent=2) + "\n")
        result = getattr(self, "result", None)
        if result is not None:
            (out / "train_log.json").write_text(json.dumps(asdict(result), indent=2) + "\n")
        return out


def _loss_parts(loss: torch.Tensor, answer: torch.Tensor, reg: torch.Tensor, targets: torch.Tensor) -> dict[str, float]:
    """The logged parts of a batch's loss; the excess answer loss is above the least it can reach."""
    return {
        "loss": float(loss.detach()),
        "answer_loss": float(answer.detach()),
        "excess_answer_loss": float(answer.detach() - target_entropy(targets)),
        "regularizer": float(reg.detach()),
    }


def _warmup_cosine(warmup: int, total: int) -> Any:
    """LR multiplier: linear warm-up over ``warmup`` steps, then cosine decay to 10% at ``total``."""

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))

    return factor
