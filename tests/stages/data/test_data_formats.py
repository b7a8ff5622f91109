"""stages.data: reading files, detecting formats, converting records, and the errors for bad input.

Two halves: small files written into tmp_path (every reader, every error message), and the real
public samples in ../shared/data with their exact counts pinned (marked ``data``; skipped when
the folder is absent).
"""

from __future__ import annotations

import gzip
import hashlib
import json
from pathlib import Path

import pytest

from stages.data import FORMATS, DataError, fingerprint_source, load_records
from stages.data.records import KTOExample, Message, PreferencePair, PromptExample, SFTExample

SHARED_DATA = Path(__file__).resolve().parents[3].parent / "shared" / "data"


# --- helpers ----------------------------------------------------------------------------------------


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def write_json(path: Path, rows) -> Path:
    path.write_text(json.dumps(rows), encoding="utf-8")
    return path


def user(text: str) -> Message:
    return Message("user", text)


def assistant(text: str) -> Message:
    return Message("assistant", text)


ALPACA_ROWS = [
    {"instruction": "Add.", "input": "2 and 3", "output": "5"},
    {"instruction": "Say hi.", "input": "", "output": "hi"},
]


# --- readers: file types and locations ----------------------------------------------------------------


def test_jsonl_gz_round_trip(tmp_path: Path) -> None:
    path = tmp_path / "a.jsonl.gz"
    with gzip.open(path, "wt", encoding="utf-8") as f:
        f.writelines(json.dumps(r) + "\n" for r in ALPACA_ROWS)
    data = load_records(path, "sft")
    assert data.format == "alpaca"
    assert data.records[0] == SFTExample((user("Add.\n\n2 and 3"), assistant("5")))
    assert data.records[1] == SFTExample((user("Say hi."), assistant("hi")))


def test_json_gz_and_object_holding_one_list(tmp_path: Path) -> None:
    path = tmp_path / "a.json.gz"
    with gzip.open(path, "wt", encoding="utf-8") as f:
        json.dump({"data": ALPACA_ROWS}, f)
    assert len(load_records(path, "sft").records) == 2


def test_parquet_round_trip(tmp_path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = tmp_path / "p.parquet"
    rows = [{"prompt": "Q1", "chosen": "good", "rejected": "bad"}, {"prompt": "Q2", "chosen": "yes", "rejected": "no"}]
    pq.write_table(pa.Table.from_pylist(rows), path)
    data = load_records(path, "preference")
    assert data.format == "preference"
    assert data.records[1] == PreferencePair((user("Q2"),), (assistant("yes"),), (assistant("no"),))


def test_parquet_error_names_record(tmp_path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = tmp_path / "p.parquet"
    pq.write_table(pa.Table.from_pylist([{"question": "q", "answer": "a"}, {"question": "q", "answer": None}]), path)
    with pytest.raises(DataError, match=r"p\.parquet record 2: field 'answer': expected a string, got null"):
        load_records(path, "prompt")


def test_save_to_disk_folder_round_trip(tmp_path: Path) -> None:
    import datasets

    rows = [{"messages": [{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": f"a{i}"}]} for i in range(3)]
    datasets.Dataset.from_list(rows).save_to_disk(str(tmp_path / "saved"))
    data = load_records(tmp_path / "saved", "sft")
    assert data.format == "messages"
    assert data.files == [str(tmp_path / "saved")]
    assert [r.messages[-1].content for r in data.records] == ["a0", "a1", "a2"]


def test_saved_dataset_dict_asks_for_a_split(tmp_path: Path) -> None:
    import datasets

    ds = datasets.Dataset.from_list([{"question": "q", "answer": "a"}])
    datasets.DatasetDict({"train": ds, "test": ds}).save_to_disk(str(tmp_path / "dd"))
    with pytest.raises(DataError, match="point the path at one split folder"):
        load_records(tmp_path / "dd", "prompt")
    assert len(load_records(tmp_path / "dd" / "test", "prompt").records) == 1


def test_folder_reads_every_data_file_sorted(tmp_path: Path) -> None:
    write_jsonl(tmp_path / "b.jsonl", [{"question": "second", "answer": "2"}])
    write_json(tmp_path / "a.json", [{"question": "first", "answer": "1"}])
    (tmp_path / "notes.txt").write_text("not data")
    (tmp_path / ".hidden.jsonl").write_text("{broken")
    data = load_records(tmp_path, "prompt")
    assert data.files == [str(tmp_path / "a.json"), str(tmp_path / "b.jsonl")]
    assert [r.answer for r in data.records] == ["1", "2"]
    assert data.read == 2


def test_folder_without_data_files(tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(DataError, match="folder holds no data files"):
        load_records(tmp_path, "sft")


def test_missing_path_and_unsupported_suffix(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="no such file or folder"):
        load_records(tmp_path / "nope.jsonl", "sft")
    (tmp_path / "x.csv").write_text("a,b\n")
    with pytest.raises(DataError, match=r"unsupported file type; expected \.jsonl\.gz"):
        load_records(tmp_path / "x.csv", "sft")


def test_corrupt_gzip_and_json_that_is_not_a_list(tmp_path: Path) -> None:
    (tmp_path / "x.jsonl.gz").write_bytes(b"not gzip at all")
    with pytest.raises(DataError, match=r"x\.jsonl\.gz: cannot read file"):
        load_records(tmp_path / "x.jsonl.gz", "sft")
    write_json(tmp_path / "y.json", {"a": [1], "b": [2]})
    with pytest.raises(DataError, match=r"y\.json: expected a JSON list of records .*got an object with keys \['a', 'b'\]"):
        load_records(tmp_path / "y.json", "sft")


def test_blank_lines_are_not_records_but_keep_numbering(tmp_path: Path) -> None:
    path = tmp_path / "x.jsonl"
    path.write_text('{"question": "q", "answer": "a"}\n\n{"question": "q", "answer": 3}\n')
    with pytest.raises(DataError) as err:
        load_records(path, "prompt")
    assert err.value.line == 3


def test_unicode_line_separator_inside_a_string(tmp_path: Path) -> None:
    # U+2028 is legal inside a JSON string; it must not split the line.
    path = tmp_path / "x.jsonl"
    path.write_text(json.dumps({"question": "a\u2028b", "answer": "c"}, ensure_ascii=False) + "\n", encoding="utf-8")
    assert load_records(path, "prompt").records[0].prompt[0].content == "a\u2028b"


# --- errors -------------------------------------------------------------------------------------------


def test_broken_json_line_names_the_line(tmp_path: Path) -> None:
    path = tmp_path / "x.jsonl"
    path.write_text('{"question": "q", "answer": "a"}\n{"question": "q", "answer": "a"}\n{"question": "q" "answer": 1}\n')
    with pytest.raises(DataError, match=r"x\.jsonl line 3: invalid JSON \(Expecting ','") as err:
        load_records(path, "prompt")
    assert (err.value.path, err.value.line, err.value.field) == (str(path), 3, None)


def test_broken_json_file_names_the_line(tmp_path: Path) -> None:
    path = tmp_path / "x.json"
    path.write_text('[\n{"question": "q", "answer": "a"},\n{"question": "q",, }\n]')
    with pytest.raises(DataError, match=r"x\.json line 3: invalid JSON"):
        load_records(path, "prompt")


def test_wrong_type_message(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "x.jsonl", [ALPACA_ROWS[0], {"instruction": "i", "input": "", "output": 7}])
    with pytest.raises(DataError) as err:
        load_records(path, "sft")
    assert str(err.value) == f"{path} line 2: field 'output': expected a string, got int"
    assert (err.value.line, err.value.field) == (2, "output")


def test_json_list_errors_name_the_record(tmp_path: Path) -> None:
    path = write_json(tmp_path / "x.json", [ALPACA_ROWS[0], {"instruction": "i", "input": 1, "output": "o"}])
    with pytest.raises(DataError, match=r"x\.json record 2: field 'input': expected a string, got int") as err:
        load_records(path, "sft")
    assert err.value.unit == "record"


def test_missing_field_names_it_and_lists_the_record_fields(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "x.jsonl", [{"instruction": "i", "output": "o"}, {"instruction": "i", "input": "x"}])
    expected = r"line 2: field 'output': missing; format 'alpaca' requires it \(the record has: instruction, input\)"
    with pytest.raises(DataError, match=expected):
        load_records(path, "sft", format="alpaca")


@pytest.mark.parametrize("content", ["", "\n\n", "[]"])
def test_empty_file(tmp_path: Path, content: str) -> None:
    path = tmp_path / ("x.json" if content == "[]" else "x.jsonl")
    path.write_text(content)
    with pytest.raises(DataError, match=r"x\.jsonl?: file is empty"):
        load_records(path, "sft")


def test_unknown_sharegpt_role(tmp_path: Path) -> None:
    rows = [{"conversations": [{"from": "human", "value": "hi"}, {"from": "robot", "value": "beep"}]}]
    path = write_json(tmp_path / "x.json", rows)
    expected = (
        r"record 1: field 'conversations\[1\]\.from': unknown role 'robot'; "
        "allowed: system, human, user, gpt, assistant, chatgpt, bing, bard"
    )
    with pytest.raises(DataError, match=expected):
        load_records(path, "sft")


def test_format_that_cannot_give_the_kind(tmp_path: Path) -> None:
    path = write_json(tmp_path / "x.json", ALPACA_ROWS)
    with pytest.raises(DataError, match=r"format 'alpaca' cannot give 'preference' records \(it gives: sft, prompt\)"):
        load_records(path, "preference")
    with pytest.raises(DataError, match="format 'alpaca' cannot give 'kto'"):
        load_records(path, "kto", format="alpaca")


def test_plain_sharegpt_cannot_give_preference(tmp_path: Path) -> None:
    rows = [{"conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "yo"}]}]
    path = write_json(tmp_path / "x.json", rows)
    with pytest.raises(DataError, match="field 'chosen': missing; preference records from format 'sharegpt' need pairwise rows"):
        load_records(path, "preference")


def test_detection_failure_lists_known_formats(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "x.jsonl", [{"foo": 1, "bar": 2}])
    with pytest.raises(DataError) as err:
        load_records(path, "sft")
    message = str(err.value)
    assert "cannot detect the data format" in message and "fields: foo, bar" in message
    for name in FORMATS:
        assert name in message
    assert "Set `format:`" in message


def test_detection_points_at_a_record_unlike_the_first(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "x.jsonl", [ALPACA_ROWS[0], ALPACA_ROWS[1], {"question": "q", "answer": "a"}])
    with pytest.raises(DataError, match=r"x\.jsonl line 3: does not look like format 'alpaca'"):
        load_records(path, "sft")


def test_unknown_format_and_kind(tmp_path: Path) -> None:
    path = write_json(tmp_path / "x.json", ALPACA_ROWS)
    with pytest.raises(DataError, match="unknown format 'alpaka'; known formats: alpaca, dolly"):
        load_records(path, "sft", format="alpaka")
    with pytest.raises(ValueError, match="unknown record kind 'rl'; expected one of: sft, preference, prompt, kto"):
        load_records(path, "rl")


def test_non_object_record(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "x.jsonl", [ALPACA_ROWS[0], ["a", "list"]])
    with pytest.raises(DataError, match=r"line 2: expected a JSON object, got list"):
        load_records(path, "sft", format="alpaca")


def test_label_must_be_bool_and_margin_a_number(tmp_path: Path) -> None:
    kto = write_jsonl(tmp_path / "k.jsonl", [{"prompt": "p", "completion": "c", "label": "yes"}])
    with pytest.raises(DataError, match=r"field 'label': expected a bool \(true/false\), got string"):
        load_records(kto, "kto")
    pref = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "p", "chosen": "a", "rejected": "b", "margin": True}])
    with pytest.raises(DataError, match="field 'margin': expected a number, got bool"):
        load_records(pref, "preference")


def test_hh_transcript_must_start_with_human(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "x.jsonl", [{"chosen": "hello", "rejected": "bye"}])
    with pytest.raises(DataError, match="field 'chosen': expected a transcript"):
        load_records(path, "preference", format="hh_rlhf")


# --- formats ------------------------------------------------------------------------------------------


def test_explicit_format_overrides_detection(tmp_path: Path) -> None:
    # {question, answer} is detected as question_answer; as `prompt` the answer stays a reference.
    path = write_jsonl(tmp_path / "x.jsonl", [{"question": "2+2?", "answer": "4"}])
    assert load_records(path, "prompt").format == "question_answer"
    data = load_records(path, "prompt", format="prompt")
    assert data.format == "prompt"
    assert data.records == [PromptExample((user("2+2?"),), "4")]


def test_alpaca_system_and_history(tmp_path: Path) -> None:
    row = {"instruction": "and 3?", "input": "", "output": "9", "system": "Be terse.", "history": [["square of 2?", "4"]]}
    data = load_records(write_json(tmp_path / "x.json", [row]), "sft")
    assert data.records[0].messages == (
        Message("system", "Be terse."),
        user("square of 2?"),
        assistant("4"),
        user("and 3?"),
        assistant("9"),
    )


def test_dolly_context_joins_instruction(tmp_path: Path) -> None:
    rows = [{"instruction": "Who?", "context": "Ann met Bob.", "response": "Ann", "category": "closed_qa"}]
    data = load_records(write_jsonl(tmp_path / "x.jsonl", rows), "prompt")
    assert data.format == "dolly"
    assert data.records[0] == PromptExample((user("Who?\n\nAnn met Bob."),))


def test_sharegpt_pairwise_gives_three_kinds(tmp_path: Path) -> None:
    row = {
        "conversations": [{"from": "system", "value": "S"}, {"from": "human", "value": "Q"}],
        "chosen": {"from": "gpt", "value": "good"},
        "rejected": {"from": "gpt", "value": "bad"},
    }
    path = write_json(tmp_path / "x.json", [row])
    prompt = (Message("system", "S"), user("Q"))
    assert load_records(path, "preference").records == [PreferencePair(prompt, (assistant("good"),), (assistant("bad"),))]
    assert load_records(path, "sft").records == [SFTExample(prompt + (assistant("good"),))]
    assert load_records(path, "prompt").records == [PromptExample(prompt)]


def test_sharegpt_pairwise_chosen_must_be_assistant(tmp_path: Path) -> None:
    row = {
        "conversations": [{"from": "human", "value": "Q"}],
        "chosen": {"from": "human", "value": "x"},
        "rejected": {"from": "gpt", "value": "y"},
    }
    with pytest.raises(DataError, match="field 'chosen': expected an assistant message"):
        load_records(write_json(tmp_path / "x.json", [row]), "preference")


def test_conversation_skips_are_counted(tmp_path: Path) -> None:
    rows = [
        {"conversations": [{"from": "human", "value": "Q"}, {"from": "gpt", "value": "A"}]},
        {"conversations": [{"from": "human", "value": "Q"}]},
        {"conversations": [{"from": "human", "value": "Q"}, {"from": "gpt", "value": "A"}, {"from": "human", "value": "more"}]},
        {"conversations": [{"from": "human", "value": "Q"}, {"from": "gpt", "value": "  "}]},
        {"conversations": [{"from": "system", "value": "S"}, {"from": "gpt", "value": "A"}]},
    ]
    data = load_records(write_json(tmp_path / "x.json", rows), "sft")
    assert len(data.records) == 1 and data.read == 5
    assert data.skipped == {
        "no_assistant_turn": 1,
        "last_turn_not_assistant": 1,
        "empty_response": 1,
        "prompt_not_ending_with_user": 1,
    }
    prompts = load_records(write_json(tmp_path / "x.json", rows), "prompt")
    # The prompt of a conversation is everything but the final assistant turn.
    assert [len(r.prompt) for r in prompts.records] == [1, 1, 3, 1]
    assert prompts.skipped == {"prompt_not_ending_with_user": 1}


def test_messages_with_label_give_kto_and_sft_from_true_rows(tmp_path: Path) -> None:
    rows = [
        {"messages": [{"role": "prompter", "content": "Q"}, {"role": "assistant", "content": "good"}], "label": True},
        {"messages": [{"role": "user", "content": "Q"}, {"role": "assistant", "content": "bad"}], "label": False},
    ]
    path = write_json(tmp_path / "x.json", rows)
    kto = load_records(path, "kto")
    assert kto.records == [
        KTOExample((user("Q"),), (assistant("good"),), True),
        KTOExample((user("Q"),), (assistant("bad"),), False),
    ]
    sft = load_records(path, "sft")
    assert sft.records == [SFTExample((user("Q"), assistant("good")))]
    assert sft.skipped == {"label_false": 1}


def test_messages_without_label_cannot_give_kto(tmp_path: Path) -> None:
    rows = [{"messages": [{"role": "user", "content": "Q"}, {"role": "assistant", "content": "A"}]}]
    with pytest.raises(DataError, match="field 'label': missing; format 'messages' requires it"):
        load_records(write_json(tmp_path / "x.json", rows), "kto")


def test_messages_content_must_be_string(tmp_path: Path) -> None:
    rows = [{"messages": [{"role": "user", "content": None}]}]
    with pytest.raises(DataError, match=r"field 'messages\[0\]\.content': expected a string, got null"):
        load_records(write_json(tmp_path / "x.json", rows), "sft")


def test_prompt_completion_strings_and_lists(tmp_path: Path) -> None:
    rows = [
        {"prompt": "Q", "completion": "A", "label": True},
        {"prompt": [{"role": "user", "content": "Q2"}], "completion": [{"role": "assistant", "content": "A2"}], "label": False},
    ]
    path = write_jsonl(tmp_path / "x.jsonl", rows)
    assert load_records(path, "kto").records[1] == KTOExample((user("Q2"),), (assistant("A2"),), False)
    assert load_records(path, "sft").records == [SFTExample((user("Q"), assistant("A")))]
    assert len(load_records(path, "prompt").records) == 2


def test_preference_margin_scores_and_skips(tmp_path: Path) -> None:
    rows = [
        {"prompt": "Q", "chosen": "a", "rejected": "b", "margin": 2},
        {"prompt": "Q", "chosen": "a", "rejected": "b", "score_chosen": 8.0, "score_rejected": 5.5},
        {"prompt": "Q", "chosen": "same", "rejected": "same"},
        {"prompt": "Q", "chosen": "", "rejected": "b"},
        {"prompt": " ", "chosen": "a", "rejected": "b"},
    ]
    data = load_records(write_jsonl(tmp_path / "x.jsonl", rows), "preference")
    assert [r.margin for r in data.records] == [2.0, 2.5]
    assert data.skipped == {"chosen_equals_rejected": 1, "empty_response": 1, "empty_prompt": 1}
    assert data.read == 5


def test_preference_implicit_prompt(tmp_path: Path) -> None:
    shared = [{"role": "user", "content": "Q"}]
    row = {
        "chosen": shared + [{"role": "assistant", "content": "a"}],
        "rejected": shared + [{"role": "assistant", "content": "b"}],
    }
    data = load_records(write_jsonl(tmp_path / "x.jsonl", [row]), "preference")
    assert data.format == "preference"
    assert data.records == [PreferencePair((user("Q"),), (assistant("a"),), (assistant("b"),))]


def test_hh_rlhf_parsing(tmp_path: Path) -> None:
    head = "\n\nHuman: Hi\n\nAssistant: Hello!\n\nHuman: Tell me a joke"
    rows = [
        {"chosen": head + "\n\nAssistant: Knock knock.", "rejected": head + "\n\nAssistant: No."},
        # The same speaker twice in a row is one message (HH-RLHF has such rows).
        {"chosen": "\n\nHuman: Q\n\nAssistant: A", "rejected": "\n\nHuman: Q\n\nAssistant: B1\n\nAssistant: B2"},
        {"chosen": "\n\nHuman: Q\n\nAssistant: A", "rejected": "\n\nHuman: Q\n\nAssistant: A"},
        {"chosen": "\n\nHuman: Q\n\nAssistant: A", "rejected": "\n\nHuman: Q\n\nAssistant:"},
    ]
    path = write_jsonl(tmp_path / "x.jsonl", rows)
    data = load_records(path, "preference")
    assert data.format == "hh_rlhf"
    assert data.records[0] == PreferencePair(
        (user("Hi"), assistant("Hello!"), user("Tell me a joke")), (assistant("Knock knock."),), (assistant("No."),)
    )
    assert data.records[1].rejected == (assistant("B1\n\nB2"),)
    assert data.skipped == {"chosen_equals_rejected": 1, "empty_response": 1}
    assert load_records(path, "sft").records[0].messages[-1] == assistant("Knock knock.")
    assert len(load_records(path, "prompt").records) == 4


def test_question_answer_keeps_answer(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "x.jsonl", [{"question": "2+2?", "answer": "2+2=4\n#### 4"}])
    assert load_records(path, "prompt").records == [PromptExample((user("2+2?"),), "2+2=4\n#### 4")]
    assert load_records(path, "sft").records == [SFTExample((user("2+2?"), assistant("2+2=4\n#### 4")))]


def test_prompt_format_variants(tmp_path: Path) -> None:
    rows = [
        "bare string",
        {"prompt": "p"},
        {"text": "t"},
        {"turns": ["first", "second"], "reference": ["ref1", "ref2"]},
        {"prompt": "", "system": "S"},
    ]
    data = load_records(write_jsonl(tmp_path / "x.jsonl", rows), "prompt")
    assert data.format == "prompt"
    assert data.records == [
        PromptExample((user("bare string"),)),
        PromptExample((user("p"),)),
        PromptExample((user("t"),)),
        PromptExample((user("first"),), "ref1"),
    ]
    assert data.skipped == {"empty_prompt": 1}
    with pytest.raises(DataError, match="format 'prompt' cannot give 'sft'"):
        load_records(tmp_path / "x.jsonl", "sft")


def _node(role: str, text: str, replies=(), rank=None, deleted=False, synthetic=False) -> dict:
    node = {"role": role, "text": text, "deleted": deleted, "synthetic": synthetic, "replies": list(replies)}
    if rank is not None:
        node["rank"] = rank
    return node


OASST_TREE = {
    "message_tree_id": "t1",
    "tree_state": "ready_for_export",
    "prompt": _node(
        "prompter",
        "Q",
        [
            _node("assistant", "worst", rank=2),
            _node("assistant", "best", rank=0, replies=[_node("prompter", "Q2", [_node("assistant", "A2")])]),
            _node("assistant", "middle", rank=1),
            _node("assistant", "gone", rank=0, deleted=True),
        ],
    ),
}


def test_oasst_tree_sft_follows_the_top_ranked_path(tmp_path: Path) -> None:
    data = load_records(write_jsonl(tmp_path / "t.jsonl", [OASST_TREE]), "sft")
    assert data.format == "oasst_tree"
    assert data.records == [
        SFTExample((user("Q"), assistant("best"))),
        SFTExample((user("Q"), assistant("best"), user("Q2"), assistant("A2"))),
    ]
    assert data.skipped == {"deleted": 1, "not_top_ranked": 2}
    prompts = load_records(tmp_path / "t.jsonl", "prompt")
    assert [r.prompt[-1].content for r in prompts.records] == ["Q", "Q2"]


def test_oasst_tree_preference_pairs_every_ranked_sibling(tmp_path: Path) -> None:
    data = load_records(write_jsonl(tmp_path / "t.jsonl", [OASST_TREE]), "preference")
    pairs = [(r.chosen[0].content, r.rejected[0].content) for r in data.records]
    assert pairs == [("best", "middle"), ("best", "worst"), ("middle", "worst")]
    assert all(r.prompt == (user("Q"),) for r in data.records)
    assert data.skipped == {"deleted": 1}


def test_oasst_tree_ties_unready_and_bad_role(tmp_path: Path) -> None:
    tied = {"prompt": _node("prompter", "Q", [_node("assistant", "a", rank=0), _node("assistant", "b", rank=0)])}
    unready = dict(OASST_TREE, tree_state="growing")
    data = load_records(write_jsonl(tmp_path / "t.jsonl", [tied, unready]), "preference", format="oasst_tree")
    assert data.records == [] and data.skipped == {"tied_rank": 1, "tree_not_ready": 1}
    bad = {"prompt": _node("prompter", "Q", [_node("prompter", "again")])}
    with pytest.raises(DataError, match=r"field 'prompt\.replies\[0\]\.role': expected role 'assistant'"):
        load_records(write_jsonl(tmp_path / "b.jsonl", [bad]), "sft", format="oasst_tree")


# --- loader: limit, builtin hook, fingerprints -------------------------------------------------------------


def test_limit_stops_conversion(tmp_path: Path) -> None:
    rows = [{"question": f"q{i}", "answer": "a"} for i in range(10)]
    data = load_records(write_jsonl(tmp_path / "x.jsonl", rows), "prompt", limit=3)
    assert len(data.records) == 3 and data.read == 3
    assert load_records(tmp_path / "x.jsonl", "prompt", limit=0).records == []


def test_limit_truncates_a_record_that_gives_many(tmp_path: Path) -> None:
    data = load_records(write_jsonl(tmp_path / "t.jsonl", [OASST_TREE]), "preference", limit=2)
    assert len(data.records) == 2 and data.read == 1


def test_fingerprint_source(tmp_path: Path) -> None:
    folder = tmp_path / "d"
    folder.mkdir()
    write_jsonl(folder / "a.jsonl", [{"question": "q", "answer": "a"}])
    write_jsonl(folder / "b.jsonl", [{"question": "q2", "answer": "b"}])
    before = fingerprint_source(str(folder))
    assert before == fingerprint_source(str(folder))
    assert fingerprint_source(str(folder / "a.jsonl")) != before
    write_jsonl(folder / "b.jsonl", [{"question": "q2", "answer": "c"}])
    assert fingerprint_source(str(folder)) != before


def test_every_format_is_registered() -> None:
    assert set(FORMATS) == {
        "alpaca",
        "dolly",
        "sharegpt",
        "messages",
        "prompt_completion",
        "hh_rlhf",
        "preference",
        "question_answer",
        "oasst_tree",
        "prompt",
    }


# --- real public data (../shared/data) ---------------------------------------------------------------------

HH = "preference/hh-rlhf/helpful-base/test.jsonl.gz"
OASST = "chat/oasst/en_100_tree.jsonl"
# 5 synthetic subtrees dropped; 282 lower-ranked replies; one group of 3 replies with no ranks.
OASST_TOP_PATH_SKIPS = {"synthetic": 5, "not_top_ranked": 282, "unranked_replies": 3}

# file, kind, detected format, records read, records used, skipped by reason
REAL_COUNTS = [
    (HH, "preference", "hh_rlhf", 2354, 2348, {"empty_response": 4, "chosen_equals_rejected": 2}),
    (HH, "sft", "hh_rlhf", 2354, 2354, {}),
    (HH, "prompt", "hh_rlhf", 2354, 2354, {}),
    ("preference/llamafactory/dpo_en_demo.json", "preference", "sharegpt", 300, 300, {}),
    ("preference/llamafactory/dpo_en_demo.json", "sft", "sharegpt", 300, 300, {}),
    ("preference/llamafactory/dpo_en_demo.json", "prompt", "sharegpt", 300, 300, {}),
    ("sft/alpaca/alpaca_en_demo.json", "sft", "alpaca", 999, 999, {}),
    ("sft/alpaca/alpaca_en_demo.json", "prompt", "alpaca", 999, 999, {}),
    ("sft/dolly/databricks-dolly-15k.first5.jsonl", "sft", "dolly", 5, 5, {}),
    ("chat/sharegpt/dummy_conversation.json", "sft", "sharegpt", 500, 500, {}),
    ("chat/sharegpt/dummy_conversation.json", "prompt", "sharegpt", 500, 500, {}),
    ("chat/messages/kto_en_demo.json", "kto", "messages", 300, 300, {}),
    ("chat/messages/kto_en_demo.json", "sft", "messages", 300, 150, {"label_false": 150}),
    ("chat/messages/kto_en_demo.json", "prompt", "messages", 300, 300, {}),
    (OASST, "sft", "oasst_tree", 100, 140, OASST_TOP_PATH_SKIPS),
    (OASST, "preference", "oasst_tree", 100, 732, {"synthetic": 5, "unranked_reply": 6}),
    (OASST, "prompt", "oasst_tree", 100, 197, OASST_TOP_PATH_SKIPS),
    ("verifiable/gsm8k/test.jsonl", "prompt", "question_answer", 1319, 1319, {}),
    ("verifiable/gsm8k/train.jsonl", "sft", "question_answer", 7473, 7473, {}),
    ("prompts/mt_bench/question.jsonl", "prompt", "prompt", 80, 80, {}),
    ("prompts/oasst/prompt_lottery_en_250_text.jsonl", "prompt", "prompt", 250, 250, {}),
]


@pytest.fixture
def shared_data() -> Path:
    if not SHARED_DATA.is_dir():
        pytest.skip(f"real data samples not found at {SHARED_DATA} (they live next to the repo, in shared/data)")
    return SHARED_DATA


@pytest.mark.data
@pytest.mark.parametrize(
    ("file", "kind", "fmt", "read", "used", "skipped"),
    REAL_COUNTS,
    ids=[f"{Path(row[0]).name}-{row[1]}" for row in REAL_COUNTS],
)
def test_real_file_counts(shared_data: Path, file: str, kind: str, fmt: str, read: int, used: int, skipped: dict) -> None:
    data = load_records(shared_data / file, kind)
    assert (data.format, data.read, len(data.records), data.skipped) == (fmt, read, used, skipped)
    assert all(isinstance(r, _KIND_TYPES[kind]) for r in data.records)


_KIND_TYPES = {"sft": SFTExample, "preference": PreferencePair, "prompt": PromptExample, "kto": KTOExample}


@pytest.mark.data
def test_real_hh_rlhf_equal_rows_and_turns(shared_data: Path) -> None:
    data = load_records(shared_data / "preference/hh-rlhf/helpful-base/test.jsonl.gz", "preference")
    first = data.records[0]
    assert first.prompt == (user("Do you know why turkeys became the official food of thanksgiving?"),)
    assert first.chosen[0].content.startswith("To be honest, I don\u2019t know")
    # Every pair: one final assistant turn each, the prompt ending on the user.
    assert all(len(r.chosen) == len(r.rejected) == 1 and r.prompt[-1].role == "user" for r in data.records)


@pytest.mark.data
def test_real_kto_labels_and_dpo_system_prompts(shared_data: Path) -> None:
    kto = load_records(shared_data / "chat/messages/kto_en_demo.json", "kto")
    assert sum(r.label for r in kto.records) == 150
    dpo = load_records(shared_data / "preference/llamafactory/dpo_en_demo.json", "preference")
    assert sum(r.prompt[0].role == "system" for r in dpo.records) == 80


@pytest.mark.data
def test_real_prompts_and_references(shared_data: Path) -> None:
    gsm8k = load_records(shared_data / "verifiable/gsm8k/test.jsonl", "prompt")
    assert all("\n#### " in r.answer for r in gsm8k.records)
    mt_bench = load_records(shared_data / "prompts/mt_bench/question.jsonl", "prompt")
    assert mt_bench.records[0].prompt[0].content.startswith("Compose an engaging travel blog post about a recent trip to Hawaii")
    assert sum(r.answer is not None for r in mt_bench.records) == 39
    lottery = load_records(shared_data / "prompts/oasst/prompt_lottery_en_250_text.jsonl", "prompt")
    assert lottery.records[0].prompt == (user("Can you tell me about GLaDOS?"),)


@pytest.mark.data
def test_real_oasst_pairs_prefer_lower_rank(shared_data: Path) -> None:
    data = load_records(shared_data / "chat/oasst/en_100_tree.jsonl", "preference", limit=10)
    assert len(data.records) == 10
    assert all(r.chosen[0].role == r.rejected[0].role == "assistant" for r in data.records)


@pytest.mark.data
def test_real_fingerprint_is_stable(shared_data: Path) -> None:
    path = str(shared_data / "sft/dolly/databricks-dolly-15k.first5.jsonl")
    file_sha = "161557df5bf13a3bd39b7208dcb403a58663d9fe80493a14559c00d7b56f1a09"  # from the data README
    assert fingerprint_source(path) == hashlib.sha256(file_sha.encode()).hexdigest()
