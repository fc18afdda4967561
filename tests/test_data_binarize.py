"""prepare_dataset end to end: schema, manifest accounting, determinism, stable splits, errors, formats."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from orpo.config import DataConfig
from orpo.data import (
    DataPreparationError,
    DecontaminationFileError,
    MalformedRecordError,
    dataset_key,
    load_prepared,
    prepare_dataset,
)
from orpo.data import binarize as binarize_module
from orpo.data import pool as pool_module
from orpo.data.ultrafeedback import DROP_REASONS

REPO_ROOT = Path(__file__).resolve().parents[1]
SAMPLE = REPO_ROOT / "data" / "samples" / "ultrafeedback_sample.jsonl"
COLUMNS = ["prompt", "prompt_id", "chosen", "rejected", "score_chosen", "score_rejected", "source", "chosen_model",
           "rejected_model"]


def sample_records() -> list[dict]:
    return [json.loads(line) for line in SAMPLE.read_text(encoding="utf-8").splitlines()]


def write_jsonl(path: Path, records: list, raw_lines: dict[int, str] | None = None) -> Path:
    lines = [json.dumps(r, ensure_ascii=False) for r in records]
    for index, text in (raw_lines or {}).items():
        lines.insert(index, text)
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def config(source: Path, **options) -> DataConfig:
    return DataConfig(source=str(source), **options)


def manifest_of(prepared) -> dict:
    return json.loads(prepared.manifest_path.read_text(encoding="utf-8"))


def tree_bytes(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def sample_dataset(tmp_path_factory, shared_data):
    out = tmp_path_factory.mktemp("sample") / "dataset"
    cfg = config(
        SAMPLE,
        test_size=0.1,
        decontamination_files=[str(shared_data / "mt_bench" / "question.jsonl"),
                               str(shared_data / "alpaca_eval" / "gpt4_1106_preview_outputs.json")],
    )
    return cfg, prepare_dataset(cfg, out, progress=False)


def test_sample_schema_and_accounting(sample_dataset):
    from datasets import load_from_disk

    _, prepared = sample_dataset
    dataset = load_from_disk(str(prepared.dataset_dir))
    assert set(dataset) == {"train", "test"}
    manifest = manifest_of(prepared)
    counts = manifest["counts"]
    records = sample_records()
    # Every record is accounted for, once.
    assert counts["records_in"] == len(records)
    assert counts["train"] + counts["test"] + sum(manifest["dropped"].values()) == counts["records_in"]
    assert counts["dropped"] == sum(manifest["dropped"].values())
    assert set(manifest["dropped"]) == set(DROP_REASONS)
    assert (counts["train"], counts["test"]) == (dataset["train"].num_rows, dataset["test"].num_rows)
    # The sample exercises the rules it was built for.
    truthful_qa = sum(r["source"] == "truthful_qa" for r in records)
    assert manifest["decontamination"]["by_rule"]["source"] == truthful_qa
    assert manifest["dropped"]["all_tied"] > 0 and manifest["dropped"]["duplicate"] > 0
    assert manifest["dropped"]["too_few_completions"] > 0
    assert manifest["non_numeric_ratings"] == sum(
        aspect["Rating"] == "N/A" for r in records for c in r["completions"] for aspect in c["annotations"].values()
    )
    # Roughly the requested test share (the split is a hash, so not exactly).
    assert 0.04 < counts["test"] / (counts["train"] + counts["test"]) < 0.16
    for split in ("train", "test"):
        assert dataset[split].column_names == COLUMNS
        for row in dataset[split]:
            assert row["prompt_id"] == hashlib.sha256(row["prompt"].encode("utf-8")).hexdigest()
            for side in ("chosen", "rejected"):
                assert [m["role"] for m in row[side]] == ["user", "assistant"]
                assert row[side][0]["content"] == row["prompt"]
                assert row[side][1]["content"].strip()
            assert row["score_chosen"] > row["score_rejected"]  # argilla: strictly lower
            assert row["source"] != "truthful_qa"
            assert row["chosen"][1]["content"] != row["rejected"][1]["content"]
    assert dataset["train"].features["score_chosen"].dtype == "float64"
    prompts = list(dataset["train"]["prompt"]) + list(dataset["test"]["prompt"])
    assert len(prompts) == len(set(prompts))


def test_load_prepared_and_reuse(sample_dataset, monkeypatch):
    cfg, prepared = sample_dataset
    again = load_prepared(prepared.dataset_dir)
    assert again == prepared
    assert manifest_of(prepared)["dataset_key"] == dataset_key(cfg)

    def fail(*args, **kwargs):
        raise AssertionError("recomputed a dataset that was already there")

    monkeypatch.setattr(binarize_module, "_run_pass", fail)
    assert prepare_dataset(cfg, prepared.dataset_dir, progress=False) == prepared
    with pytest.raises(DataPreparationError, match="not a prepared dataset"):
        load_prepared(prepared.dataset_dir.parent / "nothing-here")


def test_deterministic_byte_identical_output(tmp_path):
    cfg = config(SAMPLE, recipe="h4", decontaminate=False)
    first = prepare_dataset(cfg, tmp_path / "a", progress=False)
    second = prepare_dataset(cfg, tmp_path / "b", progress=False)
    assert first.fingerprint == second.fingerprint
    assert first.input_fingerprint == second.input_fingerprint
    assert tree_bytes(first.dataset_dir) == tree_bytes(second.dataset_dir)
    other_seed = prepare_dataset(config(SAMPLE, recipe="h4", decontaminate=False, seed=7), tmp_path / "c",
                                 progress=False)
    assert other_seed.fingerprint != first.fingerprint  # the seed picks other rejected completions
    assert dataset_key(config(SAMPLE, recipe="h4", decontaminate=False, seed=7)) != dataset_key(cfg)


def test_splits_stay_put_when_records_are_added(tmp_path):
    from datasets import load_from_disk

    records = sample_records()
    small = write_jsonl(tmp_path / "small.jsonl", records[:150])
    full = write_jsonl(tmp_path / "full.jsonl", records)
    splits = {}
    for name, source in (("small", small), ("full", full)):
        dataset = load_from_disk(str(prepare_dataset(config(source, test_size=0.2, decontaminate=False),
                                                     tmp_path / name, progress=False).dataset_dir))
        splits[name] = {split: set(dataset[split]["prompt_id"]) for split in ("train", "test")}
    assert splits["small"]["test"] and splits["small"]["train"]
    assert splits["small"]["test"] <= splits["full"]["test"]
    assert splits["small"]["train"] <= splits["full"]["train"]
    assert splits["full"]["test"] - splits["small"]["test"]  # the new records add test prompts too


def test_input_fingerprint_follows_content(tmp_path):
    records = sample_records()[:20]
    first = write_jsonl(tmp_path / "a.jsonl", records)
    renamed = write_jsonl(tmp_path / "b.jsonl", records)
    changed = write_jsonl(tmp_path / "c.jsonl", records[:19])
    fingerprints = [binarize_module.input_fingerprint(config(p)) for p in (first, renamed, changed)]
    assert fingerprints[0] == fingerprints[1] != fingerprints[2]


def test_malformed_fail_names_file_line_and_field(tmp_path):
    records = sample_records()[:10]
    bad_json = write_jsonl(tmp_path / "bad.jsonl", records, raw_lines={4: '{"instruction": "x", "completions": ['})
    with pytest.raises(MalformedRecordError) as info:
        prepare_dataset(config(bad_json, decontaminate=False), tmp_path / "out", progress=False)
    assert f"{bad_json}:5" in str(info.value) and "not valid JSON" in str(info.value)
    broken = [dict(r) for r in records]
    del broken[6]["instruction"]
    missing = write_jsonl(tmp_path / "missing.jsonl", broken)
    with pytest.raises(MalformedRecordError, match=rf"{missing}:7: field 'instruction': missing"):
        prepare_dataset(config(missing, decontaminate=False), tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()
    assert not list(tmp_path.glob("out.tmp-*"))  # nothing half-written is left behind


def test_malformed_skip_counts_them(tmp_path):
    records = sample_records()[:30]
    records[3] = {**records[3], "completions": [{**records[3]["completions"][0], "annotations": None}]}
    source = write_jsonl(tmp_path / "in.jsonl", records, raw_lines={10: "not json at all"})
    prepared = prepare_dataset(config(source, on_error="skip", decontaminate=False), tmp_path / "out", progress=False)
    manifest = manifest_of(prepared)
    assert manifest["counts"]["records_in"] == 31
    assert manifest["dropped"]["malformed"] == 2
    locations = [(e["location"], e["field"]) for e in manifest["malformed_examples"]]
    assert locations == [(f"{source}:4", "completions[0].annotations"), (f"{source}:11", "(json)")]
    assert prepared.counts["train"] + prepared.counts["test"] + prepared.counts["dropped"] == 31


def test_json_array_parquet_and_directory_inputs_match_jsonl(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    records = sample_records()[:60]
    jsonl = write_jsonl(tmp_path / "in.jsonl", records)
    array = tmp_path / "in.json"
    array.write_text(json.dumps(records, ensure_ascii=False, indent=1), encoding="utf-8")
    parquet = tmp_path / "in.parquet"
    pq.write_table(pa.Table.from_pylist(records), parquet)
    folder = tmp_path / "folder"
    folder.mkdir()
    write_jsonl(folder / "part-0.jsonl", records[:25])
    write_jsonl(folder / "part-1.jsonl", records[25:])
    fingerprints = {
        name: prepare_dataset(config(path, decontaminate=False), tmp_path / f"out-{name}", progress=False).fingerprint
        for name, path in (("jsonl", jsonl), ("json", array), ("parquet", parquet), ("dir", folder))
    }
    assert len(set(fingerprints.values())) == 1, fingerprints


def test_json_array_syntax_error_names_line(tmp_path):
    records = sample_records()[:3]
    text = json.dumps(records, indent=1)
    broken = tmp_path / "broken.json"
    cut = text.index('"completions"', text.index('"completions"') + 1)  # inside the second record
    broken.write_text(text[:cut] + "oops " + text[cut:], encoding="utf-8")
    line = text[:cut].count("\n") + 1
    with pytest.raises(MalformedRecordError, match=rf"broken.json:{line}:.*cannot be skipped"):
        prepare_dataset(config(broken, on_error="skip", decontaminate=False), tmp_path / "out", progress=False)


def test_prebinarized_rows_are_normalized(tmp_path):
    from datasets import load_from_disk

    rows = [
        {"prompt": "Capital of Peru?", "prompt_id": "ignored",
         "chosen": [{"role": "user", "content": "Capital of Peru?"}, {"role": "assistant", "content": "Lima."}],
         "rejected": [{"role": "user", "content": "Capital of Peru?"}, {"role": "assistant", "content": "Quito."}],
         "messages": [], "score_chosen": 9.0, "score_rejected": 3.0},
        {"source": "sharegpt", "prompt": "2+2?",
         "chosen": [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"}],
         "chosen-rating": 5.0, "chosen-model": "gpt-4",
         "rejected": [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "5"}],
         "rejected-rating": 1.0, "rejected-model": "alpaca-7b"},
    ]
    prepared = prepare_dataset(config(write_jsonl(tmp_path / "binarized.jsonl", rows), test_size=0.01),
                               tmp_path / "out", progress=False)
    dataset = load_from_disk(str(prepared.dataset_dir))
    assert dataset["test"].num_rows == 0  # an empty split still saves and loads
    got = {row["prompt"]: row for split in ("train", "test") for row in dataset[split]}
    assert got["Capital of Peru?"]["rejected"][1]["content"] == "Quito."
    assert got["Capital of Peru?"]["prompt_id"] == hashlib.sha256(b"Capital of Peru?").hexdigest()
    assert (got["2+2?"]["chosen_model"], got["2+2?"]["score_rejected"]) == ("gpt-4", 1.0)
    assert manifest_of(prepared)["prebinarized_records"] == 2


def test_decontamination_against_eval_files(tmp_path, shared_data):
    questions = shared_data / "mt_bench" / "question.jsonl"
    question = json.loads(questions.read_text().splitlines()[5])["turns"][0]
    records = sample_records()[:20]
    records[2] = {**records[2], "instruction": f"Please help me with this: {question}"}
    source = write_jsonl(tmp_path / "in.jsonl", records)
    on = prepare_dataset(config(source, decontamination_files=[str(questions)]), tmp_path / "on", progress=False)
    manifest = manifest_of(on)
    assert manifest["decontamination"]["by_rule"]["ngram"] == 1
    assert manifest["decontamination"]["examples"][0]["location"] == f"{source}:3"
    off = prepare_dataset(config(source, decontaminate=False), tmp_path / "off", progress=False)
    assert manifest_of(off)["dropped"]["decontaminated"] == 0
    assert off.counts["train"] + off.counts["test"] == on.counts["train"] + on.counts["test"] + 1
    with pytest.raises(DecontaminationFileError, match="nope.jsonl does not exist"):
        prepare_dataset(config(source, decontamination_files=[str(tmp_path / "nope.jsonl")]), tmp_path / "x",
                        progress=False)


@pytest.fixture(scope="module")
def tiny_tokenizer():
    from orpo.models import build_tiny_tokenizer

    return build_tiny_tokenizer()


def test_length_limits(tmp_path, tiny_tokenizer):
    tokenizer = tiny_tokenizer
    records = sample_records()[:40]
    source = write_jsonl(tmp_path / "in.jsonl", records)
    with pytest.raises(DataPreparationError, match="need a tokenizer"):
        prepare_dataset(config(source, max_length=64, decontaminate=False), tmp_path / "none", progress=False)
    unlimited = prepare_dataset(config(source, decontaminate=False), tmp_path / "all", progress=False)
    lengths = []
    for record in records:
        rendered = tokenizer.apply_chat_template([{"role": "user", "content": record["instruction"]}],
                                                 tokenize=False, add_generation_prompt=True)
        lengths.append(len(tokenizer(rendered, add_special_tokens=False)["input_ids"]))
    limit = sorted(lengths)[len(lengths) // 2]
    limited = prepare_dataset(config(source, max_prompt_tokens=limit, decontaminate=False), tmp_path / "some",
                              tokenizer=tokenizer, progress=False)
    dropped = manifest_of(limited)["dropped"]["too_long"]
    assert 0 < dropped < unlimited.counts["train"] + unlimited.counts["test"]
    assert limited.counts["train"] + limited.counts["test"] + dropped == unlimited.counts["train"] + unlimited.counts[
        "test"]
    assert manifest_of(limited)["tokenizer"]


def test_export_formats(tmp_path):
    import pyarrow.parquet as pq

    source = write_jsonl(tmp_path / "in.jsonl", sample_records()[:40])
    for fmt in ("jsonl", "parquet"):
        prepared = prepare_dataset(config(source, export=fmt, decontaminate=False, test_size=0.3),
                                   tmp_path / fmt, progress=False)
        for split in ("train", "test"):
            path = prepared.dataset_dir / "export" / f"{split}.{fmt}"
            if fmt == "jsonl":
                rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]
            else:
                rows = pq.read_table(path).to_pylist()
            assert len(rows) == prepared.counts[split]
            assert all(list(row) == COLUMNS for row in rows)


def test_crash_leaves_no_half_dataset(tmp_path, monkeypatch):
    source = write_jsonl(tmp_path / "in.jsonl", sample_records()[:20])
    cfg = config(source, decontaminate=False)
    first = prepare_dataset(cfg, tmp_path / "out", progress=False)
    before = tree_bytes(first.dataset_dir)

    def crash(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr(binarize_module, "_save_dataset_dict", crash)
    with pytest.raises(RuntimeError, match="disk full"):
        prepare_dataset(config(source, decontaminate=False, seed=3), tmp_path / "out", progress=False)
    assert tree_bytes(tmp_path / "out") == before  # the old dataset is intact
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.jsonl", "out"]


def test_refuses_to_replace_a_foreign_directory(tmp_path):
    source = write_jsonl(tmp_path / "in.jsonl", sample_records()[:5])
    foreign = tmp_path / "my-notes"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me")
    with pytest.raises(DataPreparationError, match="not a dataset directory"):
        prepare_dataset(config(source, decontaminate=False), foreign, progress=False)
    assert (foreign / "notes.txt").read_text() == "keep me"


def test_worker_processes_give_identical_output(tmp_path, monkeypatch):
    source = write_jsonl(tmp_path / "in.jsonl", sample_records())
    cfg = config(source, test_size=0.1)
    single = prepare_dataset(cfg, tmp_path / "single", progress=False, workers=1)
    # Force the worker path on a small file, with chunks of a few records.
    monkeypatch.setattr(binarize_module, "PARALLEL_MIN_BYTES", 1)
    monkeypatch.setattr(pool_module, "PARALLEL_CHUNK_BYTES", 50_000)
    parallel = prepare_dataset(cfg, tmp_path / "parallel", progress=False, workers=2)
    assert tree_bytes(single.dataset_dir) == tree_bytes(parallel.dataset_dir)
    broken = sample_records()
    del broken[200]["completions"]
    bad = write_jsonl(tmp_path / "bad.jsonl", broken)
    with pytest.raises(MalformedRecordError, match=rf"{bad}:201: field 'completions'"):
        prepare_dataset(config(bad), tmp_path / "bad-out", progress=False, workers=2)


def test_round_trip_through_trl_layout_and_project_collator(sample_dataset, tiny_tokenizer):
    from datasets import load_from_disk

    trl_data_utils = pytest.importorskip("trl.data_utils")
    from orpo.collate import PreferenceCollator, tokenize_pair

    tokenizer = tiny_tokenizer
    _, prepared = sample_dataset
    test = load_from_disk(str(prepared.dataset_dir))["test"]
    row = test[0]
    # TRL reads the conversations with an implicit prompt (the H4 `prompt` string column is for people).
    implicit = {"chosen": row["chosen"], "rejected": row["rejected"]}
    assert trl_data_utils.is_conversational(implicit)
    explicit = trl_data_utils.extract_prompt(implicit)
    assert explicit["prompt"] == [{"content": row["prompt"], "role": "user"}]
    assert explicit["chosen"] == [row["chosen"][1]] and explicit["rejected"] == [row["rejected"][1]]
    rendered = trl_data_utils.maybe_apply_chat_template(explicit, tokenizer)
    assert row["prompt"] in rendered["prompt"] and row["chosen"][1]["content"] in rendered["chosen"]
    features = [tokenize_pair(example, tokenizer, max_length=256, max_prompt_length=128) for example in test]
    batch = PreferenceCollator(tokenizer.pad_token_id)(features[:4])
    assert batch["input_ids"].shape[0] == 8 and batch["num_pairs"] == 4
    assert batch["completion_mask"].sum(dim=1).min() > 0  # every row has response tokens
    decoded = tokenizer.decode(features[0]["chosen_input_ids"])
    assert test[0]["chosen"][1]["content"] in decoded


def test_dedupe_ignores_whitespace_and_keeps_the_first(tmp_path):
    from datasets import load_from_disk

    base = sample_records()[0]
    variants = [base["instruction"], f"  {base['instruction']}", base["instruction"].replace(" ", "\t", 1)]
    records = [{**base, "instruction": prompt} for prompt in variants]
    source = write_jsonl(tmp_path / "in.jsonl", records)
    deduped = prepare_dataset(config(source, decontaminate=False), tmp_path / "on", progress=False)
    assert (manifest_of(deduped)["dropped"]["duplicate"], deduped.counts["pairs"]) == (2, 1)
    dataset = load_from_disk(str(deduped.dataset_dir))
    kept = [row["prompt"] for split in ("train", "test") for row in dataset[split]]
    assert kept == [variants[0]]
    kept_all = prepare_dataset(config(source, decontaminate=False, dedupe=False), tmp_path / "off", progress=False)
    assert kept_all.counts["pairs"] == 3


def test_length_limits_count_the_tokens_training_sees_without_a_template(tmp_path, tiny_tokenizer):
    """A tokenizer without a chat template trains on orpo.chat_template's fallback (role tags, EOS-closed
    turns): the filter counts those tokens, and a different template makes a different dataset identity."""
    import copy

    from orpo.collate import tokenize_pair
    from orpo.data.binarize import LengthLimit, tokenizer_identity
    from orpo.data.ultrafeedback import Pair

    bare = copy.deepcopy(tiny_tokenizer)
    bare.chat_template = None
    pair = Pair(prompt="Name a colour.", chosen="Blue is a colour.", rejected="No.", score_chosen=5.0,
                score_rejected=1.0, source="s", chosen_model="a", rejected_model="b")
    trained = tokenize_pair(pair.to_row(), bare, max_length=512, max_prompt_length=256)
    longest = trained["prompt_length"] + max(trained["chosen_length"], trained["rejected_length"])
    assert LengthLimit(bare, None, longest).too_long([pair]) == [False]
    assert LengthLimit(bare, None, longest - 1).too_long([pair]) == [True]
    assert LengthLimit(bare, trained["prompt_length"] - 1, None).too_long([pair]) == [True]
    assert tokenizer_identity(bare) != tokenizer_identity(tiny_tokenizer)


def test_skipped_records_are_named_in_the_manifest(tmp_path, monkeypatch):
    """A count of records dropped as too_few_completions (or empty, tied, duplicate) without a way to find
    them is no help: the manifest names the first few of each reason, the same with worker processes."""
    records = sample_records()[:30]
    records[2] = {**records[2], "completions": records[2]["completions"][:1]}
    records[5] = {**records[5], "instruction": "   "}
    records[7] = {**records[7], "completions": [{**c, "response": ""} for c in records[7]["completions"]]}
    records[9] = dict(records[1])
    source = write_jsonl(tmp_path / "in.jsonl", records)
    cfg = config(source, decontaminate=False)
    manifests = [manifest_of(prepare_dataset(cfg, tmp_path / "single", progress=False, workers=1))]
    monkeypatch.setattr(binarize_module, "PARALLEL_MIN_BYTES", 1)
    monkeypatch.setattr(pool_module, "PARALLEL_CHUNK_BYTES", 20_000)
    manifests.append(manifest_of(prepare_dataset(cfg, tmp_path / "parallel", progress=False, workers=2)))
    for manifest in manifests:
        examples = manifest["drop_examples"]
        assert [e["location"] for e in examples["too_few_completions"]] == [f"{source}:3", f"{source}:8"]
        assert "1 usable of 1" in examples["too_few_completions"][0]["detail"]
        assert [e["location"] for e in examples["empty_prompt"]] == [f"{source}:6"]
        assert [e["location"] for e in examples["duplicate"]] == [f"{source}:10"]
        assert sum(map(len, examples.values())) == manifest["counts"]["dropped"]
    assert manifests[0]["drop_examples"] == manifests[1]["drop_examples"]


def test_files_with_a_utf8_byte_order_mark_read_like_files_without(tmp_path, monkeypatch):
    """Editors and Windows tools write a BOM first; json.load reads through it, orjson (optional) does not,
    so without care the first record (JSONL) or the whole array (JSON) turned malformed with orjson only."""
    records = sample_records()[:20]
    plain = prepare_dataset(config(write_jsonl(tmp_path / "plain.jsonl", records), decontaminate=False),
                            tmp_path / "out-plain", progress=False)
    jsonl = tmp_path / "bom.jsonl"
    jsonl.write_bytes(b"\xef\xbb\xbf" + (tmp_path / "plain.jsonl").read_bytes())
    array = tmp_path / "bom.json"
    array.write_bytes(b"\xef\xbb\xbf" + json.dumps(records, indent=1).encode("utf-8"))
    for path in (jsonl, array):
        prepared = prepare_dataset(config(path, decontaminate=False), tmp_path / f"out-{path.suffix}",
                                   progress=False)
        assert prepared.fingerprint == plain.fingerprint, path
    # The worker processes read the first chunk of a large file the same way.
    monkeypatch.setattr(binarize_module, "PARALLEL_MIN_BYTES", 1)
    monkeypatch.setattr(pool_module, "PARALLEL_CHUNK_BYTES", 20_000)
    parallel = prepare_dataset(config(jsonl, decontaminate=False), tmp_path / "out-parallel", progress=False,
                               workers=2)
    assert parallel.fingerprint == plain.fingerprint


def test_jsonl_export_of_unscored_pairs_is_json_and_reads_back(tmp_path):
    """Binarized rows without scores carry NaN; the JSONL export writes null (NaN is not JSON: orjson, jq and
    our own reader refused the export), and binarizing the export gives the same pairs."""
    rows = [{"prompt": "Capital of Peru?", "chosen": "Lima.", "rejected": "Quito."},
            {"prompt": "2+2?", "chosen": "4", "rejected": "5", "score_chosen": 9.0, "score_rejected": 2.0}]
    prepared = prepare_dataset(config(write_jsonl(tmp_path / "in.jsonl", rows), export="jsonl", test_size=0.01),
                               tmp_path / "out", progress=False)
    exported = prepared.dataset_dir / "export" / "train.jsonl"
    lines = exported.read_text(encoding="utf-8").splitlines()
    strict = [json.loads(line, parse_constant=lambda name: pytest.fail(f"{name} in the export")) for line in lines]
    assert {row["prompt"]: row["score_chosen"] for row in strict} == {"Capital of Peru?": None, "2+2?": 9.0}
    again = prepare_dataset(config(exported, test_size=0.01), tmp_path / "again", progress=False)
    assert again.fingerprint == prepared.fingerprint


VERBOSE_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '[' + message['role'] + '] Read the whole message carefully before you answer it. ' + message['content'] }}"
    "{{ eos_token }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '[assistant] ' }}{% endif %}"
)


def test_model_chat_template_is_what_the_length_limits_count_and_part_of_the_key(tmp_path, tiny_tokenizer):
    """model.chat_template (a Jinja file here, much longer than the tokenizer's own ChatML) is what training
    renders: the length filter counts with it, and the dataset's key and tokenizer identity follow it."""
    import copy

    from datasets import load_from_disk

    from orpo.chat_template import apply_chat_template_config
    from orpo.collate import tokenize_pair
    from orpo.data.binarize import default_dataset_dir

    source = write_jsonl(tmp_path / "in.jsonl", sample_records()[:40])
    template_file = tmp_path / "verbose.jinja"
    template_file.write_text(VERBOSE_TEMPLATE, encoding="utf-8")
    trained_tokenizer = apply_chat_template_config(copy.deepcopy(tiny_tokenizer), str(template_file))
    unlimited = prepare_dataset(config(source, decontaminate=False), tmp_path / "all", progress=False)
    rows = [row for split in ("train", "test") for row in load_from_disk(str(unlimited.dataset_dir))[split]]
    trained_prompt = [tokenize_pair(row, trained_tokenizer, max_length=100_000, max_prompt_length=99_999)
                      ["prompt_length"] for row in rows]
    limit = sorted(trained_prompt)[len(trained_prompt) // 2]
    cfg = config(source, max_prompt_tokens=limit, decontaminate=False)

    own = prepare_dataset(cfg, tmp_path / "own", tokenizer=tiny_tokenizer, progress=False)
    overridden = prepare_dataset(cfg, tmp_path / "override", tokenizer=tiny_tokenizer, progress=False,
                                 chat_template=str(template_file))
    kept = overridden.counts["train"] + overridden.counts["test"]
    assert kept == sum(length <= limit for length in trained_prompt)  # exactly the pairs training sees as fitting
    assert kept < own.counts["train"] + own.counts["test"]
    assert manifest_of(overridden)["tokenizer"] != manifest_of(own)["tokenizer"]
    assert tiny_tokenizer.chat_template != VERBOSE_TEMPLATE  # the caller's tokenizer is left as it was

    key = dataset_key(cfg, chat_template=str(template_file))
    assert key != dataset_key(cfg) and manifest_of(overridden)["dataset_key"] == key
    assert default_dataset_dir(cfg, tmp_path, chat_template=str(template_file)).name == key
    assert dataset_key(cfg, chat_template="zephyr") not in (key, dataset_key(cfg))
    template_file.write_text(VERBOSE_TEMPLATE.replace("carefully", "slowly"), encoding="utf-8")
    assert dataset_key(cfg, chat_template=str(template_file)) != key  # the file's content, not its path
    # Without length limits the template changes nothing in the data: the key stays.
    no_limits = config(source, decontaminate=False)
    assert dataset_key(no_limits, chat_template=str(template_file)) == dataset_key(no_limits)


def test_prefect_cache_key_and_directory_follow_model_chat_template(tmp_path):
    from orpo.config import PipelineConfig
    from tasks.prepare import _dataset_cache_key, dataset_dir_for

    def pipeline(template):
        return PipelineConfig.model_validate({
            "workdir": str(tmp_path),
            "data": {"source": str(SAMPLE), "decontaminate": False, "max_length": 256, "tokenizer": "builtin:tiny-llama"},
            "model": {"chat_template": template},
        })

    configs = [pipeline(None), pipeline("zephyr"), pipeline("chatml")]
    directories = [dataset_dir_for(c) for c in configs]
    assert len(set(directories)) == 3
    for directory in directories:  # the cache key is only stable while its dataset is on disk
        directory.mkdir(parents=True)
        (directory / "manifest.json").write_text("{}", encoding="utf-8")
    assert len({_dataset_cache_key(None, {"config": c}) for c in configs}) == 3


@pytest.mark.parametrize(
    ("hub_id", "train_name", "test_name"),
    [
        ("HuggingFaceH4/ultrafeedback_binarized", "train_prefs", "test_prefs"),
        ("trl-lib/ultrafeedback_binarized", "train", "test"),
        ("argilla/ultrafeedback-binarized-preferences-cleaned", "train", None),  # no test split: our hash splits
    ],
)
def test_hub_sources_keep_their_own_train_test_split(tmp_path, monkeypatch, sample_dataset, hub_id, train_name,
                                                     test_name):
    """A hub dataset's public test prompts never land in training: a recognised train/test pair is kept (a
    prompt in both stays in test), instead of re-splitting everything by a hash of prompt_id."""
    import datasets
    from datasets import Dataset, DatasetDict, concatenate_datasets, load_from_disk

    rows = concatenate_datasets([load_from_disk(str(sample_dataset[1].dataset_dir))[s] for s in ("train", "test")])
    assert len(rows) >= 30
    train_rows, test_rows = rows.select(range(20)), rows.select(range(20, 30))
    if test_name is None:
        splits = {train_name: rows}
    else:
        # One test prompt also in the train split; and an SFT split that is not read.
        splits = {train_name: concatenate_datasets([train_rows, test_rows.select([0])]), test_name: test_rows,
                  "train_sft": Dataset.from_list([{"prompt": "unused"}])}
    saved = tmp_path / "saved"
    DatasetDict(splits).save_to_disk(str(saved))
    asked = []

    def load_dataset(path, split=None, revision=None, streaming=False, **kwargs):
        asked.append((path, revision, streaming))
        on_disk = load_from_disk(str(saved))
        return on_disk[split] if split else on_disk

    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    prepared = prepare_dataset(config(hub_id, test_size=0.5, decontaminate=False), tmp_path / "out", progress=False)
    assert set(asked) == {(hub_id, None, True)}
    out = load_from_disk(str(prepared.dataset_dir))
    ids = {split: sorted(out[split]["prompt_id"]) for split in ("train", "test")}
    if test_name is None:
        assert ids["test"] and sorted(ids["train"] + ids["test"]) == sorted(rows["prompt_id"])
    else:
        assert ids == {"train": sorted(train_rows["prompt_id"]), "test": sorted(test_rows["prompt_id"])}
        assert manifest_of(prepared)["dropped"]["duplicate"] == 1
