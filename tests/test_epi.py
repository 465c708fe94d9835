"""EPI: the online importance, the evolving protected set, exact protection, drift artifacts, resume."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from cpift.config import load_config
from cpift.data.tasks import Example
from cpift.errors import MismatchError, ParameterError
from cpift.masks import load_packed, unpack_all
from cpift.methods.epi import EpiHook
from cpift.models import WEIGHTS_FILE, load_weights, tiny_llama, tiny_tokenizer
from cpift.overlap import jaccard
from cpift.pipeline import run_config
from cpift.runs import RunDir
from cpift.sparse import ImportanceTracker
from cpift.train import TrainConfig, train

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "configs" / "tiny.toml"


def rows(tracker: ImportanceTracker) -> list[list[int]]:
    return tracker.frozen()["w"].int().tolist()


def test_protected_set_follows_the_gradient_pattern() -> None:
    tracker = ImportanceTracker({"w": (4, 4)}, p=25, beta=0.5)  # k = 4 of 16
    assert tracker.frozen() is None  # nothing measured, nothing protected
    row = torch.zeros(4, 4)
    for _ in range(3):
        tracker.update({"w": row.index_fill(0, torch.tensor([0]), 1.0)})
    first = tracker.refresh(3)
    assert rows(tracker) == [[1] * 4, [0] * 4, [0] * 4, [0] * 4]
    assert first == {"step": 3, "size": 4, "jaccard_previous": None, "jaccard_first": 1.0, "joined": 4,
                     "released": 0}
    for _ in range(4):  # the gradient moves to row 3; row 0's importance decays by 0.5 a step
        tracker.update({"w": row.index_fill(0, torch.tensor([3]), 1.0)})
    second = tracker.refresh(7, stage="s2")
    assert rows(tracker) == [[0] * 4, [0] * 4, [0] * 4, [1] * 4]
    assert second == {"step": 7, "size": 4, "jaccard_previous": 0.0, "jaccard_first": 0.0, "joined": 4,
                      "released": 4, "stage": "s2"}
    # Half the gradient back on row 0: two rows score 0.5 after one β = 0 step; ties to the lowest index.
    tracker.beta = 0.0
    tracker.update({"w": row.index_fill(0, torch.tensor([0]), 1.0) + row.index_fill(0, torch.tensor([3]), 1.0)})
    assert tracker.refresh(8)["jaccard_previous"] == 0.0 and rows(tracker)[0] == [1] * 4


def test_normalisation_puts_tensors_on_one_scale() -> None:
    grads = {"big": torch.full((8,), 100.0), "small": torch.tensor([0.0] * 7 + [0.01])}
    grads["big"][0] = 300.0
    for normalise, expected_small in (("tensor", 1), ("none", 0)):
        tracker = ImportanceTracker({"big": (8,), "small": (8,)}, p=12.5, beta=0.0, normalise=normalise)  # k = 2
        tracker.update(grads)
        tracker.refresh(1)
        masks = tracker.frozen()
        assert int(masks["small"].sum()) == expected_small and bool(masks["big"][0])
    # Importance g² (β = 0). Divided by its tensor's mean, "small"[7] scores 8 and "big"[0] 4.5, the
    # rest of "big" 0.5; undivided, "big" holds the two largest values.


def test_bad_tracker_settings_raise() -> None:
    with pytest.raises(ParameterError, match="beta"):
        ImportanceTracker({"w": (2,)}, p=10, beta=1.0)
    with pytest.raises(ParameterError, match="normalise"):
        ImportanceTracker({"w": (2,)}, p=10, normalise="row")
    with pytest.raises(ParameterError, match="p must be"):
        ImportanceTracker({"w": (2,)}, p=0)
    tracker = ImportanceTracker({"w": (2,)}, p=50)
    with pytest.raises(MismatchError, match="'w'"):
        tracker.update({"w": torch.zeros(3)})
    with pytest.raises(MismatchError, match="other settings"):
        tracker.load_state_dict(ImportanceTracker({"w": (2,)}, p=10).state_dict())


# ------------------------------------------------------------------------------- inside training


def chat(question: str, answer: str) -> Example:
    return Example(messages=({"role": "system", "content": "Be brief."}, {"role": "user", "content": question},
                             {"role": "assistant", "content": answer}))


EXAMPLES = [chat("2+2?", "4"), chat("3+5?", "eight"), chat("Say hi.", "hi there"), chat("Colour?", "blue")]
CONFIG = {"lr": 5e-3, "weight_decay": 0.1, "warmup_steps": 1, "steps": 6, "batch_size": 2, "max_length": 64,
          "checkpoint_every": 2, "seed": 1, "device": "cpu"}


def epi_hook(tmp_path: Path, model: torch.nn.Module) -> EpiHook:
    run = RunDir.open(tmp_path / "run") if (tmp_path / "run").exists() else RunDir.create(tmp_path / "run", {})
    tracker = ImportanceTracker({n: p.shape for n, p in model.named_parameters()}, p=10, beta=0.8)
    return EpiHook(tracker, interval=2, run=run, info={})


def test_protected_elements_stay_bit_identical_while_protected(tmp_path: Path) -> None:
    model = tiny_llama(seed=0)
    hook = epi_hook(tmp_path, model)
    snapshots = [{n: p.detach().clone() for n, p in model.named_parameters()}]
    in_force = [None]  # the protected set each step trains under

    def record(event: dict) -> None:
        if event["event"] == "step":
            snapshots.append({n: p.detach().clone() for n, p in model.named_parameters()})
            in_force.append(hook.frozen())

    train(model, tiny_tokenizer(), EXAMPLES, TrainConfig(**CONFIG), on_event=record, hook=hook, progress=False)
    assert [r["step"] for r in hook.tracker.history] == [2, 4, 6]
    assert hook.tracker.history[1]["jaccard_previous"] < 1  # the set did evolve
    checked = 0
    for step in range(2, 7):  # step s turns snapshots[s-1] into snapshots[s] under in_force[s-1]
        protected = in_force[step - 1]
        if protected is None:
            continue
        for name, mask in protected.items():
            before, after = snapshots[step - 1][name], snapshots[step][name]
            assert torch.equal(before[mask], after[mask]), (step, name)
            checked += int(mask.sum())
        assert any(not torch.equal(snapshots[step - 1][n], snapshots[step][n]) for n in protected)
    assert checked > 0


def test_resume_with_the_hook_is_bit_identical(tmp_path: Path) -> None:
    model = tiny_llama(seed=0)
    hook = epi_hook(tmp_path / "a", model)
    train(model, tiny_tokenizer(), EXAMPLES, TrainConfig(**CONFIG), hook=hook, progress=False)

    def stop_at_5(event: dict) -> None:
        if event["event"] == "step" and event["step"] == 5:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        interrupted = tiny_llama(seed=0)
        train(interrupted, tiny_tokenizer(), EXAMPLES, TrainConfig(**CONFIG), hook=epi_hook(tmp_path / "b", interrupted),
              checkpoint_dir=tmp_path / "ckpt", on_event=stop_at_5, progress=False)
    resumed = tiny_llama(seed=0)
    resumed_hook = epi_hook(tmp_path / "b", resumed)
    result = train(resumed, tiny_tokenizer(), EXAMPLES, TrainConfig(**CONFIG), hook=resumed_hook,
                   checkpoint_dir=tmp_path / "ckpt", resume=True, progress=False)
    assert result.resumed_from == 4
    for (name, a), (_, b) in zip(model.named_parameters(), resumed.named_parameters()):
        assert torch.equal(a, b), name
    assert resumed_hook.tracker.history == hook.tracker.history
    assert np.array_equal(resumed_hook.tracker.protected, hook.tracker.protected)
    with pytest.raises(MismatchError, match="hook"):  # a checkpoint with a hook needs one to resume
        train(tiny_llama(seed=0), tiny_tokenizer(), EXAMPLES, TrainConfig(**CONFIG), checkpoint_dir=tmp_path / "ckpt",
              resume=True, progress=False)


# ------------------------------------------------------------------------------- the method


EPI_RUN = ['run.methods=["epi"]', "epi.interval=3", "train.steps=8", "train.weight_decay=0.1",
           "train.keep_checkpoints=true", "eval.retention=false"]


@pytest.fixture(scope="module")
def epi_run(tmp_path_factory) -> RunDir:
    return run_config(load_config(TINY, EPI_RUN), tmp_path_factory.mktemp("epi") / "run", progress=False)


def test_epi_run_writes_masks_and_drift(epi_run: RunDir) -> None:
    run = epi_run
    drift = json.loads((run.path / "methods/epi/drift.json").read_text())
    # 2 stages of 4 steps; refreshes every 3 steps run-wide and at the boundary (step 4).
    assert [s["start"] for s in drift["stages"]] == [0, 4]
    assert [(r["step"], r["stage"]) for r in drift["refreshes"]] == [
        (3, "epi/stage1"), (4, "epi/stage1"), (6, "epi/stage2")]
    assert drift["refreshes"][0]["jaccard_previous"] is None
    previous = None
    for record in drift["refreshes"]:
        layout, masks, _ = load_packed(run.path / "methods/epi" / record["file"])
        words = masks["protected"]
        assert int(np.bitwise_count(words).sum()) == record["size"] == drift["k"] == int(0.05 * layout.numel)
        if previous is not None:
            assert record["jaccard_previous"] == pytest.approx(jaccard(previous, words))
        previous = words
    assert drift["refreshes"][-1]["jaccard_previous"] < 1
    # Stage 2 trains under the boundary's mask until step 6: those elements did not move in steps 5–6.
    _, boundary, _ = load_packed(run.path / "methods/epi/masks/step-000004.npz")
    checkpoints = run.path / "checkpoints"
    stage1_end = dict(load_weights(tiny_llama(0), checkpoints / "epi_stage1/step-000004" / WEIGHTS_FILE
                                   ).named_parameters())
    stage2_mid = dict(load_weights(tiny_llama(0), checkpoints / "epi_stage2/step-000002" / WEIGHTS_FILE
                                   ).named_parameters())
    for name, mask in unpack_all(boundary["protected"], layout).items():
        assert torch.equal(stage1_end[name][mask], stage2_mid[name][mask]), name
    assert (run.path / "methods/epi/final" / WEIGHTS_FILE).is_file()


def test_epi_resumes_across_stages_exactly(epi_run: RunDir, tmp_path: Path, monkeypatch) -> None:
    reference = epi_run
    real_log = RunDir.log_event

    def stop_in_stage2(self, **fields):
        result = real_log(self, **fields)
        if fields.get("stage") == "epi/stage2" and fields.get("event") == "step" and fields.get("step") == 3:
            raise KeyboardInterrupt
        return result

    monkeypatch.setattr(RunDir, "log_event", stop_in_stage2)
    with pytest.raises(KeyboardInterrupt):
        run_config(load_config(TINY, EPI_RUN), tmp_path / "killed", progress=False)
    monkeypatch.setattr(RunDir, "log_event", real_log)
    resumed = run_config(load_config(TINY, EPI_RUN), tmp_path / "killed", resume=True, progress=False)
    a = load_weights(tiny_llama(0), resumed.path / "methods/epi/final")
    b = load_weights(tiny_llama(0), reference.path / "methods/epi/final")
    for (name, x), (_, y) in zip(a.named_parameters(), b.named_parameters()):
        assert torch.equal(x, y), name
    assert (json.loads((resumed.path / "methods/epi/drift.json").read_text())
            == json.loads((reference.path / "methods/epi/drift.json").read_text()))


def test_the_app_shows_the_drift_curve(epi_run: RunDir) -> None:
    from test_app_explore import figure, open_page

    at = open_page("drift", epi_run.path)
    fig = figure(at, "Importance drift")
    drift = json.loads((epi_run.path / "methods/epi/drift.json").read_text())
    previous = next(trace for trace in fig.data if trace.name == "with the previous set")
    assert list(previous.x) == [r["step"] for r in drift["refreshes"]]
    assert [None if np.isnan(y) else y for y in np.asarray(previous.y, dtype=float)] == pytest.approx(
        [r["jaccard_previous"] for r in drift["refreshes"]], nan_ok=True)
    assert len(at.dataframe) == 1
