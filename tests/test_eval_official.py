"""The official protocols against a loopback OpenAI-compatible judge: exact requests, implied numbers, faults."""

from __future__ import annotations

import json
import logging
import math
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from test_eval_judge_server import JudgeServer, answer_for, digest  # noqa: E402

from evals.alpaca import alpaca_metrics, judge_pairwise  # noqa: E402
from evals.judges import JudgeError, JudgeUnavailable, OpenAIJudge  # noqa: E402
from evals.mt_bench import JUDGE_REQUEST, grade_answers, mt_bench_scores  # noqa: E402
from evals.sources import load_judge_prompts, load_mt_bench_questions, load_reference_answers  # noqa: E402

SECRET = "sk-test-never-logged"


def _judge(url, tmp_path, **kwargs):
    options = {"base_url": url, "model": "gpt-4-1106-preview", "api_key": SECRET, "max_concurrency": 4,
               "timeout_s": 0.5, "max_retries": 4, "cache_dir": tmp_path / "cache", "backoff_base_s": 0.001,
               "backoff_cap_s": 0.01, "max_failure_fraction": 0.0}
    options.update(kwargs)
    return OpenAIJudge(**options)


def _alpaca_rows(shared_data, n=10):
    rows = json.loads((shared_data / "alpaca_eval" / "gpt4_1106_preview_outputs.json").read_text())[:n]
    baseline = [{**r, "index": i} for i, r in enumerate(rows)]
    # Two identical outputs (ties without a request), the rest shortened or reworded, one with braces.
    mine = []
    for i, r in enumerate(rows):
        text = r["output"] if i in (3, 7) else f"{{output_1}} {r['output'][: 80 + 30 * i]} (variant {i})"
        mine.append({"instruction": r["instruction"], "output": text, "generator": "my-model",
                     "dataset": r["dataset"]})
    return baseline, mine


def _alpaca_evals_own_annotator(url, baseline, mine):
    """alpaca_eval's PairwiseAnnotator (weighted_alpaca_eval_gpt4_turbo) pointed at the loopback judge."""
    script = (
        "import json, sys\n"
        "from alpaca_eval.annotators import PairwiseAnnotator\n"
        "rows, mine = json.load(sys.stdin)\n"
        "annotator = PairwiseAnnotator(annotators_config='weighted_alpaca_eval_gpt4_turbo', caching_path=None)\n"
        "out = annotator.annotate_head2head(outputs_1=rows, outputs_2=mine)\n"
        "print('RESULT' + json.dumps([{'instruction': a['instruction'], 'preference': a['preference']} for a in out]))\n"
    )
    env = dict(os.environ, OPENAI_API_BASE=url, OPENAI_API_KEY="sk-upstream")
    rows = [{k: r[k] for k in ("instruction", "output", "generator", "dataset")} for r in baseline]
    done = subprocess.run([sys.executable, "-c", script], input=json.dumps([rows, mine]), capture_output=True,
                          text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.split("RESULT", 1)[1])


def test_alpaca_requests_and_preferences_are_alpaca_evals_own(shared_data, tmp_path):
    baseline, mine = _alpaca_rows(shared_data)
    with JudgeServer() as upstream:
        expected = _alpaca_evals_own_annotator(upstream.url, baseline, mine)
    with JudgeServer() as server:
        judge = _judge(server.url, tmp_path)
        annotations = judge_pairwise(judge, baseline, mine, seed=0)
    # Byte for byte the request bodies alpaca_eval's annotator sent (order aside: both send in parallel).
    assert len(server.raw) == len(upstream.raw) == len(baseline) - 2
    assert sorted(server.raw) == sorted(upstream.raw)
    assert set(server.auth) == {f"Bearer {SECRET}"}
    by_instruction = {a["instruction"]: a["preference"] for a in expected}
    for ours in annotations:
        assert ours["preference"] == pytest.approx(by_instruction[ours["instruction"]], abs=1e-12)
    assert [a["preference"] for a in annotations if a["output_1"] == a["output_2"]] == [1.5, 1.5]
    # The reported win rate is what the judge's answers imply, with alpaca_eval's own metric.
    from alpaca_eval.metrics import get_winrate

    metrics = alpaca_metrics(annotations)
    upstream_rate = get_winrate([{"preference": p} for p in by_instruction.values()])["win_rate"]
    assert metrics.win_rate == pytest.approx(upstream_rate, abs=1e-9)
    # Each preference is 2 - P(first shown) from the served logprobs, mapped back where the order was switched.
    bodies = {b["messages"][-1]["content"]: b for b in server.bodies}
    for ours in annotations:
        if ours["output_1"] == ours["output_2"]:
            continue
        shown = next(b for c, b in bodies.items() if ours["output_2"] in c and ours["instruction"] in c)
        p_first = math.exp(answer_for(shown)["logprobs"]["content"][0]["top_logprobs"][0]["logprob"])
        expected_pref = 2 - p_first
        assert ours["preference"] == pytest.approx(3 - expected_pref if ours["is_swapped"] else expected_pref)


def _mt_bench_inputs(shared_data, ids=(81, 82, 101, 111, 121, 131)):
    data = shared_data / "mt_bench"
    questions = [q for q in load_mt_bench_questions(str(data / "question.jsonl")) if q["question_id"] in ids]
    answers = [{"question_id": q["question_id"], "model_id": "my-model",
                "choices": [{"index": 0, "turns": [f"First {{answer_2}} answer to {q['question_id']}",
                                                   f"Second answer {q['question_id']} {{question}}"]}]}
               for q in questions]
    return questions, answers, load_judge_prompts(data / "judge_prompts.jsonl"), load_reference_answers(
        data / "reference_answer_gpt-4.jsonl")


def test_mt_bench_requests_are_fastchats_and_scores_are_implied(shared_data, tmp_path):
    questions, answers, prompts, references = _mt_bench_inputs(shared_data)
    with JudgeServer() as server:
        judge = _judge(server.url, tmp_path, model="gpt-4")
        judgments = grade_answers(judge, questions, answers, judge_prompts=prompts, references=references)
    expected = []
    for q, a in zip(questions, answers):
        turns = a["choices"][0]["turns"]
        ref = q["category"] in ("math", "reasoning", "coding")
        kw = {"ref_answer_1": references[q["question_id"]][0], "ref_answer_2": references[q["question_id"]][1]} if ref else {}
        one = prompts["single-math-v1" if ref else "single-v1"]
        two = prompts["single-math-v1-multi-turn" if ref else "single-v1-multi-turn"]
        for record, text in (
            (one, one["prompt_template"].format(question=q["turns"][0], answer=turns[0], **kw)),
            (two, two["prompt_template"].format(question_1=q["turns"][0], question_2=q["turns"][1],
                                                answer_1=turns[0], answer_2=turns[1], **kw)),
        ):
            expected.append({"model": "gpt-4", "messages": [{"role": "system", "content": record["system_prompt"]},
                                                            {"role": "user", "content": text}], **JUDGE_REQUEST})
    canon = lambda b: json.dumps(b, sort_keys=True)  # noqa: E731
    assert sorted(map(canon, server.bodies)) == sorted(map(canon, expected))
    assert JUDGE_REQUEST == {"n": 1, "temperature": 0, "max_tokens": 2048}
    for judgment in judgments:
        assert judgment["score"] == digest(judgment["user_prompt"]) % 10 + 1
        assert judgment["judge"][0] == "gpt-4"
    scores = mt_bench_scores(judgments, questions)
    implied = [digest(b["messages"][-1]["content"]) % 10 + 1 for b in expected]
    assert scores.score == pytest.approx(sum(implied) / len(implied))
    assert scores.turn_1 == pytest.approx(sum(implied[0::2]) / len(questions))


def _faults(rejected: set[str], served: dict):
    """30% of the items fail their first two attempts, the failing items taking turns at 429, 500, a malformed
    200, 503 and a timeout (then a 502); the items holding a `rejected` text are refused for good (400)."""
    import threading

    kinds = [429, 500, "malformed", 503, "timeout"]
    lock = threading.Lock()
    kind_of: dict[str, object] = {}

    def faults(content, attempt):
        if any(r in content for r in rejected):
            return 400
        if digest("fault:" + content) % 10 >= 3 or attempt >= 2:
            return None
        with lock:
            kind = kind_of.setdefault(content, kinds[len(kind_of) % len(kinds)])
            fault = 502 if kind == "timeout" and attempt == 1 else kind
            served[fault] = served.get(fault, 0) + 1
        return fault

    return faults


def test_flaky_judge_gives_the_clean_judges_numbers_for_the_other_items(shared_data, tmp_path, caplog):
    caplog.set_level(logging.DEBUG)
    baseline, mine = _alpaca_rows(shared_data, n=16)
    questions, answers, prompts, references = _mt_bench_inputs(shared_data)
    bad_instruction = baseline[5]["instruction"]
    bad_answer = "Second answer 101 {question}"  # only the turn-2 prompt of question 101 holds it
    with JudgeServer() as clean:
        judge = _judge(clean.url, tmp_path / "clean")
        clean_annotations = judge_pairwise(judge, baseline, mine, seed=0)
        clean_judgments = grade_answers(_judge(clean.url, tmp_path / "clean", model="gpt-4"), questions, answers,
                                        judge_prompts=prompts, references=references)
    start = time.perf_counter()
    served: dict = {}
    with JudgeServer(faults=_faults({bad_instruction, bad_answer}, served)) as flaky:
        judge = _judge(flaky.url, tmp_path / "flaky", max_failure_fraction=0.2)
        annotations = judge_pairwise(judge, baseline, mine, seed=0)
        mt_judge = _judge(flaky.url, tmp_path / "flaky", model="gpt-4", max_failure_fraction=0.2)
        judgments = grade_answers(mt_judge, questions, answers, judge_prompts=prompts, references=references)
    assert time.perf_counter() - start < 30
    assert set(served) == {429, 500, "malformed", 503, "timeout", 502}  # every kind of fault was served
    assert judge.stats.retries > 0 and judge.stats.failures == 1
    assert mt_judge.stats.failures == 1
    failed = [a for a in annotations if a["instruction"] == bad_instruction]
    assert len(failed) == 1 and math.isnan(failed[0]["preference"]) and "HTTP 400" in failed[0]["raw_completion"]
    kept = [a for a in clean_annotations if a["instruction"] != bad_instruction]
    assert [a["preference"] for a in annotations if a["instruction"] != bad_instruction] == [a["preference"] for a in kept]
    flaky_metrics, clean_metrics = alpaca_metrics(annotations), alpaca_metrics(kept)
    assert flaky_metrics.win_rate == clean_metrics.win_rate and flaky_metrics.n_parse_failures == 1
    error = [j for j in judgments if j["judgment"] == "$ERROR$"]
    assert len(error) == 1 and error[0]["score"] == -1 and (error[0]["question_id"], error[0]["turn"]) == (101, 2)
    clean_scores = [j["score"] for j in clean_judgments if not (j["question_id"] == 101 and j["turn"] == 2)]
    assert mt_bench_scores(judgments, questions).score == pytest.approx(sum(clean_scores) / len(clean_scores))
    assert SECRET not in caplog.text
    for path in (tmp_path / "flaky").rglob("*.json"):
        assert SECRET not in path.read_text()


def test_too_many_failures_stop_the_run_naming_the_first_errors(tmp_path):
    with JudgeServer(faults=lambda content, attempt: 400) as server:
        judge = _judge(server.url, tmp_path, max_failure_fraction=0.25)
        with pytest.raises(JudgeError, match=r"3 of 3 .*max_failure_fraction=0.25.*HTTP 400"):
            judge.complete([[{"role": "user", "content": f"q{i}"}] for i in range(3)])


def test_a_judge_that_is_down_stops_the_run_within_seconds(tmp_path):
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    url = f"http://127.0.0.1:{port}/v1"
    judge = _judge(url, tmp_path, backoff_base_s=1.0, backoff_cap_s=30.0, max_retries=5)
    start = time.perf_counter()
    with pytest.raises(JudgeUnavailable) as caught:
        judge.complete([[{"role": "user", "content": f"q{i}"}] for i in range(40)])
    assert time.perf_counter() - start < 10
    assert f"{url}/chat/completions" in str(caught.value) and "eval.judge.base_url" in str(caught.value)
    assert judge.stats.requests < 20


def test_cache_key_covers_every_request_field(tmp_path):
    messages = [{"role": "user", "content": "same"}]
    with JudgeServer() as server:
        judge = _judge(server.url, tmp_path)
        for request in ({"max_tokens": 1}, {"max_tokens": 2}, {"max_tokens": 1, "seed": 3},
                        {"max_tokens": 1, "temperature": 0.5}, {"max_tokens": 1, "logprobs": True, "top_logprobs": 5}):
            judge.chat([{"messages": messages, **request}])
        assert len(server.bodies) == 5
        judge.chat([{"messages": messages, "max_tokens": 2}])
        assert len(server.bodies) == 5 and judge.stats.cache_hits == 1
        _judge(server.url, tmp_path, model="other").chat([{"messages": messages, "max_tokens": 2}])
        assert len(server.bodies) == 6
    # Another endpoint serving a model under the same name (a local stand-in served as gpt-4-1106-preview)
    # is another judge: its judgments must never be served for the real one's, and the other way round.
    with JudgeServer() as stand_in:
        reply = _judge(stand_in.url, tmp_path).chat([{"messages": messages, "max_tokens": 2}])
        assert len(stand_in.bodies) == 1 and reply[0].text is not None


def test_official_data_is_recognised_and_offline_errors_name_file_and_key(shared_data, tmp_path, monkeypatch):
    from evals.official import ALPACA_EVAL_BASELINE, MT_BENCH_REFERENCES, OfficialDataError, is_official, resolve

    assert is_official(shared_data / "alpaca_eval" / "gpt4_1106_preview_outputs.json", ALPACA_EVAL_BASELINE)
    assert not is_official("data/samples/eval/alpaca_eval_sample.json", ALPACA_EVAL_BASELINE)
    assert resolve("local.json", ALPACA_EVAL_BASELINE, tmp_path) == "local.json"  # a local path wins
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(OfficialDataError, match=r"gpt-4\.jsonl.*eval\.mt_bench_reference_answers=PATH"):
        resolve(None, MT_BENCH_REFERENCES, tmp_path)


def test_protocol_names():
    from evals.protocols import alpaca_protocol, describe_metric, mt_bench_protocol

    official = dict(judge_kind="openai", evaluator="weighted_alpaca_eval_gpt4_turbo",
                    annotator_model="gpt-4-1106-preview", custom_prompt=False, official_data=True, subset=False,
                    seed=0)
    assert alpaca_protocol(**official).prefix == "alpaca_eval2" and alpaca_protocol(**official).official
    # alpaca_eval's annotator seed (0) decides which output the judge sees first: another seed asks the judge
    # other questions than the leaderboard's.
    reseeded = alpaca_protocol(**{**official, "seed": 1})
    assert reseeded.prefix == "alpaca_eval2_other_seed" and not reseeded.official and "seed 1" in reseeded.description
    assert alpaca_protocol(**{**official, "subset": True}).prefix == "alpaca_eval2_subset"
    assert alpaca_protocol(**{**official, "judge_kind": "hf"}).prefix == "alpaca_local_judge"
    assert alpaca_protocol(**{**official, "annotator_model": "llama"}).prefix == "alpaca_eval2_other_annotator"
    mt = dict(judge_kind="openai", judge_model="gpt-4", fastchat_prompts=True, official_questions=True,
              official_references=True, subset=False, max_new_tokens=1024)
    assert mt_bench_protocol(**mt).prefix == "mt_bench"
    # FastChat's gen_model_answer writes answers of up to 1024 new tokens; shorter (truncated) or longer
    # answers are graded differently, so their scores are not MT-Bench's.
    for tokens in (512, 2048):
        other = mt_bench_protocol(**{**mt, "max_new_tokens": tokens})
        assert other.prefix == "mt_bench_other_generation" and not other.official
        assert f"max_new_tokens={tokens}" in other.description
    assert mt_bench_protocol(**{**mt, "official_references": False}).prefix == "mt_bench_subset"
    assert mt_bench_protocol(**{**mt, "judge_model": "gpt-4o"}).prefix == "mt_bench_other_judge"
    assert mt_bench_protocol(**{**mt, "judge_kind": "hf"}).prefix == "mt_bench_local_judge"
    assert "minimal GLM" in describe_metric("alpaca_eval2_subset/lc_minimal_glm_winrate")
    assert describe_metric("preference/accuracy") == ""


def test_evaluate_model_with_an_endpoint_judge_names_protocols_and_writes_official_layouts(
        tiny_model_dir, shared_data, tmp_path):
    from evals.run import evaluate_model, model_label
    from orpo.config import load_config

    with JudgeServer() as server:
        config = load_config(None, [
            f"workdir={tmp_path / 'work'}",
            "eval.judge.kind=openai",
            f"eval.judge.base_url={server.url}",
            "eval.judge.backoff_base_s=0.001",
            f"eval.alpaca_source={shared_data / 'alpaca_eval' / 'gpt4_1106_preview_outputs.json'}",
            f"eval.mt_bench_questions={shared_data / 'mt_bench' / 'question.jsonl'}",
            f"eval.mt_bench_judge_prompts={shared_data / 'mt_bench' / 'judge_prompts.jsonl'}",
            f"eval.mt_bench_reference_answers={shared_data / 'mt_bench' / 'reference_answer_gpt-4.jsonl'}",
            "eval.alpaca_limit=3",
            "eval.mt_bench_limit=2",
            "eval.max_new_tokens=6",
            "eval.suites=[alpaca,mtbench]",
        ])
        result = evaluate_model(config, str(tiny_model_dir), tmp_path / "report", api_key=SECRET, progress=False)
    out = result.report_dir
    metrics = result.metrics
    # The official protocols on a subset of the official data: named apart from the leaderboard numbers.
    assert "alpaca_eval2_subset/win_rate" in metrics and "mt_bench_subset/score" in metrics
    assert not any(name.startswith(("alpaca_eval2/", "mt_bench/")) for name in metrics)
    assert set(result.protocols) == {"alpaca_eval2_subset", "mt_bench_subset"}
    assert "max_new_tokens=6, not FastChat's 1024" in result.protocols["mt_bench_subset"]
    assert {b["model"] for b in server.bodies if b.get("logprobs")} == {"gpt-4-1106-preview"}
    assert {b["model"] for b in server.bodies if not b.get("logprobs")} == {"gpt-4"}
    judgments = [json.loads(line) for line in (out / "model_judgment" / "gpt-4_single.jsonl").read_text().splitlines()]
    assert {tuple(j["judge"]) for j in judgments} <= {("gpt-4", n) for n in ("single-v1", "single-v1-multi-turn",
                                                                            "single-math-v1", "single-math-v1-multi-turn")}
    assert metrics["mt_bench_subset/score"] == pytest.approx(sum(j["score"] for j in judgments) / len(judgments))
    answers = (out / "model_answer" / f"{model_label(str(tiny_model_dir))}.jsonl").read_text().splitlines()
    assert len(answers) == 2
    annotations = json.loads((out / "annotations.json").read_text())
    assert len(annotations) == 3 and len(json.loads((out / "model_outputs.json").read_text())) == 3
    assert "| metric | value | protocol |" in result.report_md.read_text()
    for path in out.rglob("*"):
        if path.is_file() and path.suffix in (".json", ".jsonl", ".md"):
            assert SECRET not in path.read_text()


def test_a_rerun_into_the_same_directory_leaves_nothing_of_the_earlier_evaluation(tiny_model_dir, shared_data, tmp_path):
    """The start model's report directory is reused night after night: files of an earlier evaluation (another
    judge's judgments, a suite no longer run) must not be read back as this evaluation's."""
    from evals.run import evaluate_model
    from orpo.config import load_config
    from orpo.head_to_head import read_evaluation

    out = tmp_path / "report"
    (out / "model_judgment").mkdir(parents=True)
    stale = {"question_id": 81, "model": "old", "judge": ["builtin-smollm2", "builtin-single"], "score": 1, "turn": 1}
    (out / "model_judgment" / "builtin-smollm2_single.jsonl").write_text(json.dumps(stale) + "\n")
    (out / "annotations.json").write_text(json.dumps([{"preference": 1.0}]))
    (out / "model_outputs.json").write_text(json.dumps([{"instruction": "old", "output": "old"}]))
    (out / "preference_margins.json").write_text(json.dumps([{"index": 0, "margin": -1.0}]))
    (out / "notes.txt").write_text("not ours")
    with JudgeServer() as server:
        config = load_config(None, [
            f"workdir={tmp_path / 'work'}", "eval.judge.kind=openai", f"eval.judge.base_url={server.url}",
            f"eval.mt_bench_questions={shared_data / 'mt_bench' / 'question.jsonl'}",
            f"eval.mt_bench_judge_prompts={shared_data / 'mt_bench' / 'judge_prompts.jsonl'}",
            f"eval.mt_bench_reference_answers={shared_data / 'mt_bench' / 'reference_answer_gpt-4.jsonl'}",
            "eval.mt_bench_limit=1", "eval.max_new_tokens=4", "eval.suites=[mtbench]",
        ])
        evaluate_model(config, str(tiny_model_dir), out, api_key=SECRET, progress=False)
    files = read_evaluation(out)
    assert {j["judge"][0] for j in files.mt_bench_judgments} == {"gpt-4"}
    assert files.annotations is None and files.alpaca_outputs is None and files.preference_margins is None
    assert (out / "notes.txt").read_text() == "not ours"


@pytest.mark.slow
def test_mlflow_run_carries_each_protocol_as_a_tag(tmp_path, tiny_model_dir):
    from mlflow import MlflowClient
    from test_registry_helpers import make_train_dir

    from evals.protocols import PREFIX_DESCRIPTIONS
    from evals.report import Report, write_report
    from orpo.config import PipelineConfig
    from orpo.registry import configure_mlflow, log_evaluation, register_training_run

    config = PipelineConfig(workdir=str(tmp_path / "work"))
    version = register_training_run(config, make_train_dir(tmp_path, lora=True, base_dir=tiny_model_dir, seed=1))
    protocols = {"alpaca_eval2": PREFIX_DESCRIPTIONS["alpaca_eval2"], "mt_bench_subset": "MT-Bench on 2 questions"}
    metrics = {"alpaca_eval2/win_rate": 12.5, "mt_bench_subset/score": 6.0}
    write_report(Report(model="m", metrics=metrics, protocols=protocols), tmp_path / "report")
    log_evaluation(config, version, metrics, tmp_path / "report")
    configure_mlflow(config)
    tags = MlflowClient().get_run(version.run_id).data.tags
    assert {k: v for k, v in tags.items() if k.startswith("eval.protocol.")} == {
        f"eval.protocol.{prefix}": text for prefix, text in protocols.items()}


def test_cli_run_against_a_judge_that_is_down_fails_with_one_message(tiny_model_dir, tmp_path):
    from typer.testing import CliRunner

    from evals.cli import app

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        url = f"http://127.0.0.1:{sock.getsockname()[1]}/v1"
    result = CliRunner().invoke(app, [
        "run", "--model", str(tiny_model_dir), "--suite", "alpaca", "--out", str(tmp_path / "out"), "--limit", "4",
        f"workdir={tmp_path}", "eval.alpaca_source=data/samples/eval/alpaca_eval_sample.json",
        "eval.max_new_tokens=4", "eval.judge.kind=openai", f"eval.judge.base_url={url}",
    ])
    assert result.exit_code == 2
    assert f"the judge at {url}/chat/completions cannot be reached" in result.output
    assert "Traceback" not in result.output


def test_the_official_protocols_on_the_official_data_get_the_leaderboard_names(
        tiny_model_dir, shared_data, tmp_path, monkeypatch):
    """All 805 instructions and 80 questions, official files and judges: alpaca_eval2/* and mt_bench/*."""
    import evals.generate
    from alpaca_eval.metrics import get_winrate

    from evals.run import evaluate_model
    from orpo.config import load_config

    limits = {}

    def outputs(model, tokenizer, rows, *, generator, **kwargs):  # canned answers: this test is about the names
        limits["alpaca"] = kwargs["max_new_tokens"]
        return [{"instruction": r["instruction"], "output": r["output"][: 50 + 7 * (i % 90)], "generator": generator,
                 "dataset": r["dataset"]} for i, r in enumerate(rows)]

    def answers(model, tokenizer, questions, *, model_id, **kwargs):
        limits["mtbench"] = kwargs["max_new_tokens"]
        return [{"question_id": q["question_id"], "answer_id": str(q["question_id"]), "model_id": model_id,
                 "choices": [{"index": 0, "turns": [f"answer {q['question_id']} {t}" for t in (1, 2)]}], "tstamp": 0}
                for q in questions]

    monkeypatch.setattr(evals.generate, "generate_alpaca_outputs", outputs)
    monkeypatch.setattr(evals.generate, "generate_mt_bench_answers", answers)
    with JudgeServer() as server:
        config = load_config(None, [
            f"workdir={tmp_path / 'work'}", "eval.judge.kind=openai", f"eval.judge.base_url={server.url}",
            "eval.judge.max_concurrency=8",
            f"eval.alpaca_source={shared_data / 'alpaca_eval' / 'gpt4_1106_preview_outputs.json'}",
            f"eval.mt_bench_questions={shared_data / 'mt_bench' / 'question.jsonl'}",
            f"eval.mt_bench_judge_prompts={shared_data / 'mt_bench' / 'judge_prompts.jsonl'}",
            f"eval.mt_bench_reference_answers={shared_data / 'mt_bench' / 'reference_answer_gpt-4.jsonl'}",
            "eval.suites=[alpaca,mtbench]",
            # AlpacaEval outputs as long as alpaca_eval's model configs allow; MT-Bench answers at FastChat's
            # 1024 tokens, part of the MT-Bench protocol.
            "eval.max_new_tokens=2048", "eval.mt_bench_max_new_tokens=1024",
        ])
        result = evaluate_model(config, str(tiny_model_dir), tmp_path / "report", api_key=SECRET, progress=False)
    metrics = result.metrics
    assert limits == {"alpaca": 2048, "mtbench": 1024}
    assert set(result.protocols) == {"alpaca_eval2", "mt_bench"}
    assert metrics["alpaca_eval2/n_total"] == 805 and "mt_bench/category/writing" in metrics
    # Offline there is no df_gamed.csv, so never the leaderboard's LC name; and this judge's preferences are
    # unrelated to length, so the minimal GLM regularises every weight away: no LC at all, not a flat 50.
    assert "alpaca_eval2/length_controlled_winrate" not in metrics
    assert "alpaca_eval2/lc_minimal_glm_winrate" not in metrics
    assert "not reported (the GLM could not be fitted)" in result.report_md.read_text()
    annotations = json.loads((result.report_dir / "annotations.json").read_text())
    assert metrics["alpaca_eval2/win_rate"] == pytest.approx(get_winrate(annotations)["win_rate"])
    assert {a["annotator"] for a in annotations} == {"weighted_alpaca_eval_gpt4_turbo"}
    judgments = (result.report_dir / "model_judgment" / "gpt-4_single.jsonl").read_text().splitlines()
    assert len(judgments) == 160
    differing = [a for a in annotations if a["output_1"] != a["output_2"]]  # identical ones are ties, unasked
    assert len([b for b in server.bodies if b.get("logprobs")]) == len(differing) < 805
