"""Tests of cpift.train: assistant-only labels, the loop, exact freezing, exact resume."""

from __future__ import annotations

import math
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from cpift.data.chat import IGNORE_INDEX, collate, tokenize_chat
from cpift.data.tasks import Example
from cpift.errors import CpiftError, MismatchError, ParameterError
from cpift.models import tiny_llama, tiny_tokenizer
from cpift.train import TrainConfig, train
from cpift.train_state import latest_checkpoint, list_checkpoints

END = "<|im_end|>"


def chat(question: str, answer: str, system: str | None = None) -> Example:
    messages = [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]
    if system is not None:
        messages.insert(0, {"role": "system", "content": system})
    return Example(messages=tuple(messages))


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """One intra-op thread for these tiny tensors: fastest, and immune to a busy machine (on two
    shared cores, two spinning threads made a 6-step tiny run 30x slower)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def make_examples() -> list[Example]:
    short = "You add."  # a short system prompt keeps sequences (and tests) small
    return [
        chat("2+2?", "4", short),
        chat("3+5?", "8", short),
        chat("1+6?", "7", short),
        chat("Say hi.", "hi there", short),
        chat("Name a colour.", "blue", short),
    ]


def make_model(dropout: float = 0.0) -> torch.nn.Module:
    model = tiny_llama(seed=0)
    for layer in model.model.layers:  # dropout makes resume depend on the restored RNG state
        layer.self_attn.attention_dropout = dropout
    return model


# The run the resume tests interrupt; also imported by the subprocess they kill.
RESUME_CONFIG = {"lr": 5e-3, "weight_decay": 0.1, "warmup_steps": 1, "steps": 6, "batch_size": 2,
                 "grad_accum": 2, "max_length": 64, "checkpoint_every": 2, "seed": 3, "device": "cpu"}


def labelled_text(tokenizer, item) -> str:
    ids = [i for i, label in zip(item["input_ids"], item["labels"]) if label != IGNORE_INDEX]
    assert ids == [label for label in item["labels"] if label != IGNORE_INDEX]
    return tokenizer.decode(ids)


# ------------------------------------------------------------------------------- tokenization


def test_labels_cover_exactly_the_assistant_reply():
    tok = tiny_tokenizer()
    item = tokenize_chat(tok, chat("What is 2+2?", "The answer is 4."), max_length=512)
    assert len(item["input_ids"]) == len(item["labels"])
    assert labelled_text(tok, item) == "The answer is 4." + END
    # The labelled tokens are one contiguous run at the reply's position.
    positions = [i for i, label in enumerate(item["labels"]) if label != IGNORE_INDEX]
    assert positions == list(range(positions[0], positions[-1] + 1))
    prompt = tok.decode(item["input_ids"][: positions[0]])
    assert prompt.endswith("<|im_start|>assistant\n") and "What is 2+2?" in prompt


def test_every_assistant_turn_is_labelled():
    tok = tiny_tokenizer()
    messages = [
        {"role": "user", "content": "a?"}, {"role": "assistant", "content": "first"},
        {"role": "user", "content": "b?"}, {"role": "assistant", "content": "second"},
    ]
    item = tokenize_chat(tok, messages, max_length=512)
    assert labelled_text(tok, item) == f"first{END}second{END}"


def test_template_breaking_prefixes_falls_back_to_offsets():
    tok = tiny_tokenizer()
    # A template that stamps the system line differently when asked for a generation prompt:
    # the prompt is then no prefix of the conversation, token- or character-wise.
    tok.chat_template = (
        "{% if add_generation_prompt %}{{ 'MODE gen\n' }}{% else %}{{ 'MODE train\n' }}{% endif %}"
        "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n' }}"
        "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
    )
    item = tokenize_chat(tok, chat("q", "the reply"), max_length=512)
    assert labelled_text(tok, item) == "the reply" + END


def test_truncation_keeps_the_start_and_can_drop_the_whole_reply():
    tok = tiny_tokenizer()
    example = chat("x" * 40, "reply", "s")
    full = tokenize_chat(tok, example, max_length=512)
    cut = tokenize_chat(tok, example, max_length=30)
    assert cut["input_ids"] == full["input_ids"][:30]
    assert all(label == IGNORE_INDEX for label in cut["labels"])


def test_collate_pads_right():
    batch = collate([{"input_ids": [5, 6, 7], "labels": [-100, 6, 7]},
                     {"input_ids": [8], "labels": [8]}], pad_id=2)
    assert batch["input_ids"].tolist() == [[5, 6, 7], [8, 2, 2]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert batch["labels"].tolist() == [[-100, 6, 7], [8, -100, -100]]


# ------------------------------------------------------------------------------- training


def test_loss_decreases_and_events_are_documented():
    model, tok = make_model(), tiny_tokenizer()
    events = []
    config = TrainConfig(lr=1e-2, weight_decay=0.0, warmup_steps=2, steps=20, batch_size=4,
                         max_length=64, seed=0, device="cpu")
    result = train(model, tok, make_examples(), config, stage="probe-math",
                   on_event=events.append, progress=False)
    assert result.steps_run == result.step == 20 and len(result.losses) == 20
    assert result.final_loss == result.losses[-1]
    assert sum(result.losses[-3:]) / 3 < 0.7 * result.losses[0]
    assert result.tokens_seen > 0 and result.seconds > 0 and result.examples_skipped == 0
    assert not model.training

    steps = [e for e in events if e["event"] == "step"]
    assert [e["step"] for e in steps] == list(range(1, 21))
    for event in steps:
        assert {"event", "stage", "step", "steps", "loss", "lr", "tokens_per_s", "eta_s"} <= set(event)
        assert event["stage"] == "probe-math" and event["steps"] == 20
        assert math.isfinite(event["loss"]) and event["tokens_per_s"] > 0 and event["eta_s"] >= 0
    assert [e["loss"] for e in steps] == result.losses
    # Warm-up from 0, then cosine decay.
    assert steps[0]["lr"] == 0.0 and steps[2]["lr"] == pytest.approx(1e-2)
    assert steps[-1]["lr"] < steps[5]["lr"] and steps[-1]["eta_s"] == 0


def test_frozen_elements_are_bit_identical_with_weight_decay():
    model, tok = make_model(), tiny_tokenizer()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    g = torch.Generator().manual_seed(0)
    frozen = {
        "model.embed_tokens.weight": torch.rand(before["model.embed_tokens.weight"].shape, generator=g) < 0.3,
        "model.layers.0.mlp.up_proj.weight": torch.rand(before["model.layers.0.mlp.up_proj.weight"].shape,
                                                        generator=g) < 0.5,
        "model.norm.weight": torch.ones_like(before["model.norm.weight"], dtype=torch.bool),
    }
    config = TrainConfig(lr=1e-2, weight_decay=0.5, warmup_steps=0, steps=5, batch_size=3,
                         max_length=64, device="cpu")
    train(model, tok, make_examples(), config, frozen=frozen, progress=False)
    after = dict(model.named_parameters())
    for name, mask in frozen.items():
        assert torch.equal(after[name].detach()[mask], before[name][mask]), name
        free = ~mask
        if free.any():
            moved = after[name].detach()[free] != before[name][free]
            assert moved.float().mean() > 0.9, name
    assert not torch.equal(after["model.layers.1.self_attn.q_proj.weight"].detach(),
                           before["model.layers.1.self_attn.q_proj.weight"])


def test_oversized_examples_are_skipped_and_counted():
    model, tok = make_model(), tiny_tokenizer()
    examples = make_examples() + [chat("y" * 80, "lost", "s")]
    config = TrainConfig(lr=1e-3, steps=1, batch_size=2, max_length=64, device="cpu")
    result = train(model, tok, examples, config, progress=False)
    assert result.examples_skipped == 1
    with pytest.raises(ParameterError, match="no training examples"):
        train(make_model(), tok, examples[-1:], config, progress=False)


# ------------------------------------------------------------------------------- checkpoints


def uninterrupted_weights() -> dict[str, torch.Tensor]:
    model = make_model(dropout=0.2)
    result = train(model, tiny_tokenizer(), make_examples(), TrainConfig(**RESUME_CONFIG), progress=False)
    return {"losses": result.losses, **{n: t.clone() for n, t in model.state_dict().items()}}


@pytest.fixture(scope="module")
def reference() -> dict:
    return uninterrupted_weights()


def assert_same_run(model: torch.nn.Module, result, reference: dict) -> None:
    assert result.losses == reference["losses"]
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, reference[name]), name


def test_checkpoints_are_complete_and_only_the_last_two_kept(tmp_path, reference):
    model, tok = make_model(dropout=0.2), tiny_tokenizer()
    events = []
    result = train(model, tok, make_examples(), TrainConfig(**RESUME_CONFIG), checkpoint_dir=tmp_path,
                   on_event=events.append, progress=False)
    assert_same_run(model, result, reference)  # checkpointing does not perturb the run
    assert [p.name for _, p in list_checkpoints(tmp_path)] == ["step-000004", "step-000006"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step-000004", "step-000006"]
    assert result.checkpoint == tmp_path / "step-000006"
    assert [e["step"] for e in events if e["event"] == "checkpoint"] == [2, 4, 6]
    # The tied embedding is stored once and restored under both names.
    from safetensors import safe_open

    with safe_open(str(tmp_path / "step-000006" / "model.safetensors"), "pt") as fh:
        assert "lm_head.weight" not in fh.keys()  # noqa: SIM118 (not a dict)
    fresh = make_model()
    from cpift.models import load_weights

    load_weights(fresh, tmp_path / "step-000006" / "model.safetensors")
    for name, tensor in fresh.state_dict().items():
        assert torch.equal(tensor, model.state_dict()[name]), name
    # A second fresh run into the same directory must not silently mix with these.
    with pytest.raises(ParameterError, match="resume=True"):
        train(make_model(), tok, make_examples(), TrainConfig(**RESUME_CONFIG), checkpoint_dir=tmp_path,
              progress=False)


def test_resume_after_exception_is_bit_identical(tmp_path, reference):
    tok = tiny_tokenizer()

    def stop_at_4(event):
        if event["event"] == "step" and event["step"] == 4:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train(make_model(dropout=0.2), tok, make_examples(), TrainConfig(**RESUME_CONFIG),
              checkpoint_dir=tmp_path, on_event=stop_at_4, progress=False)
    assert latest_checkpoint(tmp_path).name == "step-000002"  # step 4's was not reached
    torch.manual_seed(1234)  # the global RNG must come from the checkpoint, not from here
    model, events = make_model(dropout=0.2), []
    result = train(model, tok, make_examples(), TrainConfig(**RESUME_CONFIG), checkpoint_dir=tmp_path,
                   resume=True, on_event=events.append, progress=False)
    assert result.resumed_from == 2 and result.steps_run == 4 and result.step == 6
    assert events[0] == {"event": "resume", "stage": "train", "step": 2,
                         "path": str(tmp_path / "step-000002")}
    assert_same_run(model, result, reference)


KILLED_RUN = """
import os, signal, sys
import torch
torch.set_num_threads(1)  # as in the test process: same numerics
sys.path.insert(0, {tests!r})
from test_train import RESUME_CONFIG, make_examples, make_model
from cpift.models import tiny_tokenizer
from cpift.train import TrainConfig, train

real_save = torch.save
def save(obj, f, *args, **kwargs):
    # Die mid-write of step 4's checkpoint: model written, RNG states and optimizer not.
    if ".step-000004.tmp-" in str(f) and str(f).endswith("random_states_0.pkl"):
        os.kill(os.getpid(), signal.SIGKILL)
    return real_save(obj, f, *args, **kwargs)
torch.save = save
train(make_model(dropout=0.2), tiny_tokenizer(), make_examples(), TrainConfig(**RESUME_CONFIG),
      checkpoint_dir={ckpt!r}, progress=False)
"""


@pytest.mark.skipif(not hasattr(signal, "SIGKILL"), reason="needs SIGKILL")
def test_resume_after_kill_mid_checkpoint_is_bit_identical(tmp_path, reference):
    script = KILLED_RUN.format(tests=str(Path(__file__).parent), ckpt=str(tmp_path))
    proc = subprocess.run([sys.executable, "-c", textwrap.dedent(script)], capture_output=True,
                          text=True, timeout=120, check=False, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    temps = [p for p in tmp_path.iterdir() if p.name.startswith(".step-000004.tmp-")]
    assert len(temps) == 1 and (temps[0] / "model.safetensors").is_file()  # a half-written one
    assert latest_checkpoint(tmp_path).name == "step-000002"

    model = make_model(dropout=0.2)
    result = train(model, tiny_tokenizer(), make_examples(), TrainConfig(**RESUME_CONFIG),
                   checkpoint_dir=tmp_path, resume=True, progress=False)
    assert result.resumed_from == 2
    assert_same_run(model, result, reference)
    assert not temps[0].exists()  # its process is dead: cleared as stale


def test_only_complete_checkpoints_are_resumed(tmp_path):
    tok = tiny_tokenizer()
    config = TrainConfig(**{**RESUME_CONFIG, "steps": 2})
    train(make_model(), tok, make_examples(), config, checkpoint_dir=tmp_path, progress=False)
    assert latest_checkpoint(tmp_path).name == "step-000002"
    # A write in progress by a live process (ours), and a visible but incomplete directory.
    live_temp = tmp_path / f".step-000009.tmp-{os.getpid()}-abcd"
    live_temp.mkdir()
    for name in ("model.safetensors", "random_states_0.pkl", "custom_checkpoint_0.pkl", "custom_checkpoint_1.pkl",
                 "trainer_state.json"):
        (live_temp / name).write_bytes(b"garbage")
    partial = tmp_path / "step-000008"
    partial.mkdir()
    (partial / "model.safetensors").write_bytes(b"garbage")
    assert latest_checkpoint(tmp_path).name == "step-000002"
    result = train(make_model(), tok, make_examples(), config, checkpoint_dir=tmp_path, resume=True,
                   progress=False)
    assert result.resumed_from == 2 and result.steps_run == 0 and len(result.losses) == 2
    assert live_temp.exists()  # never touched: its process is alive


def test_resume_refuses_a_checkpoint_of_another_run(tmp_path):
    tok = tiny_tokenizer()
    config = TrainConfig(**{**RESUME_CONFIG, "steps": 2})
    train(make_model(), tok, make_examples(), config, checkpoint_dir=tmp_path, progress=False)
    with pytest.raises(MismatchError, match="lr"):
        train(make_model(), tok, make_examples(), TrainConfig(**{**RESUME_CONFIG, "steps": 2, "lr": 1e-3}),
              checkpoint_dir=tmp_path, resume=True, progress=False)
    with pytest.raises(MismatchError, match="data"):
        train(make_model(), tok, make_examples()[:3], config, checkpoint_dir=tmp_path, resume=True,
              progress=False)


# ------------------------------------------------------------------------------- bad input


@pytest.mark.parametrize("field, value", [
    ("steps", 0), ("steps", 1.5), ("lr", 0), ("lr", -1e-3), ("lr", float("nan")),
    ("weight_decay", -0.1), ("warmup_steps", -1), ("batch_size", 0), ("grad_accum", 0),
    ("max_length", 1), ("max_grad_norm", -1.0), ("checkpoint_every", -1), ("seed", -1),
    ("device", "tpu"),
])
def test_bad_config_raises_naming_the_field(field, value):
    with pytest.raises(ParameterError, match=field):
        TrainConfig(**{field: value})
    config = TrainConfig()
    setattr(config, field, value)  # changed after creation: train validates again
    with pytest.raises(ParameterError, match=field):
        train(make_model(), tiny_tokenizer(), make_examples(), config, progress=False)


def test_bad_calls_raise():
    tok = tiny_tokenizer()
    config = TrainConfig(steps=1, device="cpu")
    with pytest.raises(ParameterError, match="no training examples"):
        train(make_model(), tok, [], config)
    with pytest.raises(ParameterError, match="checkpoint_dir"):
        train(make_model(), tok, make_examples(), config, resume=True)
    with pytest.raises(MismatchError, match="unknown parameter"):
        train(make_model(), tok, make_examples(), config,
              frozen={"nope.weight": torch.zeros(3, dtype=torch.bool)}, progress=False)


def test_nan_loss_stops_naming_stage_and_step():
    model = make_model()
    with torch.no_grad():
        model.model.norm.weight.fill_(float("nan"))
    config = TrainConfig(lr=1e-3, steps=3, batch_size=2, max_length=64, device="cpu")
    with pytest.raises(CpiftError, match=r"stage 'math'.*step 1 of 3"):
        train(model, tiny_tokenizer(), make_examples(), config, stage="math", progress=False)
    assert not model.training


def test_head_only_loss_equals_the_full_loss_and_its_gradient():
    """The LM head and cross-entropy at the labelled positions only give the full computation's
    loss (to 1e-5) and gradients."""
    from cpift.data.chat import pad_token_id, tokenize_examples
    from cpift.train import _loss_sum

    model, tokenizer = make_model(), tiny_tokenizer()
    data, _ = tokenize_examples(tokenizer, make_examples()[:4], 64, "test")
    batch = collate(data, pad_token_id(tokenizer))

    def full_loss():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        return torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.size(-1)),
                                                 batch["labels"][:, 1:].reshape(-1), ignore_index=-100,
                                                 reduction="sum")

    expected = full_loss()
    expected.backward()
    expected_grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    got = _loss_sum(model, model.get_output_embeddings(), batch)
    got.backward()
    assert float(got.detach()) == pytest.approx(float(expected.detach()), rel=1e-5)
    for name, param in model.named_parameters():
        torch.testing.assert_close(param.grad, expected_grads[name], rtol=1e-4, atol=1e-6, msg=name)
