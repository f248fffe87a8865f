r"""The ``capeval bench`` command: every flag generated from a :class:`BenchConfig` field.

Flags take their type from the field's annotation and their help from its docstring (the
same generator as the training commands), so the command line and :func:`run_benchmark`
cannot drift apart. The command prints the Markdown table and the output folder.

Example:
    $ capeval bench --families add1,capitals --max-prompts 20 --num-threads 1
    $ capeval bench --task gsm8k --max-prompts 500 --base-url http://localhost:8000/v1 \
        --served-model llama-selfeval --tokenizer /models/Llama-3.1-8B-Instruct --no-self-certainty

"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from typing import Any

from langchain_capeval.bench.config import BenchConfig
from langchain_capeval.training.cli import add_config_arguments, config_from_args


def cmd_bench(ns: argparse.Namespace) -> int:
    """Run the benchmark; print the Markdown table and where the outputs are."""
    from langchain_capeval.bench import run_benchmark
    from langchain_capeval.bench.report import RESULTS_MD

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    config = config_from_args(BenchConfig, ns)
    run_benchmark(config)
    print((config.path / RESULTS_MD).read_text())
    print(f"wrote {config.path}/: results.json, results.md, accuracy_vs_samples.png, accuracy_vs_tokens.png")
    return 0


def add_bench_command(subparsers: Any) -> None:
    """Register ``bench`` on a ``capeval`` subparsers object.

    Example:
        >>> parser = argparse.ArgumentParser(prog="capeval")
        >>> add_bench_command(parser.add_subparsers(dest="command"))
        >>> ns = parser.parse_args(["bench", "--families", "add1", "--thresholds", "0.5,0.9", "--no-judge"])
        >>> config = config_from_args(BenchConfig, ns)
        >>> config.families, config.thresholds, config.judge
        (('add1',), (0.5, 0.9), False)

    """
    parser = subparsers.add_parser(
        "bench",
        help="benchmark adaptive sampling, pruning and baselines: accuracy vs samples and tokens",
        description=(BenchConfig.__doc__ or "").strip(),
    )
    add_config_arguments(parser, BenchConfig)
    parser.set_defaults(func=cmd_bench)


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m langchain_capeval.bench.cli ...``: the ``bench`` command on its own."""
    parser = argparse.ArgumentParser(prog="capeval")
    add_bench_command(parser.add_subparsers(dest="command", required=True))
    ns = parser.parse_args(argv)
    return int(ns.func(ns))


if __name__ == "__main__":
    sys.exit(main())
