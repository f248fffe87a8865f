"""The vLLM engine.

Two tiers:

* **Everywhere**: the engine's logic that needs no vLLM (configuration, continuation planning,
  per-chunk seeds, finishing rows, stop strings, the self-evaluation prompt, reading P("No") and
  P("Yes") from vLLM's logprobs), checked against the transformers engine on the real embedded
  model where the two must agree.
* **Where vLLM runs** (``TestRealVLLM``, ``TestRealVLLMAdapter``): the engine on vLLM and a CUDA
  GPU, mirroring ``tests/test_engine.py``. Only these classes skip elsewhere, with the reason
  printed (``-ra``). The model is the embedded SmolLM2-135M-Instruct, converted once to the
  local folder the transformers engine also loads, so nothing is downloaded.
  ``CAPEVAL_VLLM_TEST_DTYPE`` (default ``float32``) sets vLLM's dtype for the numerical checks.
"""

from __future__ import annotations

import dataclasses
import gc
import importlib.util
import json
import math
import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest
import torch
from pydantic import ValidationError

from langchain_capeval.adapters import default_adapter_path, resolve_adapter
from langchain_capeval.chat_format import ChatFormat
from langchain_capeval.engines import Engine, Sample
from langchain_capeval.engines.transformers import TransformersEngine
from langchain_capeval.engines.vllm import (
    MAX_LORA_RANKS,
    NAMED_ENGINE_ARGS,
    VLLM_INSTALL,
    VLLMEngine,
    VLLMEngineConfig,
    adapter_rank,
    apply_new_tokens,
    chunk_max_tokens,
    chunk_seed,
    engine_args_kwargs,
    find_stop,
    finish_from_vllm,
    generation_sampling_kwargs,
    lora_rank_slot,
    read_answer_logprobs,
    self_evaluation_cost,
    self_evaluation_prompt,
    self_evaluation_sampling_kwargs,
    supports_logprob_token_ids,
)
from langchain_capeval.errors import (
    CapEvalInputError,
    EngineClosedError,
    MissingExtraError,
    ModelNotInstalledError,
    RequestCancelledError,
    UnknownRowError,
    UnsupportedFeatureError,
)
from langchain_capeval.sampling import SamplingParams

MATH = "What is 2+3? Answer with just the number."
COLORS = "List three colors."
STORY = "Write a long story about a dragon."

VLLM_SKIP = f"vLLM is not installed (needs a CUDA GPU): {VLLM_INSTALL}"
HAS_VLLM = importlib.util.find_spec("vllm") is not None
TEST_DTYPE = os.environ.get("CAPEVAL_VLLM_TEST_DTYPE", "float32")


def encode(chat_format: ChatFormat, text: str) -> list[int]:
    return chat_format.encode([{"role": "user", "content": text}])


@torch.inference_mode()
def scratch_probs(engine: TransformersEngine, ids: Sequence[int]) -> torch.Tensor:
    """Next-token distribution (float64) of one unpadded sequence, no cache, on the transformers model."""
    logits = engine.model(torch.tensor([list(ids)])).logits[0, -1]
    return torch.softmax(logits.double(), dim=-1)


def run(engine: Engine, prompt: list[int], params: list[SamplingParams], **kw: Any) -> list[Sample]:
    """Submit, generate to the end, close the request; the finished samples."""
    rows = engine.submit(prompt, params)
    out = engine.generate(rows, **kw)
    engine.close_request(out[0].request_id)
    return out


@dataclasses.dataclass
class Logprob:
    """The shape of ``vllm.logprobs.Logprob`` (what vLLM puts in a logprobs mapping)."""

    logprob: float
    rank: int | None = None
    decoded_token: str | None = None


# == everywhere: the logic that needs no vLLM ===================================================


def test_importing_the_package_never_imports_vllm() -> None:
    code = (
        "import sys, langchain_capeval, langchain_capeval.engines as e, langchain_capeval.engines.vllm as v;"
        "assert e.VLLMEngine is v.VLLMEngine and e.VLLMEngineConfig is v.VLLMEngineConfig;"
        "v.VLLMEngineConfig(model='/m', adapter=None);"
        "print('vllm' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False", out.stderr


@pytest.mark.skipif(HAS_VLLM, reason="vLLM is installed here: the missing-extra error cannot be provoked")
def test_missing_vllm_names_the_extra() -> None:
    from langchain_capeval.engines import load_engine

    assert VLLM_INSTALL == "pip install 'langchain-capeval[vllm]'"
    for build in (
        lambda: VLLMEngine.from_config(),
        lambda: VLLMEngine.from_config(VLLMEngineConfig(model="/no/such/model")),  # checked before the model
        lambda: load_engine(backend="vllm"),
    ):
        with pytest.raises(MissingExtraError, match=r"pip install 'langchain-capeval\[vllm\]'") as info:
            build()
        assert isinstance(info.value, ImportError)


def test_vllm_engine_implements_the_protocol() -> None:
    members = {n for n in vars(Engine) if not n.startswith("_")} | {"model_name", "chat_format", "context_length"}
    missing = sorted(n for n in members if not hasattr(VLLMEngine, n))
    assert not missing, missing
    assert {"release", "cancel", "close", "prefix_cache_stats", "live_rows"} <= set(dir(VLLMEngine))


# -- configuration ---------------------------------------------------------------------------------


def test_config_defaults_and_validation() -> None:
    cfg = VLLMEngineConfig()
    assert cfg.enable_prefix_caching and cfg.adapter == "default" and cfg.model is None
    assert cfg.tensor_parallel_size == 1 and cfg.self_eval_logprobs == "auto"
    bad: list[tuple[dict[str, Any], str]] = [
        ({"tensor_parallel_size": 0}, "tensor_parallel_size"),
        ({"gpu_memory_utilization": 0.0}, "gpu_memory_utilization"),
        ({"gpu_memory_utilization": 1.5}, "gpu_memory_utilization"),
        ({"max_model_len": 10}, "max_model_len"),
        ({"max_lora_rank": 12}, r"max_lora_rank must be one of 1, 8, 16, .*, got 12"),
        ({"dtype": "float8"}, "dtype"),
        ({"seed": -1}, "seed"),
        ({"self_eval_logprobs": "prompt_logprobs"}, "self_eval_logprobs"),
        ({"top_logprobs": 1}, "top_logprobs"),
        ({"extra_engine_args": {"enable_prefix_caching": False}}, "extra_engine_args: enable_prefix_caching"),
        ({"extra_engine_args": {"max_lora_rank": 64, "kv_cache_dtype": "fp8"}}, "extra_engine_args: max_lora_rank"),
        ({"device": "cuda"}, "device"),  # extra fields are forbidden
    ]
    for kwargs, message in bad:
        with pytest.raises(ValidationError, match=message):
            VLLMEngineConfig(**kwargs)
    with pytest.raises(ValidationError):
        cfg.seed = 3  # frozen
    for rank in MAX_LORA_RANKS:
        assert VLLMEngineConfig(max_lora_rank=rank).max_lora_rank == rank


def test_engine_args_follow_the_config() -> None:
    plain = engine_args_kwargs(VLLMEngineConfig(adapter=None), "/models/m", lora_rank=None)
    assert plain["model"] == plain["tokenizer"] == "/models/m"
    assert plain["enable_prefix_caching"] is True and plain["max_logprobs"] == 20
    assert "enable_lora" not in plain and "max_model_len" not in plain and "max_num_seqs" not in plain
    cfg = VLLMEngineConfig(
        tensor_parallel_size=2,
        gpu_memory_utilization=0.5,
        max_model_len=4096,
        max_num_seqs=64,
        dtype="bfloat16",
        seed=5,
        enforce_eager=True,
        enable_prefix_caching=False,
        top_logprobs=50,
        extra_engine_args={"kv_cache_dtype": "fp8", "disable_log_stats": False},
    )
    kw = engine_args_kwargs(cfg, "/m", lora_rank=32)
    assert kw["enable_lora"] is True and kw["max_lora_rank"] == 32 and kw["max_loras"] == 1
    assert (kw["tensor_parallel_size"], kw["gpu_memory_utilization"], kw["max_model_len"]) == (2, 0.5, 4096)
    assert (kw["max_num_seqs"], kw["dtype"], kw["seed"], kw["enforce_eager"]) == (64, "bfloat16", 5, True)
    assert kw["enable_prefix_caching"] is False and kw["max_logprobs"] == 50
    assert kw["kv_cache_dtype"] == "fp8" and kw["disable_log_stats"] is False
    assert set(kw) <= NAMED_ENGINE_ARGS | set(cfg.extra_engine_args) | {"disable_log_stats"}
    if HAS_VLLM:  # every name is a real EngineArgs field
        import vllm

        fields = {f.name for f in dataclasses.fields(vllm.EngineArgs)}
        assert set(kw) - {"kv_cache_dtype"} <= fields


def test_lora_ranks_and_adapters(tmp_path: Path) -> None:
    assert [lora_rank_slot(r) for r in (1, 2, 8, 9, 16, 17, 300, 512)] == [1, 8, 8, 16, 16, 32, 320, 512]
    for r in (0, 513):
        with pytest.raises(CapEvalInputError, match=f"LoRA rank {r} is outside what vLLM serves"):
            lora_rank_slot(r)
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text(json.dumps({"r": 16, "rank_pattern": {"q_proj": 24}}))
    assert adapter_rank(adapter) == 24 and lora_rank_slot(adapter_rank(adapter)) == 32
    (adapter / "adapter_config.json").write_text(json.dumps({"r": 8}))
    assert adapter_rank(adapter) == 8
    assert resolve_adapter("/models/llama", str(adapter)) == adapter
    assert resolve_adapter(None, None) is None
    assert resolve_adapter("/models/llama", "default") is None, "the shipped adapter is for the default model only"
    assert resolve_adapter(None, "default") == default_adapter_path()
    for call in (lambda: resolve_adapter(None, str(tmp_path / "nope")), lambda: adapter_rank(tmp_path)):
        with pytest.raises(ModelNotInstalledError, match=r"is not a folder holding adapter_config\.json"):
            call()


# -- continuation planning and seeds ---------------------------------------------------------------


def test_chunk_max_tokens_plans_checkpoints() -> None:
    cases = [
        # generated, max_new_tokens, until -> max_tokens of the next request
        ((0, 256, None), 256),
        ((0, 256, 64), 64),
        ((64, 256, 128), 64),
        ((64, 256, None), 192),
        ((60, 62, 64), 2),  # never past max_new_tokens
        ((10, 256, 10), 0),  # already at the checkpoint: no request
    ]
    for args, expected in cases:
        assert chunk_max_tokens(*args) == expected, args
    # checkpoints 32, 64 then the end add up to max_new_tokens, whatever the chunking
    done = 0
    for until in (32, 64, None):
        done += chunk_max_tokens(done, 200, until)
    assert done == 200


def test_chunk_seeds_are_deterministic_and_distinct() -> None:
    assert chunk_seed(12345, 0) == 12345, "an uninterrupted row is vLLM's plain seeded sample"
    seeds = {chunk_seed(s, t) for s in range(8) for t in range(1, 65)}
    assert len(seeds) == 8 * 64, "every (seed, start) gets its own stream"
    assert all(0 <= x < 2**31 for x in seeds)
    assert chunk_seed(3, 17) == chunk_seed(3, 17)
    code = "from langchain_capeval.engines.vllm import chunk_seed; print(chunk_seed(3, 17))"
    other = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert int(other.stdout) == chunk_seed(3, 17), "no per-process hash randomisation"


# -- finishing rows: the transformers engine's semantics ------------------------------------------


def _replay(chat_format: ChatFormat, tokens: list[int], params: SamplingParams, chunks: Sequence[int]) -> Any:
    """Feed ``tokens`` to :func:`apply_new_tokens` in chunks, as continuation requests would deliver them."""
    ids: list[int] = []
    update = None
    pos = 0
    for size in [*chunks, len(tokens)]:
        piece = tokens[pos : pos + size]
        pos += len(piece)
        update = apply_new_tokens(
            ids,
            piece,
            eos_token_ids=chat_format.eos_token_ids,
            max_new_tokens=params.max_new_tokens,
            stop=params.stop,
            decode=chat_format.decode,
        )
        ids = update.token_ids
        if update.finish_reason is not None:
            break
    return update


def test_apply_new_tokens_finishes_rows_like_the_transformers_engine(
    engine: TransformersEngine, chat_format: ChatFormat
) -> None:
    """Stop strings, EOS and length, fed in continuation-sized chunks, end rows where the transformers engine does."""
    story = encode(chat_format, STORY)
    stops = [(" ",), ("dragon", "Zorath"), ("nce",)]
    control, *stopped = run(
        engine,
        story,
        [SamplingParams(temperature=0.0, max_new_tokens=24)]
        + [SamplingParams(temperature=0.0, max_new_tokens=24, stop=s) for s in stops],
    )
    eos = run(engine, encode(chat_format, MATH), [SamplingParams(temperature=0.0, max_new_tokens=30)])[0]
    assert eos.finish_reason == "eos"
    cases = [(control, SamplingParams(temperature=0.0, max_new_tokens=24), control.token_ids)]
    cases += [
        (s, SamplingParams(temperature=0.0, max_new_tokens=24, stop=stop), control.token_ids)
        for s, stop in zip(stopped, stops, strict=True)
    ]
    cases.append((eos, SamplingParams(temperature=0.0, max_new_tokens=30), [*eos.token_ids, 11, 12]))
    for expected, params, stream in cases:
        for chunks in ((), (1,), (2, 3), (5, 1, 1)):
            update = _replay(chat_format, list(stream), params, chunks)
            assert update.token_ids == expected.token_ids, (params.stop, chunks)
            assert update.finish_reason == expected.finish_reason, (params.stop, chunks)
            text = chat_format.decode(update.token_ids)
            if update.stop_at is not None:
                text = text[: update.stop_at]
            assert text == expected.text, (params.stop, chunks)
    assert control.finish_reason == "length" and {s.finish_reason for s in stopped} == {"stop"}


def test_apply_new_tokens_drops_what_comes_after_the_end() -> None:
    def decode(ids: Sequence[int]) -> str:
        return "".join(chr(96 + i) for i in ids if i)  # 1 -> "a"; 0 is the end token

    u = apply_new_tokens([1, 2], [3, 0, 4, 5], eos_token_ids={0}, max_new_tokens=10, stop=(), decode=decode)
    assert (u.token_ids, u.accepted, u.finish_reason, u.stop_at) == ([1, 2, 3, 0], 2, "eos", None)
    u = apply_new_tokens([], [1, 2, 3, 4], eos_token_ids={0}, max_new_tokens=3, stop=(), decode=decode)
    assert (u.token_ids, u.accepted, u.finish_reason) == ([1, 2, 3], 3, "length")
    u = apply_new_tokens([1], [2], eos_token_ids={0}, max_new_tokens=10, stop=("ab",), decode=decode)
    assert (u.finish_reason, u.stop_at) == ("stop", 0), "a stop string across the chunk boundary is found"
    u = apply_new_tokens([1], [2, 3], eos_token_ids={0}, max_new_tokens=10, stop=("zz",), decode=decode)
    assert (u.token_ids, u.accepted, u.finish_reason) == ([1, 2, 3], 2, None)
    assert find_stop("abcabc", ("ca", "bc")) == 1 and find_stop("abc", ()) is None


def test_finish_from_vllm() -> None:
    assert finish_from_vllm("length", None, [4, 5]) == (None, None), "the chunk reached its checkpoint"
    assert finish_from_vllm("abort", None, [4]) == (None, None)
    assert finish_from_vllm(None, None, [4]) == (None, None)
    assert finish_from_vllm("stop", None, [4, 2]) == ("eos", None), "one of the model's own end tokens"
    assert finish_from_vllm("stop", 2, [4, 2]) == ("eos", None), "a stop token already in the tokens"
    assert finish_from_vllm("stop", 2, [4]) == ("eos", 2), "a stop token vLLM left out is appended"
    assert finish_from_vllm("stop", 2, []) == ("eos", 2)
    assert finish_from_vllm("stop", "###", [4]) == ("stop", None)


# -- self-evaluation -------------------------------------------------------------------------------


def test_self_evaluation_prompt_scores_like_the_transformers_engine(
    engine: TransformersEngine, chat_format: ChatFormat
) -> None:
    """A from-scratch forward of :func:`self_evaluation_prompt` gives the transformers engine's P(No), P(Yes)."""
    prompt = encode(chat_format, MATH)
    rows = engine.submit(
        prompt,
        [
            SamplingParams(temperature=0.0, max_new_tokens=30),
            SamplingParams(temperature=0.9, max_new_tokens=30, seed=4),
        ],
    )
    engine.generate(rows[:1])  # finished with its end-of-turn token
    engine.generate(rows[1:], until=3)  # paused
    before = [engine.sample(r) for r in rows]
    evals = engine.self_evaluate(rows)
    after = [engine.sample(r) for r in rows]
    engine.close_request(before[0].request_id)
    assert before[0].finish_reason == "eos" and not before[1].finished
    no_id, yes_id = chat_format.answer_token_ids
    for s, s2, ev in zip(before, after, evals, strict=True):
        ids = self_evaluation_prompt(prompt, s.token_ids, chat_format)
        assert ids[: len(prompt) + s.num_tokens] == prompt + s.token_ids
        probs = scratch_probs(engine, ids)
        assert ev.p_no == pytest.approx(float(probs[no_id]), abs=1e-4)
        assert ev.p_yes == pytest.approx(float(probs[yes_id]), abs=1e-4)
        assert self_evaluation_cost(s.token_ids, chat_format) == s2.usage.self_eval_tokens - s.usage.self_eval_tokens
    end = chat_format.self_evaluation_suffix[0]
    finished = self_evaluation_prompt(prompt, before[0].token_ids, chat_format)
    assert finished.count(end) == prompt.count(end) + 2, "the response's own end token is not doubled"
    assert self_evaluation_cost([], chat_format) == len(chat_format.self_evaluation_suffix)


def test_read_answer_logprobs() -> None:
    no, yes = 17, 42
    exact = {no: Logprob(-0.5, 1), yes: Logprob(-1.5, 2), 3: Logprob(-0.1, 0)}  # the sampled token comes too
    assert read_answer_logprobs(exact, no, yes, exact=True) == (math.exp(-0.5), math.exp(-1.5))
    assert read_answer_logprobs({no: -0.5, yes: -1.5}, no, yes, exact=True) == (math.exp(-0.5), math.exp(-1.5))
    assert read_answer_logprobs({no: Logprob(-math.inf), yes: Logprob(0.0)}, no, yes, exact=True) == (0.0, 1.0)
    assert read_answer_logprobs({no: Logprob(-0.2)}, no, yes, exact=False) == (math.exp(-0.2), 0.0)
    assert read_answer_logprobs({5: Logprob(-0.2)}, no, yes, exact=False) == (0.0, 0.0)
    with pytest.raises(UnsupportedFeatureError, match=f"no logprob for answer token {yes}.*self_eval_logprobs='top_k'"):
        read_answer_logprobs({no: Logprob(-0.2)}, no, yes, exact=True)
    empty: dict[int, Logprob] | None
    for empty in (None, {}):
        with pytest.raises(UnsupportedFeatureError, match="no logprobs for the self-evaluation token"):
            read_answer_logprobs(empty, no, yes, exact=False)


def test_request_settings() -> None:
    params = SamplingParams(temperature=0.6, top_p=0.9, max_new_tokens=100, stop=("\n\n",), seed=9)
    kw = generation_sampling_kwargs(params, seed=chunk_seed(9, 32), max_tokens=32, eos_token_ids=frozenset({7, 3}))
    assert kw == {
        "n": 1,
        "temperature": 0.6,
        "top_p": 0.9,
        "seed": chunk_seed(9, 32),
        "max_tokens": 32,
        "stop_token_ids": [3, 7],
        "detokenize": False,
    }, "stop strings are matched by the engine over the whole row, not by vLLM per request"
    by_id = self_evaluation_sampling_kwargs(17, 42, use_token_ids=True, top_logprobs=20)
    top_k = self_evaluation_sampling_kwargs(17, 42, use_token_ids=False, top_logprobs=20)
    for kw in (by_id, top_k):
        assert (kw["n"], kw["max_tokens"], kw["temperature"]) == (1, 1, 0.0)
        assert "prompt_logprobs" not in kw, "prompt_logprobs would bypass the prefix cache"
    assert by_id["logprob_token_ids"] == [17, 42] and by_id["logprobs"] == 2
    assert top_k["logprobs"] == 20 and "logprob_token_ids" not in top_k
    if HAS_VLLM:  # the real SamplingParams accepts them
        import vllm

        vllm.SamplingParams(**generation_sampling_kwargs(params, seed=1, max_tokens=4, eos_token_ids=frozenset({2})))
        vllm.SamplingParams(**top_k)
        if supports_logprob_token_ids(vllm.SamplingParams):
            vllm.SamplingParams(**by_id)


def test_supports_logprob_token_ids_reads_the_class() -> None:
    class StructWith:
        __struct_fields__ = ("n", "logprobs", "logprob_token_ids")

    class StructWithout:
        __struct_fields__ = ("n", "logprobs", "prompt_logprobs")

    class Plain:
        def __init__(self, logprobs: int | None = None, logprob_token_ids: list[int] | None = None) -> None:
            pass

    assert supports_logprob_token_ids(StructWith) and supports_logprob_token_ids(Plain)
    assert not supports_logprob_token_ids(StructWithout) and not supports_logprob_token_ids(int)


# == where vLLM runs: the engine on a GPU ==========================================================


def _needs_vllm_and_gpu() -> None:
    pytest.importorskip("vllm", reason=VLLM_SKIP)
    if not torch.cuda.is_available():
        pytest.skip("vLLM is installed but no CUDA GPU is visible")


def _free_gpu() -> None:
    try:
        from vllm.distributed.parallel_state import cleanup_dist_env_and_memory
    except ImportError:  # pragma: no cover - older or newer vLLM layouts
        pass
    else:
        cleanup_dist_env_and_memory()
    gc.collect()
    torch.cuda.empty_cache()


def _vllm_config(**kw: Any) -> VLLMEngineConfig:
    base: dict[str, Any] = {
        "adapter": None,
        "dtype": TEST_DTYPE,
        "gpu_memory_utilization": 0.3,
        "max_model_len": 2048,
        "enforce_eager": True,
        "multiprocessing": False,  # in-process engine core: deterministic scheduling
    }
    return VLLMEngineConfig(**{**base, **kw})


@pytest.fixture(scope="class")
def vllm_engine() -> Iterator[VLLMEngine]:
    """The vLLM engine on the embedded SmolLM2-135M-Instruct (base weights), in-process, on the GPU."""
    _needs_vllm_and_gpu()
    engine = VLLMEngine.from_config(_vllm_config())
    yield engine
    engine.close()
    _free_gpu()


class TestRealVLLM:
    """The transformers engine's tests (``tests/test_engine.py``), on vLLM."""

    TOL = 1e-3

    def test_loads_the_converted_default_model(self, vllm_engine: VLLMEngine, engine: TransformersEngine) -> None:
        from langchain_capeval.models import resolve_model_path

        assert isinstance(vllm_engine, Engine)
        assert vllm_engine.model_path == str(resolve_model_path(None)[0])
        assert vllm_engine.model_name == "SmolLM2-135M-Instruct" and vllm_engine.lora_request is None
        assert vllm_engine.chat_format.self_evaluation_suffix == engine.chat_format.self_evaluation_suffix
        assert vllm_engine.chat_format.answer_token_ids == engine.chat_format.answer_token_ids
        assert vllm_engine.context_length == 2048

    def test_self_evaluate_matches_from_scratch_forward(
        self, vllm_engine: VLLMEngine, engine: TransformersEngine, chat_format: ChatFormat
    ) -> None:
        """P("No"), P("Yes") on the prefix cache == a from-scratch transformers forward, finished or paused."""
        prompts = {k: encode(chat_format, t) for k, t in (("math", MATH), ("story", STORY), ("colors", COLORS))}
        e = vllm_engine
        a = e.submit(
            prompts["math"],
            [SamplingParams(temperature=0.0, max_new_tokens=30)]
            + [SamplingParams(temperature=0.7, max_new_tokens=20, seed=s) for s in range(2)],
        )
        b = e.submit(
            prompts["story"], [SamplingParams(temperature=0.8, top_p=0.95, max_new_tokens=40, seed=s) for s in (0, 1)]
        )
        c = e.submit(
            prompts["colors"],
            [
                SamplingParams(temperature=0.0, max_new_tokens=6),
                SamplingParams(temperature=0.7, max_new_tokens=16, seed=3),
            ],
        )
        e.generate(a + c)  # two requests in the same vLLM batches
        e.generate(b, until=9)  # paused mid-generation
        rows = [b[0], a[0], c[0], a[1], b[1], a[2], c[1]]
        prompt_of = {r: prompts[k] for k, rs in (("math", a), ("story", b), ("colors", c)) for r in rs}
        samples = {r: e.sample(r) for r in rows}
        reasons = [samples[r].finish_reason for r in rows]
        assert {"eos", "length", None} <= set(reasons), reasons
        assert samples[b[0]].num_tokens == 9 and not samples[b[0]].finished
        assert e.requests_in_flight == 0

        evals = e.self_evaluate(rows)
        no_id, yes_id = chat_format.answer_token_ids
        for r, ev in zip(rows, evals, strict=True):
            tokens = samples[r].token_ids
            probs = scratch_probs(engine, self_evaluation_prompt(prompt_of[r], tokens, chat_format))
            p_no, p_yes = float(probs[no_id]), float(probs[yes_id])
            assert ev.row == r and ev.num_tokens == len(tokens)
            assert ev.p_no == pytest.approx(p_no, abs=self.TOL), (samples[r].finish_reason, ev)
            assert ev.p_yes == pytest.approx(p_yes, abs=self.TOL), (samples[r].finish_reason, ev)
            assert ev.p_win_or_tie == pytest.approx(p_no / (p_no + p_yes), abs=self.TOL)

        again = e.self_evaluate(list(reversed(rows)))  # nothing changed: same answers, any order
        for ev, ev2 in zip(evals, reversed(again), strict=True):
            assert ev2.row == ev.row and ev2.p_no == pytest.approx(ev.p_no, abs=self.TOL)
        for r in rows:
            assert e.sample(r).token_ids == samples[r].token_ids
        stats = e.prefix_cache_stats(samples[b[0]].request_id)
        assert stats.self_eval_cached_tokens > 0, "self-evaluation must hit the prefix cache of the response"
        assert stats.self_eval_computed_tokens < stats.self_eval_prompt_tokens
        for rs in (a, b, c):
            e.close_request(e.sample(rs[0]).request_id)

    def test_pause_self_evaluate_resume_matches_an_uninterrupted_run(
        self, vllm_engine: VLLMEngine, chat_format: ChatFormat
    ) -> None:
        """Self-evaluations at the checkpoints change nothing; greedy rows equal a straight run."""
        e = vllm_engine
        prompt = encode(chat_format, STORY)
        params = [
            SamplingParams(temperature=0.9, top_p=0.9, max_new_tokens=28, seed=11),
            SamplingParams(temperature=1.0, top_p=1.0, max_new_tokens=28, seed=12),
            SamplingParams(temperature=0.6, top_p=0.8, max_new_tokens=28, seed=13),
            SamplingParams(temperature=0.0, max_new_tokens=28),
        ]
        straight = run(e, prompt, params)

        def checkpointed(evaluate: bool) -> list[Sample]:
            rows = e.submit(prompt, params)
            paused = e.generate(rows, until=10)
            assert [s.num_tokens for s in paused] == [10] * 4 and not any(s.finished for s in paused)
            if evaluate:
                e.self_evaluate(rows)
            e.generate(rows, until=18)
            if evaluate:
                first, second = e.self_evaluate(rows), e.self_evaluate(rows)
                assert [x.p_no for x in first] == pytest.approx([x.p_no for x in second], abs=1e-3)
            out = e.generate(rows)
            e.close_request(out[0].request_id)
            return out

        plain, evaluated = checkpointed(False), checkpointed(True)
        assert [s.token_ids for s in evaluated] == [s.token_ids for s in plain]
        assert [s.finish_reason for s in evaluated] == [s.finish_reason for s in plain]
        assert [s.text for s in evaluated] == [s.text for s in plain]
        for s, full in zip(evaluated, straight, strict=True):
            assert s.token_ids[:10] == full.token_ids[:10], "the first chunk is the row's plain seeded sample"
        assert evaluated[3].token_ids == straight[3].token_ids, "a greedy row does not depend on its checkpoints"
        assert len({tuple(s.token_ids) for s in straight}) == 4, "different seeds should give different samples"

    def test_release_leaves_survivors_unchanged(self, vllm_engine: VLLMEngine, chat_format: ChatFormat) -> None:
        e = vllm_engine
        prompt = encode(chat_format, STORY)
        params = [SamplingParams(temperature=0.8, top_p=0.95, max_new_tokens=28, seed=s) for s in range(20, 24)]
        rows = e.submit(prompt, params)
        e.generate(rows, until=8)
        reference = e.generate(rows)
        e.close_request(reference[0].request_id)

        base = e.live_rows
        rows = e.submit(prompt, params)
        assert e.live_rows == base + 4
        early = e.generate(rows, until=8)
        for s, full in zip(early, reference, strict=True):
            assert s.token_ids == full.token_ids[:8]
        e.release([rows[1], rows[3]])
        assert e.live_rows == base + 2
        for gone in (rows[1], rows[3]):
            with pytest.raises(UnknownRowError, match=f"row {gone} is not live"):
                e.sample(gone)
            with pytest.raises(UnknownRowError):
                e.generate([rows[0], gone])
            with pytest.raises(UnknownRowError):
                e.self_evaluate([gone])
        survivors = e.generate([rows[0], rows[2]])
        assert [s.token_ids for s in survivors] == [reference[0].token_ids, reference[2].token_ids]
        e.close_request(survivors[0].request_id)
        assert e.live_rows == base and e.requests_in_flight == 0

    def test_usage_adds_up(self, vllm_engine: VLLMEngine, chat_format: ChatFormat) -> None:
        e = vllm_engine
        prompt = encode(chat_format, COLORS)
        req = "vllm-usage-test"
        params = [SamplingParams(temperature=0.7, max_new_tokens=12, seed=s) for s in (1, 2)]
        rows = e.submit(prompt, params, request_id=req)
        assert all(e.sample(r).num_tokens == 0 for r in rows), "rows start empty; generate adds their requests"
        expected_eval = 0
        e.generate(rows, until=6)
        expected_eval += sum(self_evaluation_cost(e.sample(r).token_ids, chat_format) for r in rows)
        e.self_evaluate(rows)
        rows += e.submit(prompt, [SamplingParams(temperature=0.0, max_new_tokens=10)], request_id=req)
        assert e.usage(req).prompt_tokens == len(prompt), "the prompt is counted once per request"
        final = e.generate(rows)
        expected_eval += sum(self_evaluation_cost(s.token_ids, chat_format) for s in final)
        e.self_evaluate(rows)
        final = [e.sample(r) for r in rows]
        e.release(rows[:1])  # released rows still count

        usage = e.usage(req)
        assert usage.prompt_tokens == len(prompt)
        assert usage.generated_tokens == sum(s.num_tokens for s in final)
        assert usage.self_eval_tokens == expected_eval
        assert usage.wall_time_s > 0
        assert usage.total_tokens == usage.prompt_tokens + usage.generated_tokens + usage.self_eval_tokens
        assert sum(s.usage.generated_tokens for s in final) == usage.generated_tokens
        assert sum(s.usage.self_eval_tokens for s in final) == usage.self_eval_tokens
        assert all(s.usage.prompt_tokens == 0 and s.usage.wall_time_s > 0 for s in final)
        assert sum(s.usage.wall_time_s for s in final) <= usage.wall_time_s + 1e-9
        stats = e.prefix_cache_stats(req)
        assert stats.generation_cached_tokens > 0, "later rows and continuations reuse the cached prompt"
        assert e.close_request(req) == usage
        with pytest.raises(UnknownRowError, match="vllm-usage-test"):
            e.usage(req)

    def test_stop_strings_eos_and_length(self, vllm_engine: VLLMEngine, chat_format: ChatFormat) -> None:
        e = vllm_engine
        story = encode(chat_format, STORY)
        stops = [(" ",), ("dragon", "Zorath"), ("nce",)]
        control, *stopped = run(
            e,
            story,
            [SamplingParams(temperature=0.0, max_new_tokens=24)]
            + [SamplingParams(temperature=0.0, max_new_tokens=24, stop=s) for s in stops],
        )
        full = chat_format.decode(control.token_ids)
        for s, stop in zip(stopped, stops, strict=True):
            assert s.finish_reason == "stop", (stop, s)
            assert s.text == full[: min(full.index(x) for x in stop if x in full)]
            assert control.token_ids[: s.num_tokens] == s.token_ids and s.num_tokens < control.num_tokens
        # a stop string completed after a checkpoint is found across the requests of one row
        late = (full[len(chat_format.decode(control.token_ids[:8])) :][:4],)
        assert late[0], full
        rows = e.submit(story, [SamplingParams(temperature=0.0, max_new_tokens=24, stop=late)])
        for until in (2, 3, 5):
            e.generate(rows, until=until)
        chunked = e.generate(rows)[0]
        e.close_request(chunked.request_id)
        one_go = run(e, story, [SamplingParams(temperature=0.0, max_new_tokens=24, stop=late)])[0]
        assert (chunked.token_ids, chunked.text, chunked.finish_reason) == (
            one_go.token_ids,
            one_go.text,
            one_go.finish_reason,
        )

        eos = run(e, encode(chat_format, MATH), [SamplingParams(temperature=0.0, max_new_tokens=30)])[0]
        assert eos.finish_reason == "eos" and eos.token_ids[-1] in chat_format.eos_token_ids
        assert "5" in eos.text and "<|im_end|>" not in eos.text
        length = run(e, story, [SamplingParams(temperature=0.8, max_new_tokens=7, seed=1)])[0]
        assert length.finish_reason == "length" and length.num_tokens == 7

    def test_greedy_is_argmax_of_a_fresh_forward(
        self, vllm_engine: VLLMEngine, engine: TransformersEngine, chat_format: ChatFormat
    ) -> None:
        prompt = encode(chat_format, COLORS)
        sample = run(vllm_engine, prompt, [SamplingParams(temperature=0.0, max_new_tokens=6, seed=123)])[0]
        for k, token in enumerate(sample.token_ids):
            assert token == int(scratch_probs(engine, prompt + sample.token_ids[:k]).argmax()), k

    def test_deadline_cancel_and_bad_input(self, vllm_engine: VLLMEngine, chat_format: ChatFormat) -> None:
        e = vllm_engine
        prompt = encode(chat_format, STORY)
        rows = e.submit(prompt, [SamplingParams(temperature=0.8, max_new_tokens=200, seed=s) for s in (1, 2)])
        cut = e.generate(rows, deadline=time.monotonic())  # stops after one engine step
        assert not any(s.finished for s in cut) and e.requests_in_flight == 0
        done = e.generate(rows)  # resumes from the tokens it kept
        assert all(s.finished for s in done)
        assert all(d.token_ids[: c.num_tokens] == c.token_ids for c, d in zip(cut, done, strict=True))
        e.close_request(done[0].request_id)

        req = "vllm-cancel-test"
        rows = e.submit(prompt, [SamplingParams(temperature=0.8, max_new_tokens=1500, seed=3)], request_id=req)
        errors: list[BaseException] = []

        def generate() -> None:
            try:
                e.generate(rows)
            except BaseException as exc:  # handed to the test thread
                errors.append(exc)

        worker = threading.Thread(target=generate)
        worker.start()
        while e.requests_in_flight == 0 and worker.is_alive():  # cancel while its request runs
            time.sleep(0.001)
        e.cancel(req)
        worker.join(timeout=120)
        assert not worker.is_alive() and len(errors) == 1 and isinstance(errors[0], RequestCancelledError), errors
        assert e.requests_in_flight == 0
        with pytest.raises(RequestCancelledError, match=req):
            e.submit(prompt, [SamplingParams()], request_id=req)
        e.cancel("never-started")  # allowed

        with pytest.raises(CapEvalInputError, match="token ids must be in"):
            e.submit([1, 10**9], [SamplingParams()])
        too_long = [1] * (e.context_length - 10)
        with pytest.raises(CapEvalInputError, match=f"prompt of {len(too_long)} tokens"):
            e.submit(too_long, [SamplingParams(max_new_tokens=64)])

    def test_closed_engine_refuses_work(self, vllm_engine: VLLMEngine, chat_format: ChatFormat) -> None:
        """Last in the class: closing the shared engine (the fixture's close is then a no-op)."""
        e = vllm_engine
        rows = e.submit(encode(chat_format, MATH), [SamplingParams(max_new_tokens=4)])
        e.close()
        assert e.requests_in_flight == 0
        for call in (
            lambda: e.submit(encode(chat_format, MATH), [SamplingParams()]),
            lambda: e.generate(rows),
            lambda: e.self_evaluate(rows),
        ):
            with pytest.raises(EngineClosedError, match="closed"):
                call()


@pytest.fixture(scope="class")
def vllm_adapter_engine() -> Iterator[VLLMEngine]:
    """The vLLM engine with the shipped self-evaluation adapter as a LoRARequest."""
    _needs_vllm_and_gpu()
    if default_adapter_path() is None:
        pytest.skip("no self-evaluation adapter ships in langchain_capeval/data/adapters/ yet")
    engine = VLLMEngine.from_config(_vllm_config(adapter="default", dtype="auto"))
    yield engine
    engine.close()
    _free_gpu()


class TestRealVLLMAdapter:
    """The shipped adapter served through vLLM's LoRA, for generation and self-evaluation alike."""

    def test_adapter_loads_as_a_lora_request(self, vllm_adapter_engine: VLLMEngine, chat_format: ChatFormat) -> None:
        from langchain_capeval.engines.transformers import TransformersEngineConfig

        e = vllm_adapter_engine
        shipped = default_adapter_path()
        assert shipped is not None and e.lora_request is not None
        assert e.model_name.endswith("+selfeval") and e.lora_request.lora_path == str(shipped)
        prompt = encode(chat_format, MATH)
        rows = e.submit(prompt, [SamplingParams(temperature=0.0, max_new_tokens=30)])
        sample = e.generate(rows)[0]
        ev = e.self_evaluate(rows)[0]
        stats = e.prefix_cache_stats(sample.request_id)
        e.close_request(sample.request_id)
        assert stats.self_eval_cached_tokens > 0, "the same adapter for generation and self-evaluation shares the cache"

        merged = TransformersEngine.from_config(TransformersEngineConfig(adapter="default"))
        try:
            probs = scratch_probs(merged, self_evaluation_prompt(prompt, sample.token_ids, chat_format))
        finally:
            merged.close()
        no_id, yes_id = chat_format.answer_token_ids
        assert ev.p_no == pytest.approx(float(probs[no_id]), abs=2e-2)  # vLLM runs the LoRA in half precision
        assert ev.p_yes == pytest.approx(float(probs[yes_id]), abs=2e-2)
