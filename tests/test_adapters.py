"""Adapter scopes: an adapter trained on the self-evaluation chunk only runs only there.

The shipped ``smollm2-135m-selfeval-partial-credit`` adapter is scoped to the self-evaluation
chunk (``capeval_adapter.json``). Through ``TransformersEngine.from_config`` it must leave
generation exactly the base model's, change what the self-evaluation says, and give the P("No")
of the merged weights run over a cache the *base* weights wrote (what it was trained on), not
over the merged model's own cache.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from langchain_capeval import ChatCapEval
from langchain_capeval.adapters import (
    DEFAULT_ADAPTER,
    PARTIAL_CREDIT_ADAPTER,
    SCOPE_FILE,
    adapter_policy,
    adapter_scope,
    default_adapter_path,
    policy_for_adapter,
    resolve_adapter,
    shipped_adapter_path,
    write_adapter_scope,
)
from langchain_capeval.config import CapEvalConfig
from langchain_capeval.engines.decoding import answer_probabilities, win_or_tie_probability
from langchain_capeval.engines.kv_batch import cache_keyword, output_cache
from langchain_capeval.engines.transformers import TransformersEngine, TransformersEngineConfig
from langchain_capeval.engines.vllm import VLLMEngine, VLLMEngineConfig
from langchain_capeval.errors import CapEvalInputError, ModelNotInstalledError, UnsupportedFeatureError
from langchain_capeval.models import load_model
from langchain_capeval.sampling import SamplingParams

QUESTIONS = ("What is the capital of Peru?", "What is 6 + 3?", 'What is the opposite of "hot"?')


def test_scope_is_read_from_the_folder_and_bad_files_are_named(tmp_path: Path) -> None:
    default, partial = default_adapter_path(), shipped_adapter_path(PARTIAL_CREDIT_ADAPTER)
    assert default is not None and default.name == DEFAULT_ADAPTER and partial is not None
    assert adapter_scope(default) == "every_token", "the default adapter serves generation too"
    assert adapter_scope(partial) == "self_evaluation"
    cfg = json.loads((partial / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "LORA" and not cfg.get("modules_to_save")  # still a plain PEFT LoRA
    assert (partial / "adapter_model.safetensors").stat().st_size < 25 * 2**20

    mine = tmp_path / "mine"
    shutil.copytree(default, mine)
    write_adapter_scope(mine, "self_evaluation")
    assert adapter_scope(mine) == "self_evaluation"
    write_adapter_scope(mine, "every_token")
    assert not (mine / SCOPE_FILE).exists() and adapter_scope(mine) == "every_token"
    for text, problem in (("not json", "JSON object"), ('["x"]', "JSON object"), ('{"scope": "prompt"}', "'prompt'")):
        (mine / SCOPE_FILE).write_text(text)
        with pytest.raises(CapEvalInputError, match=problem) as info:
            adapter_scope(mine)
        assert SCOPE_FILE in str(info.value)
    with pytest.raises(ModelNotInstalledError, match=r"adapter_config\.json"):
        adapter_scope(tmp_path)


def test_shipped_adapters_resolve_by_name_for_the_default_model_only(tmp_path: Path, monkeypatch) -> None:
    partial = shipped_adapter_path(PARTIAL_CREDIT_ADAPTER)
    assert resolve_adapter(None, PARTIAL_CREDIT_ADAPTER) == partial
    assert resolve_adapter(None, DEFAULT_ADAPTER) == default_adapter_path()
    assert shipped_adapter_path("../adapters/" + DEFAULT_ADAPTER) is None
    with pytest.raises(CapEvalInputError, match="shipped for the embedded default"):
        resolve_adapter("/models/llama", PARTIAL_CREDIT_ADAPTER)
    # A local folder of the same name wins over the shipped one.
    local = tmp_path / PARTIAL_CREDIT_ADAPTER
    shutil.copytree(default_adapter_path(), local)
    monkeypatch.chdir(tmp_path)
    assert resolve_adapter("/models/llama", PARTIAL_CREDIT_ADAPTER) == Path(PARTIAL_CREDIT_ADAPTER)


def test_vllm_refuses_a_self_evaluation_scoped_adapter() -> None:
    """Checked before vLLM is imported, so the refusal is the same with or without a GPU."""
    with pytest.raises(UnsupportedFeatureError, match="self-evaluation chunk") as info:
        VLLMEngine.from_config(VLLMEngineConfig(adapter=PARTIAL_CREDIT_ADAPTER))
    assert PARTIAL_CREDIT_ADAPTER in str(info.value) and "transformers engine" in str(info.value)


def _samples_and_scores(engine: TransformersEngine) -> tuple[list[list[int]], list[float]]:
    tokens, scores = [], []
    for i, q in enumerate(QUESTIONS):
        prompt = engine.chat_format.encode([{"role": "user", "content": q}])
        rows = engine.submit(prompt, [SamplingParams(temperature=0.8, seed=10 + i, max_new_tokens=24)])
        engine.generate(rows, until=6)
        scores.append(engine.self_evaluate(rows)[0].p_win_or_tie)  # mid-generation, then on to the end
        sample = engine.generate(rows)[0]
        scores.append(engine.self_evaluate(rows)[0].p_win_or_tie)
        tokens.append(sample.token_ids)
        engine.close_request(sample.request_id)
    return tokens, scores


def test_self_evaluation_scoped_adapter_leaves_generation_the_base_models(engine: TransformersEngine) -> None:
    """Through ``ChatCapEval(adapter=<shipped name>)``: it answers, and its engine decodes as the base engine does."""
    llm = ChatCapEval(adapter=PARTIAL_CREDIT_ADAPTER, max_samples=2, max_new_tokens=24, seed=0)
    msg = llm.invoke("What is the capital of France?")
    assert msg.content and msg.response_metadata["samples"]
    chunk = llm.engine
    assert isinstance(chunk, TransformersEngine) and chunk.model_name.endswith("+selfeval")
    lora = chunk.selfeval_lora
    assert lora is not None and len(lora.updates) == 30 * 7  # every projection of every layer
    assert lora.model is chunk.model and lora.nbytes < 25 * 2**20  # the adapter's tensors, no second model

    base_tokens, base_scores = _samples_and_scores(engine)
    tokens, scores = _samples_and_scores(chunk)
    assert tokens == base_tokens, "generation must be the base model's, token for token"
    assert max(abs(a - b) for a, b in zip(scores, base_scores, strict=True)) > 0.05, (scores, base_scores)

    # The P(win or tie) is the merge's over the base model's cache, not over the merge's own cache.
    fmt = chunk.chat_format
    prompt = fmt.encode([{"role": "user", "content": QUESTIONS[0]}])
    response = base_tokens[0]
    trunk, pending = prompt + response[:-1], [response[-1], *fmt.suffix_after(response)]
    base = load_model(None).model
    merged = load_model(None, adapter=shipped_adapter_path(PARTIAL_CREDIT_ADAPTER), cache_merged=True).model
    no_id, yes_id = fmt.answer_token_ids
    with torch.inference_mode():
        base_cache = output_cache(base(torch.tensor([trunk]), use_cache=True))
        over_base = merged(torch.tensor([pending]), **{cache_keyword(merged): base_cache}).logits
        own = merged(torch.tensor([trunk + pending])).logits
    want = win_or_tie_probability(*(float(p[0]) for p in answer_probabilities(over_base[:, -1], no_id, yes_id)))
    other = win_or_tie_probability(*(float(p[0]) for p in answer_probabilities(own[:, -1], no_id, yes_id)))
    assert abs(want - other) > 0.01, "the test needs the two caches to give different answers"
    assert scores[1] == pytest.approx(want, abs=2e-3)
    assert abs(scores[1] - other) > abs(scores[1] - want)


def test_eval_selfeval_runs_a_scoped_adapter_as_the_engine_does(tmp_path: Path) -> None:
    """``capeval eval-selfeval --adapter <shipped name>``: the adapted model's samples are the base model's."""
    from langchain_capeval.training.config import SelfEvalEvalConfig
    from langchain_capeval.training.evaluate import (
        collect_self_evaluations,
        evaluate_self_evaluation,
        evaluation_tasks,
        render_table,
    )

    cfg = SelfEvalEvalConfig(
        adapter=PARTIAL_CREDIT_ADAPTER,
        output_dir=str(tmp_path),
        families=("add1",),
        heldout_family="colors",
        heldout_splits=("test",),
        max_prompts_per_family=1,
        num_samples=2,
        max_new_tokens=12,
        checkpoints=(4,),
        prompts_per_batch=2,
    )
    report = evaluate_self_evaluation(cfg, progress=False)
    assert report["adapter"] == str(shipped_adapter_path(PARTIAL_CREDIT_ADAPTER))
    rows = [json.loads(line) for line in (tmp_path / "selfeval_samples.jsonl").read_text().splitlines()]
    by_model = {m: [r for r in rows if r["model"] == m] for m in ("base", "adapted")}
    assert len(by_model["base"]) == len(by_model["adapted"]) == 4
    same = [(r["task_id"], r["num_tokens"], r["correct"], r["right_at"]) for r in by_model["base"]]
    assert same == [(r["task_id"], r["num_tokens"], r["correct"], r["right_at"]) for r in by_model["adapted"]]
    assert all(set(r["right_at"]) == set(r["p_at"]) for r in rows), "a checker verdict at every pause"
    assert any(r["right_at"] for r in rows)
    pairs = zip(by_model["base"], by_model["adapted"], strict=True)
    assert any(abs(a["p_full"] - b["p_full"]) > 0.05 for a, b in pairs), "the adapter self-evaluates"
    # Generation is the base model's: pass@1 is unchanged on the trained and on the held-out family alike.
    assert set(report["pass_at_1_adapted_minus_base"]) == {"trained", "all", "heldout"}
    assert all(d["difference"] == 0.0 for d in report["pass_at_1_adapted_minus_base"].values())
    assert "pass@1 adapted - base (held-out family): +0.0000" in render_table(report)
    # One decoding pass scored both; the base model's scores are those of a pass of its own.
    assert set(report["seconds"]) == {"base+adapted"}
    plain = TransformersEngineConfig(
        adapter=None, cache_merged=False, pack_output_projection=False, pack_linear_layers=False, prefix_caching=False
    )
    base = TransformersEngine.from_config(plain)
    trained, heldout = evaluation_tasks(cfg)
    alone = collect_self_evaluations(base, trained + heldout, cfg, progress=False)
    base.close()
    assert [(s.task_id, s.num_tokens) for s in alone] == [(r["task_id"], r["num_tokens"]) for r in by_model["base"]]
    assert [s.p_full for s in alone] == pytest.approx([r["p_full"] for r in by_model["base"]], abs=1e-5)
    assert [s.p_at for s in alone] == [
        {k: pytest.approx(v, abs=1e-5) for k, v in r["p_at"].items()} for r in by_model["base"]
    ]


def test_an_adapters_measured_policy_is_the_starting_point_and_callers_win(tmp_path: Path, engine) -> None:
    """``capeval_adapter.json``'s ``"policy"``: read, validated, applied under what the caller sets."""
    partial = shipped_adapter_path(PARTIAL_CREDIT_ADAPTER)
    assert adapter_policy(partial) == {"accept_threshold": 0.7}
    assert adapter_policy(default_adapter_path()) == {"accept_threshold": 0.7}
    assert CapEvalConfig().accept_threshold == 0.8

    assert ChatCapEval(adapter=PARTIAL_CREDIT_ADAPTER).policy.accept_threshold == 0.7
    assert ChatCapEval().policy.accept_threshold == 0.7  # the default adapter's
    assert ChatCapEval(adapter=None).policy.accept_threshold == 0.8  # the base model: the config's default
    assert ChatCapEval(adapter=PARTIAL_CREDIT_ADAPTER, accept_threshold=0.9).policy.accept_threshold == 0.9
    given = ChatCapEval(adapter=PARTIAL_CREDIT_ADAPTER, policy=CapEvalConfig(max_samples=3)).policy
    assert (given.accept_threshold, given.max_samples) == (0.7, 3)
    assert ChatCapEval(adapter=PARTIAL_CREDIT_ADAPTER, policy={"accept_threshold": 0.5}).policy.accept_threshold == 0.5
    assert ChatCapEval(engine=engine, adapter=PARTIAL_CREDIT_ADAPTER).policy.accept_threshold == 0.8  # no adapter read

    mine = tmp_path / "mine"
    shutil.copytree(default_adapter_path(), mine)
    write_adapter_scope(mine, "every_token", {"accept_threshold": 0.6, "max_samples": 4})
    assert adapter_scope(mine) == "every_token" and adapter_policy(mine) == {"accept_threshold": 0.6, "max_samples": 4}
    policy = policy_for_adapter(None, str(mine), {"max_samples": 2})
    assert (policy.accept_threshold, policy.max_samples) == (0.6, 2)
    assert policy_for_adapter(None, None, {}) == CapEvalConfig()
    for text, problem in (
        ('{"policy": [0.7]}', "must be an object"),
        ('{"policy": {"accept_threshold": 1.5}}', "accept_threshold"),
        ('{"policy": {"acept_threshold": 0.7}}', "acept_threshold"),
    ):
        (mine / SCOPE_FILE).write_text(text)
        with pytest.raises(CapEvalInputError, match=problem) as info:
            adapter_policy(mine)
        assert SCOPE_FILE in str(info.value)
    # A broken adapter folder does not fail construction: the engine reports it on first use, as before.
    assert ChatCapEval(adapter=str(tmp_path / "missing")).policy == CapEvalConfig()


def test_a_graph_run_context_sets_only_its_fields_over_the_graphs_policy(engine) -> None:
    """LangGraph Studio's per-run context: unset fields keep the graph's default (an adapter's measured fields)."""
    from langchain_capeval.graph import build_graph

    graph = build_graph(engine, CapEvalConfig(accept_threshold=1.0, max_samples=3, max_new_tokens=6))
    final = graph.invoke(
        {"messages": [{"role": "user", "content": "What is 2 + 2?"}]}, context=CapEvalConfig(seed=5, max_new_tokens=4)
    )
    assert (len(final["samples"]), final["stop_reason"]) == (3, "max_samples")  # threshold 1.0 and budget 3 kept
    assert all(s["num_tokens"] <= 4 for s in final["samples"])  # the context's own field applies
    assert engine.live_rows == 0


def test_self_evaluation_lora_adds_the_adapters_update_only_inside_active(tmp_path: Path) -> None:
    """The hooks compute the merged model's function, leave nothing behind, and refuse what they cannot run."""
    from langchain_capeval.adapters import apply_adapter
    from langchain_capeval.engines.lora import SelfEvaluationLoRA
    from langchain_capeval.errors import UnsupportedFeatureError

    partial = shipped_adapter_path(PARTIAL_CREDIT_ADAPTER)
    assert partial is not None
    base = load_model(None).model
    merged = apply_adapter(load_model(None).model, partial)
    lora = SelfEvaluationLoRA.load(base, partial)
    ids = torch.tensor([[1, 504, 3458, 282, 4649, 2, 30, 216]])
    with torch.inference_mode():
        before = base(ids).logits
        with lora.active():
            inside = base(ids).logits
        after = base(ids).logits
        want = merged(ids).logits
    assert torch.equal(before, after), "no hook outlives the block"
    assert (inside - want).abs().max() < 1e-3 < (before - want).abs().max()

    bad = tmp_path / "bad"
    for setting, error, problem in (
        ({"use_dora": True}, UnsupportedFeatureError, "use_dora"),
        ({"rank_pattern": {"q_proj": 4}}, UnsupportedFeatureError, "rank_pattern"),
        ({"bias": "all"}, UnsupportedFeatureError, "bias"),
        ({"r": 8}, CapEvalInputError, "another model"),
    ):
        shutil.rmtree(bad, ignore_errors=True)
        shutil.copytree(partial, bad)
        config = json.loads((bad / "adapter_config.json").read_text())
        (bad / "adapter_config.json").write_text(json.dumps(config | setting))
        with pytest.raises(error, match=problem):
            SelfEvaluationLoRA.load(base, bad)
    with pytest.raises(CapEvalInputError, match="does not have"):
        SelfEvaluationLoRA.load(torch.nn.Sequential(torch.nn.Linear(4, 4)), partial)
