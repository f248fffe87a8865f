"""The training commands of ``capeval``.

``build-data``, ``data-card``, ``relabel``, ``extend``, ``train``, ``average-adapters`` and ``eval-selfeval``.

Every flag is generated from a config field (its type from the annotation, its help from
the field's docstring), so the command line and the Python API cannot drift apart.

Example:
    $ capeval build-data --max-prompts-per-family 24 --num-threads 1
    $ capeval relabel results/training/data --output-dir /tmp/graded --reward partial_credit
    $ capeval extend results/training/data --output-dir /tmp/long --max-new-tokens 256
    $ capeval train --data results/training/data/preferences.jsonl --output-dir /tmp/adapter
    $ capeval average-adapters /tmp/adapter/checkpoint-250 /tmp/adapter/checkpoint-300 --output-dir /tmp/avg
    $ capeval eval-selfeval --adapter /tmp/adapter --output-dir /tmp/eval

"""

from __future__ import annotations

import argparse
import json
import logging
from collections.abc import Callable
from typing import Any, Literal, TypeVar, get_args, get_origin

from pydantic import BaseModel

from langchain_capeval.training.config import (
    PreferenceDataConfig,
    RewardName,
    SelfEvalEvalConfig,
    SelfEvalTrainingConfig,
)

C = TypeVar("C", bound=BaseModel)


def _tuple_of(kind: type) -> Any:
    def parse(text: str) -> tuple[Any, ...]:
        return tuple(kind(x.strip()) for x in text.split(",") if x.strip())

    parse.__name__ = f"comma-separated {kind.__name__}s"
    return parse


def _none_or(kind: Callable[[str], Any]) -> Any:
    def parse(text: str) -> Any:
        return None if text.lower() == "none" else kind(text)

    parse.__name__ = getattr(kind, "__name__", "value")
    return parse


def add_config_arguments(parser: argparse.ArgumentParser, config: type[BaseModel]) -> None:
    """Add one ``--flag`` per field of a pydantic config, typed from its annotation, helped by its docstring.

    Tuples take comma-separated values; optional fields take ``none``; booleans take ``--x/--no-x``.

    Example:
        >>> p = argparse.ArgumentParser()
        >>> add_config_arguments(p, PreferenceDataConfig)
        >>> ns = p.parse_args(["--families", "add1,capitals", "--max-prompts-per-family", "3"])
        >>> config_from_args(PreferenceDataConfig, ns).families
        ('add1', 'capitals')

    """
    for name, field in config.model_fields.items():
        ann = field.annotation
        args = [a for a in get_args(ann) if a is not type(None)]
        optional = type(None) in get_args(ann)
        base = args[0] if optional and len(args) == 1 else ann
        help_text = " ".join((field.description or "").split()).replace("%", "%%")
        kwargs: dict[str, Any] = {
            "dest": name,
            "default": argparse.SUPPRESS,
            "help": f"{help_text} (default: {field.default!r})",
        }
        if base is bool:
            kwargs["action"] = argparse.BooleanOptionalAction
        elif get_origin(base) is Literal:
            kwargs["choices"] = get_args(base)
        elif get_origin(base) is tuple:
            inner = get_args(base)[0]
            inner = get_args(inner)[0] if get_origin(inner) is Literal else inner
            parse = _tuple_of(type(inner) if not isinstance(inner, type) else inner)
            kwargs["type"] = _none_or(parse) if optional else parse
        elif base in (int, float, str):
            kind: Callable[[str], Any] = base  # type: ignore[assignment]
            kwargs["type"] = _none_or(kind) if optional else kind
        parser.add_argument("--" + name.replace("_", "-"), **kwargs)


def config_from_args(config: type[C], ns: argparse.Namespace) -> C:
    """Build a config from the flags that were given (the others keep their defaults; ``none`` gives ``None``)."""
    given = {k: getattr(ns, k) for k in config.model_fields if hasattr(ns, k)}
    return config(**given)


def _log() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")


def cmd_build_data(ns: argparse.Namespace) -> int:
    """Sample, label and write on-policy preference data; print the data card."""
    from langchain_capeval.engines.transformers import TransformersEngine, TransformersEngineConfig
    from langchain_capeval.training.dataset import PreferenceDataBuilder

    _log()
    config = config_from_args(PreferenceDataConfig, ns)
    engine = TransformersEngine.from_config(
        TransformersEngineConfig(model=config.model, adapter=None, num_threads=config.num_threads)
    )
    card = PreferenceDataBuilder(engine, config).build()
    print(json.dumps({k: card[k] for k in ("counts", "tie_rate", "label_balance")}, indent=2))
    return 0


def cmd_data_card(ns: argparse.Namespace) -> int:
    """Describe a built preference-data folder again (no engine); print what its labels can rank."""
    from langchain_capeval.training.dataset import describe_folder

    card = describe_folder(ns.output_dir)
    print(json.dumps({"label_balance": card["label_balance"], "per_family": card["per_family"]}, indent=2))
    return 0


def cmd_relabel(ns: argparse.Namespace) -> int:
    """Score a built folder's samples again with another reward, into a new folder (no sampling)."""
    from langchain_capeval.training.dataset import relabel_folder

    card = relabel_folder(
        ns.source_dir,
        ns.output_dir,
        ns.reward,
        ns.epsilon,
        prefix_lengths=ns.prefix_lengths,
        prefixes_per_sample=ns.prefixes_per_sample,
    )
    shown = {"reward": card["reward"], "label_balance": card["label_balance"]}
    print(json.dumps(shown | {"prefixes": card["counts"]["prefix_examples_by_length"]}, indent=2))
    return 0


def cmd_extend(ns: argparse.Namespace) -> int:
    """Continue a built folder's cut-short samples to a larger max_new_tokens, into a new folder (resumable)."""
    from langchain_capeval.engines.transformers import TransformersEngine, TransformersEngineConfig
    from langchain_capeval.training.dataset import extend_folder, read_build_settings

    _log()
    model = read_build_settings(ns.source_dir).get("model")  # the source's model; extend_folder checks the rest
    engine = TransformersEngine.from_config(
        TransformersEngineConfig(model=model, adapter=None, num_threads=ns.num_threads)
    )
    card = extend_folder(
        ns.source_dir,
        ns.output_dir,
        engine,
        ns.max_new_tokens,
        prefix_lengths=ns.prefix_lengths,
        prompts_per_batch=ns.prompts_per_batch,
    )
    print(json.dumps({k: card[k] for k in ("decoding", "counts", "label_balance")}, indent=2))
    return 0


def cmd_train(ns: argparse.Namespace) -> int:
    """Train a self-evaluation LoRA and save it."""
    from langchain_capeval.training.trainer import SelfEvalTrainer

    _log()
    config = config_from_args(SelfEvalTrainingConfig, ns)
    trainer = SelfEvalTrainer.from_config(config)
    result = trainer.train()
    out = trainer.save()
    print(f"trained {result.steps} steps on {result.examples} sequences in {result.seconds:.0f}s; saved {out}")
    return 0


def cmd_average_adapters(ns: argparse.Namespace) -> int:
    """Average LoRA adapters' updates into one adapter, exactly (checkpoints of one run, or runs from one init)."""
    from langchain_capeval.training.averaging import average_adapters, read_lora_config

    out = average_adapters(ns.adapters, ns.output_dir, weights=ns.weights)
    print(f"averaged {len(ns.adapters)} adapters into {out} (rank {read_lora_config(out)['r']})")
    return 0


def cmd_eval_selfeval(ns: argparse.Namespace) -> int:
    """Evaluate an adapter against the zero-shot base model; print the table, write JSON and the PNG."""
    from langchain_capeval.training.evaluate import evaluate_self_evaluation, render_table

    _log()
    config = config_from_args(SelfEvalEvalConfig, ns)
    report = evaluate_self_evaluation(config)
    print(render_table(report))
    return 0


def add_training_commands(subparsers: Any) -> None:
    """Register the training commands on ``capeval``'s subparsers.

    Example:
        >>> parser = argparse.ArgumentParser(prog="capeval")
        >>> add_training_commands(parser.add_subparsers(dest="command"))
        >>> parser.parse_args(["train", "--lora-r", "8"]).lora_r
        8

    """
    commands = (
        ("build-data", PreferenceDataConfig, cmd_build_data, "sample on-policy preference data with ties"),
        ("train", SelfEvalTrainingConfig, cmd_train, "train a self-evaluation LoRA adapter"),
        ("eval-selfeval", SelfEvalEvalConfig, cmd_eval_selfeval, "evaluate self-evaluation vs the base model"),
    )
    for name, config, func, help_text in commands:
        parser = subparsers.add_parser(name, help=help_text, description=(config.__doc__ or "").strip())
        add_config_arguments(parser, config)
        parser.set_defaults(func=func)
    card = subparsers.add_parser(
        "data-card", help="rewrite a built data folder's card (no sampling)", description=cmd_data_card.__doc__
    )
    card.add_argument("output_dir", help="the folder build-data wrote (preferences.jsonl, build_config.json)")
    card.set_defaults(func=cmd_data_card)
    relabel = _from_built_folder(
        subparsers, "relabel", "score a built data folder again with another reward (no sampling)", cmd_relabel
    )
    relabel.add_argument("--reward", required=True, choices=get_args(RewardName), help="the reward to score with")
    relabel.add_argument("--epsilon", type=float, default=0.0, help="largest reward gap that counts as a tie")
    relabel.add_argument(
        "--prefix-lengths",
        type=_tuple_of(int),
        default=None,
        help="draw the truncation lengths anew from these (comma-separated; default: keep the source's)",
    )
    relabel.add_argument(
        "--prefixes-per-sample", type=int, default=None, help="draw this many truncation lengths a sample anew"
    )
    extend = _from_built_folder(
        subparsers, "extend", "continue a built data folder's cut-short samples to a larger max_new_tokens", cmd_extend
    )
    extend.add_argument("--max-new-tokens", type=int, required=True, help="the new limit, above the source's")
    extend.add_argument(
        "--prefix-lengths",
        type=_tuple_of(int),
        default=None,
        help="truncation lengths to draw prefixes from (default: build-data's, 8,16,32,64)",
    )
    extend.add_argument("--prompts-per-batch", type=int, default=4, help="prompts whose samples decode together")
    extend.add_argument("--num-threads", type=int, default=None, help="torch threads (default: torch's)")
    average = subparsers.add_parser(
        "average-adapters",
        help="average LoRA adapters into one, exactly (checkpoint averaging, adapter soups)",
        description=cmd_average_adapters.__doc__,
    )
    average.add_argument("adapters", nargs="+", help="two or more adapter folders of the same model and modules")
    average.add_argument("--output-dir", required=True, help="the averaged adapter's folder")
    average.add_argument(
        "--weights",
        type=_tuple_of(float),
        default=None,
        help="comma-separated weights, one per adapter (default: equal)",
    )
    average.set_defaults(func=cmd_average_adapters)


def _from_built_folder(
    subparsers: Any, name: str, help_text: str, func: Callable[[argparse.Namespace], int]
) -> argparse.ArgumentParser:
    """A command that reads a built data folder and writes a new one: ``SOURCE_DIR --output-dir NEW``."""
    parser: argparse.ArgumentParser = subparsers.add_parser(name, help=help_text, description=func.__doc__)
    parser.add_argument("source_dir", help="the folder build-data wrote")
    parser.add_argument("--output-dir", required=True, help="a new folder for the data and its card")
    parser.set_defaults(func=func)
    return parser
