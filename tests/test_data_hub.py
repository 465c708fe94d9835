"""Dataset loaders of cpift.data.hub on small files in each hub schema, and their errors."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path
from typing import Any

import pytest

from cpift.data import EMBEDDED_TASKS, FORMATS, hub, load_task, read_rows
from cpift.errors import CpiftError, ParameterError

FIXTURES = Path(__file__).parent / "fixtures" / "datasets"


def spec(file: str, fmt: str, **extra: Any) -> dict[str, Any]:
    return {"name": fmt, "source": str(FIXTURES / file), "format": fmt, "n_train": 3, "n_eval": 2, **extra}


def prompts(examples) -> list[str]:
    return [json.dumps(e.prompt) for e in examples]


def write_jsonl(path: Path, rows: list[dict[str, Any]]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


FIXTURE_FORMATS = [("gsm8k.jsonl", "gsm8k"), ("codealpaca.json", "codealpaca"), ("logiqa.jsonl", "logiqa"),
                   ("alpaca.json", "alpaca"), ("ultrachat.parquet", "ultrachat"),
                   ("ultrachat_data.jsonl", "ultrachat")]


@pytest.mark.parametrize(("file", "fmt"), FIXTURE_FORMATS)
def test_every_fixture_loads(file: str, fmt: str) -> None:
    rows = len(read_rows(FIXTURES / file))
    assert 3 <= rows <= 6
    task = load_task(spec(file, fmt))
    assert task.name == fmt
    assert task.family == {"gsm8k": "math", "codealpaca": "code", "logiqa": "logic"}.get(fmt, "chat")
    assert task.metric == {"gsm8k": "exact_match", "logiqa": "accuracy"}.get(fmt, "none")
    assert len(task.eval) == min(2, rows // 2) and len(task.train) == min(3, rows - len(task.eval))
    assert not set(prompts(task.train)) & set(prompts(task.eval))
    for example in (*task.train, *task.eval):
        assert example.messages[0]["role"] == "user" and example.messages[-1]["role"] == "assistant"
        assert all(m["content"] for m in example.messages)
        assert example.meta["task"] == fmt and isinstance(example.meta["row"], int)


@pytest.mark.parametrize(("file", "fmt"), FIXTURE_FORMATS)
def test_deterministic_and_seeded(file: str, fmt: str) -> None:
    assert load_task(spec(file, fmt)).eval == load_task(spec(file, fmt)).eval
    assert load_task(spec(file, fmt)).train == load_task(spec(file, fmt)).train
    orders = {tuple(prompts(load_task(spec(file, fmt, seed=s, n_train=None)).train)) for s in range(6)}
    assert len(orders) > 1


def test_gsm8k_conversion_and_scoring() -> None:
    task = load_task(spec("gsm8k.jsonl", "gsm8k", n_train=None, n_eval=0))
    assert len(task.train) == 5 and task.eval == ()
    by_target = {e.target: e for e in task.train}
    assert set(by_target) == {"72", "10", "1250", "15", "624"}
    clips = by_target["72"]
    assert "<<" not in clips.answer and "####" not in clips.answer
    assert clips.answer.endswith("72 clips altogether in April and May.\nThe answer is 72.")
    assert clips.prompt[0]["content"].startswith("Natalia sold clips")
    for example in task.train:
        assert task.score(example, example.answer) == 1.0
        assert task.score(example, "The answer is 3.") == 0.0
    assert task.score(by_target["1250"], "They sell 1,250 pens.") == 1.0


def test_logiqa_conversion_and_scoring() -> None:
    task = load_task(spec("logiqa.jsonl", "logiqa", n_train=None, n_eval=0))
    youngest = next(e for e in task.train if "youngest" in e.prompt[0]["content"])
    assert youngest.prompt[0]["content"] == ("Anna is older than Ben. Ben is older than Carl.\nWho is the youngest?\n"
                                             "A. Anna\nB. Ben\nC. Carl\nD. Cannot be determined")
    assert youngest.answer == "Answer: C" and youngest.target == "C"
    for example in task.train:
        assert task.score(example, example.answer) == 1.0
        assert task.score(example, "Answer: A" if example.target != "A" else "Answer: D") == 0.0


def test_logiqa_letter_options_and_bad_rows_skipped(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    base = {"context": "c", "options": ["w", "x", "y", "z"]}
    rows = [{**base, "query": "q1", "correct_option": "B"}, {**base, "query": "q2", "correct_option": 7},
            {**base, "query": "q3", "correct_option": "2"}, {**base, "query": "q4", "correct_option": None}]
    task = load_task({"name": "l", "source": str(write_jsonl(tmp_path / "l.jsonl", rows)), "format": "logiqa",
                      "n_train": None, "n_eval": 0})
    assert sorted(e.target for e in task.train) == ["B", "C"]
    assert "skipped unusable rows" in caplog.text and "out of range" in caplog.text


def test_alpaca_and_codealpaca_prompts() -> None:
    task = load_task(spec("alpaca.json", "alpaca", n_train=None, n_eval=0))
    french = next(e for e in task.train if "French" in e.prompt[0]["content"])
    assert french.prompt[0]["content"] == "Translate the sentence into French.\n\nGood morning."
    assert french.answer == "Bonjour."
    painter = next(e for e in task.train if "painter" in e.prompt[0]["content"])
    assert painter.prompt[0]["content"] == "Name a famous painter."
    assert math.isnan(task.score(painter, painter.answer))
    code = load_task(spec("codealpaca.json", "codealpaca"))
    assert code.metric == "none" and "trained only" in code.description


def test_codealpaca_evaluated_on_embedded_code() -> None:
    task = load_task(spec("codealpaca.json", "codealpaca", eval_task="code", n_eval=4))
    assert task.metric == "pass@1" and len(task.eval) == 4 and len(task.train) == 3
    assert all(e.target.startswith("assert ") for e in task.eval)
    assert "embedded task 'code'" in task.description
    with pytest.raises(ParameterError, match="eval_task"):
        load_task(spec("codealpaca.json", "codealpaca", eval_task="chess"))


def test_ultrachat_turns() -> None:
    task = load_task(spec("ultrachat.parquet", "ultrachat", n_train=None, n_eval=0))
    lengths = sorted(len(e.messages) for e in task.train)
    assert lengths == [2, 2, 2, 4, 4]
    one = load_task(spec("ultrachat.parquet", "ultrachat", n_train=None, n_eval=0, max_turns=1))
    assert all(len(e.messages) == 2 for e in one.train)
    data = load_task(spec("ultrachat_data.jsonl", "ultrachat", n_train=None, n_eval=0))
    boiling = next(e for e in data.train if "boiling" in e.messages[0]["content"])
    assert [m["role"] for m in boiling.messages] == ["user", "assistant", "user", "assistant"]


def test_eval_set_is_stable_and_disjoint_when_carved() -> None:
    small = load_task(spec("gsm8k.jsonl", "gsm8k", n_train=1, n_eval=2))
    large = load_task(spec("gsm8k.jsonl", "gsm8k", n_train=3, n_eval=2))
    assert small.eval == large.eval and len(large.train) == 3
    assert not set(prompts(large.train)) & set(prompts(large.eval))


def test_split_directory_and_eval_source(tmp_path: Path) -> None:
    rows = [json.loads(line) for line in (FIXTURES / "gsm8k.jsonl").read_text().splitlines()]
    folder = tmp_path / "gsm"
    folder.mkdir()
    write_jsonl(folder / "train.jsonl", rows[:4])
    write_jsonl(folder / "test.jsonl", rows[3:])  # row 3 is in both: it must not be in train and eval
    task = load_task({"name": "g", "source": str(folder), "format": "gsm8k", "eval_split": "test",
                      "n_train": None, "n_eval": 5})
    assert len(task.eval) == 2 and len(task.train) == 3
    assert not set(prompts(task.train)) & set(prompts(task.eval))
    assert {e.meta["split"] for e in task.eval} == {"test"}
    other = load_task({"name": "g", "source": str(folder / "train.jsonl"), "format": "gsm8k",
                       "eval_source": str(folder / "test.jsonl"), "n_train": None, "n_eval": 5})
    assert sorted(prompts(other.eval)) == sorted(prompts(task.eval)) and len(other.train) == 3
    with pytest.raises(CpiftError, match=r"no file for split 'validation'.*eval_split"):
        load_task({"name": "g", "source": str(folder), "format": "gsm8k", "eval_split": "validation"})
    with pytest.raises(ParameterError, match="eval_split"):
        load_task({"name": "g", "source": str(folder / "train.jsonl"), "format": "gsm8k", "eval_split": "test"})


def test_custom_format_and_csv(tmp_path: Path) -> None:
    path = tmp_path / "qa.csv"
    path.write_text("q,a,t,sys\nWhat is 2+3?,It is 5.,5,Be brief.\nWhat is 4+4?,It is 8.,8,\nWhat is 1+1?,2,2,\n")
    columns = {"prompt": "q", "answer": "a", "target": "t", "system": "sys"}
    task = load_task({"name": "sums", "source": str(path), "format": "custom", "columns": columns,
                      "scorer": "final_number", "n_train": None, "n_eval": 1, "family": "math"})
    assert (task.family, task.metric) == ("math", "exact_match")
    examples = (*task.train, *task.eval)
    assert len(examples) == 3
    five = next(e for e in examples if e.target == "5")
    assert five.messages[0] == {"role": "system", "content": "Be brief."}
    assert all(task.score(e, e.answer) == 1.0 for e in examples)
    exact = load_task({"name": "sums", "source": str(path), "format": "custom", "columns": columns})
    assert exact.metric == "exact_match"
    untargeted = load_task({"name": "s", "source": str(path), "format": "custom",
                            "columns": {"prompt": "q", "answer": "a"}, "system": "You are terse."})
    assert untargeted.metric == "none"
    assert all(e.messages[0] == {"role": "system", "content": "You are terse."} for e in untargeted.train)
    with pytest.raises(CpiftError, match=r"no column 'question' \(columns.prompt\)"):
        load_task({"name": "s", "source": str(path), "format": "custom", "columns": {"prompt": "question", "answer": "a"}})


# ------------------------------------------------------------------------------------- errors


def test_missing_file_names_it(tmp_path: Path) -> None:
    missing = tmp_path / "nope.jsonl"
    with pytest.raises(CpiftError, match=r"nope\.jsonl.*'source'.*does not exist"):
        load_task({"name": "x", "source": str(missing), "format": "gsm8k"})
    with pytest.raises(CpiftError, match=r"nope\.jsonl.*'eval_source'"):
        load_task({"name": "x", "source": str(FIXTURES / "gsm8k.jsonl"), "format": "gsm8k",
                   "eval_source": str(missing)})


@pytest.mark.parametrize("content", ["", "\n\n", "[]"])
def test_empty_file_names_it(tmp_path: Path, content: str) -> None:
    path = tmp_path / "empty.json"
    path.write_text(content)
    with pytest.raises(CpiftError, match=r"empty\.json.*is empty"):
        load_task({"name": "x", "source": str(path), "format": "alpaca"})


def test_missing_column_names_it(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "g.jsonl", [{"question": "q", "solution": "#### 3"}])
    with pytest.raises(CpiftError, match=r"g\.jsonl.*no column 'answer'.*gsm8k.*question, solution"):
        load_task({"name": "x", "source": str(path), "format": "gsm8k"})
    path = write_jsonl(tmp_path / "u.jsonl", [{"conversation": []}])
    with pytest.raises(CpiftError, match=r"no column 'messages' or 'data'"):
        load_task({"name": "x", "source": str(path), "format": "ultrachat"})


def test_no_usable_rows(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "g.jsonl", [{"question": "q", "answer": "no final answer"}] * 3)
    with pytest.raises(CpiftError, match=r"no usable row.*####"):
        load_task({"name": "x", "source": str(path), "format": "gsm8k"})


def test_corrupt_files(tmp_path: Path) -> None:
    path = tmp_path / "bad.jsonl"
    path.write_text('{"question": "q", "answer": "#### 1"}\n{not json\n')
    with pytest.raises(CpiftError, match=r"bad\.jsonl.*line 2"):
        load_task({"name": "x", "source": str(path), "format": "gsm8k"})
    scalars = tmp_path / "scalars.json"
    scalars.write_text("[1, 2]")
    with pytest.raises(CpiftError, match="records"):
        read_rows(scalars)
    parquet = tmp_path / "broken.parquet"
    parquet.write_bytes(b"not parquet")
    with pytest.raises(CpiftError, match=r"broken\.parquet"):
        read_rows(parquet)
    other = tmp_path / "data.txt"
    other.write_text("x")
    with pytest.raises(CpiftError, match="unknown type"):
        read_rows(other)


def test_json_variants(tmp_path: Path) -> None:
    rows = [{"instruction": "Say hi.", "input": "", "output": "Hi."}, {"instruction": "Say bye.", "output": "Bye."}]
    wrapped = tmp_path / "wrapped.json"
    wrapped.write_text(json.dumps({"data": rows}))
    lines = tmp_path / "lines.json"
    lines.write_text("\n".join(json.dumps(r) for r in rows))
    assert read_rows(wrapped) == rows == read_rows(lines)


@pytest.mark.parametrize(
    ("bad", "key"),
    [
        ({"name": ""}, "'name'"),
        ({"name": None}, "'name'"),
        ({"source": 3}, "'source'"),
        ({"format": "squad"}, "'format'"),
        ({"n_train": -1}, "'n_train'"),
        ({"n_eval": None}, "'n_eval'"),
        ({"seed": "0"}, "'seed'"),
        ({"splits": {"train": "train"}}, "'splits'"),
        ({"split": "train", "train_split": "train"}, "'split' and 'train_split'"),
        ({"columns": {"prompt": "question"}}, "'columns'"),
        ({"max_turns": 1}, "'max_turns'"),
        ({"eval_task": "code", "eval_split": "test"}, "'eval_task'"),
    ],
)
def test_bad_specs_name_the_key(bad: dict[str, Any], key: str) -> None:
    good = {"name": "g", "source": str(FIXTURES / "gsm8k.jsonl"), "format": "gsm8k"}
    with pytest.raises(ParameterError, match=key):
        load_task({**good, **bad})


def test_bad_custom_specs() -> None:
    good = {"name": "c", "source": str(FIXTURES / "alpaca.json"), "format": "custom"}
    with pytest.raises(ParameterError, match="'columns'"):
        load_task(good)
    with pytest.raises(ParameterError, match="unknown role"):
        load_task({**good, "columns": {"prompt": "instruction", "answer": "output", "label": "x"}})
    with pytest.raises(ParameterError, match="'scorer'"):
        load_task({**good, "columns": {"prompt": "instruction", "answer": "output"}, "scorer": "bleu"})
    with pytest.raises(ParameterError, match="mapping"):
        load_task(["not", "a", "mapping"])  # type: ignore[arg-type]


def test_formats_and_spec_keys_are_public() -> None:
    assert set(FORMATS) == {"gsm8k", "codealpaca", "logiqa", "alpaca", "ultrachat", "custom"}
    assert {"name", "source", "format", "n_train", "n_eval", "seed", "columns"} <= hub.SPEC_KEYS
    assert "code" in EMBEDDED_TASKS


# ------------------------------------------------------------------------ hub (never reached)


class FakeDatasets:
    """Stands in for the ``datasets`` module: records load_dataset calls, serves fixture rows."""

    def __init__(self, splits: dict[str, list[dict[str, Any]]] | Exception) -> None:
        self.splits, self.calls = splits, []

    def load_dataset(self, source: str, config: str | None = None, *, split: str):
        self.calls.append((source, config, split))
        if isinstance(self.splits, Exception):
            raise self.splits
        import datasets

        return datasets.Dataset.from_list(self.splits[split])


def test_hub_ids_go_through_load_dataset(monkeypatch: pytest.MonkeyPatch) -> None:
    import datasets

    rows = read_rows(FIXTURES / "gsm8k.jsonl")
    fake = FakeDatasets({"train": rows[:3], "test": rows[3:]})
    monkeypatch.setattr(datasets, "load_dataset", fake.load_dataset)
    task = load_task({"name": "gsm8k", "source": "openai/gsm8k", "config": "main", "format": "gsm8k",
                      "eval_split": "test"})
    assert fake.calls == [("openai/gsm8k", "main", "train"), ("openai/gsm8k", "main", "test")]
    assert len(task.train) == 3 and len(task.eval) == 2 and task.eval[0].meta["split"] == "test"


def test_hub_failures_name_the_dataset(monkeypatch: pytest.MonkeyPatch) -> None:
    import datasets

    monkeypatch.setattr(datasets, "load_dataset", FakeDatasets(ConnectionError("offline")).load_dataset)
    with pytest.raises(CpiftError, match=r"'org/missing'.*'source'.*split 'train'.*ConnectionError: offline"):
        load_task({"name": "x", "source": "org/missing", "format": "alpaca"})


def test_fixture_directory_is_not_mistaken_for_a_hub_id(tmp_path: Path) -> None:
    copy = tmp_path / "a" / "b"
    copy.mkdir(parents=True)
    shutil.copy(FIXTURES / "alpaca.json", copy / "train.json")
    task = load_task({"name": "a", "source": str(copy), "format": "alpaca"})
    assert len(task.train) + len(task.eval) == 5
