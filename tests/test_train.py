"""Training with Trainer on the tiny model: losses, run folder, resume, interruption (the demo's margins: test_memory)."""

from __future__ import annotations

import ast
import json
import warnings

import pytest
import torch
import transformers
from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback

from lora_nb.data import load_examples, tokenize_examples
from lora_nb.demo_task import demo_data_paths
from lora_nb.errors import RunFolderError
from lora_nb.evaluate import heldout_loss
from lora_nb.run_folder import RunFolder
from lora_nb.settings import KitSettings, LoraSettings, TrainSettings
from lora_nb.train import TrainResult, _with_adapter, train


def tiny_settings(model_dir: str, **train_kwargs) -> KitSettings:
    base = dict(learning_rate=1e-2, max_steps=8, per_device_train_batch_size=4, logging_steps=1, seed=0,
                precision="fp32", max_seq_length=128, warmup_ratio=0.1, save_steps=None)
    return KitSettings(
        model_name_or_path=model_dir,
        lora=LoraSettings(r=8, lora_alpha=16, lora_dropout=0.1, target_modules="all-linear"),
        train=TrainSettings(**(base | train_kwargs)),
    )


@pytest.fixture(scope="module")
def tiny(tiny_model_dir):
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    train_path, heldout_path = demo_data_paths()
    train_set = tokenize_examples(load_examples(train_path).select(range(48)), tokenizer, 128)
    eval_set = tokenize_examples(load_examples(heldout_path).select(range(8)), tokenizer, 128)
    return tiny_model_dir, tokenizer, train_set, eval_set


def fresh_model(model_dir):
    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)


class StopAfter(TrainerCallback):
    """Stop like a user would want to: save a checkpoint after step `n`, then end training."""

    def __init__(self, n: int):
        self.n = n

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.n:
            control.should_save = control.should_training_stop = True


class CtrlCAt(TrainerCallback):
    """Raise KeyboardInterrupt as step `n` begins, as Ctrl+C or the notebook's stop button would."""

    def __init__(self, n: int):
        self.n = n

    def on_step_begin(self, args, state, control, **kwargs):
        if state.global_step == self.n - 1:
            raise KeyboardInterrupt


@pytest.fixture(scope="module")
def uninterrupted(tiny, tmp_path_factory) -> TrainResult:
    model_dir, tokenizer, train_set, eval_set = tiny
    return train(fresh_model(model_dir), tokenizer, train_set, tiny_settings(model_dir), tmp_path_factory.mktemp("full") / "run",
                 eval_data=eval_set)


def test_training_lowers_the_loss_and_fills_the_run_folder(uninterrupted, tiny):
    result = uninterrupted
    assert result.global_step == result.max_steps == 8 and not result.interrupted
    assert [step for step, _ in result.train_losses] == list(range(1, 9))
    # Batches are grouped by length, so per-step training losses mix example sizes: judge on held-out loss.
    model_dir, tokenizer, _, eval_set = tiny
    before = heldout_loss(fresh_model(model_dir), tokenizer, eval_set).loss
    after = heldout_loss(result.model, tokenizer, eval_set).loss
    assert after < before - 0.3
    assert result.eval_losses[0][1] == pytest.approx(after, rel=1e-4)
    assert len(result.eval_losses) == 1 and result.eval_losses[0][0] == 8  # evaluated once, at the end
    folder = RunFolder(result.run_dir)
    assert (folder.adapter_dir / "adapter_model.safetensors").exists()
    assert (folder.adapter_dir / "adapter_config.json").exists()
    assert folder.read_run()["status"] == "finished" and folder.read_run()["global_step"] == 8
    assert "lora_alpha: 16" in folder.settings_file.read_text()
    log = folder.read_log()
    assert [r["step"] for r in log if "loss" in r] == list(range(1, 9))
    assert [r["loss"] for r in log if "loss" in r] == [loss for _, loss in result.train_losses]
    assert any("eval_loss" in r for r in log)
    state = json.loads((result.run_dir / "trainer_state.json").read_text())
    assert state["global_step"] == 8
    assert not folder.checkpoints()  # save_steps unset: no checkpoints
    assert not any(p.name.startswith(".") for p in result.run_dir.iterdir())  # no staging leftovers
    assert folder.run_file.stat().st_mode & 0o044 and folder.adapter_dir.stat().st_mode & 0o055  # readable by others


def test_stopped_and_resumed_run_matches_the_uninterrupted_one(tiny, uninterrupted, tmp_path):
    model_dir, tokenizer, train_set, eval_set = tiny
    settings, run = tiny_settings(model_dir), tmp_path / "run"
    first = train(fresh_model(model_dir), tokenizer, train_set, settings, run, eval_data=eval_set, callbacks=[StopAfter(3)])
    assert first.global_step == 3
    assert RunFolder(run).last_checkpoint().name == "checkpoint-3"
    assert RunFolder(run).read_run()["status"] == "stopped"
    resumed = train(fresh_model(model_dir), tokenizer, train_set, settings, run, eval_data=eval_set, resume=True)
    assert resumed.global_step == 8
    assert [s for s, _ in resumed.train_losses] == list(range(1, 9))
    expected = [loss for _, loss in uninterrupted.train_losses]
    assert [loss for _, loss in resumed.train_losses] == pytest.approx(expected, abs=1e-6)
    assert [r["step"] for r in RunFolder(run).read_log() if "loss" in r] == list(range(1, 9))


def test_ctrl_c_saves_a_checkpoint_and_the_run_resumes(tiny, uninterrupted, tmp_path, capsys):
    model_dir, tokenizer, train_set, _ = tiny
    settings, run = tiny_settings(model_dir), tmp_path / "run"
    result = train(fresh_model(model_dir), tokenizer, train_set, settings, run, callbacks=[CtrlCAt(3)])
    assert result.interrupted and result.global_step == 2
    assert "resume=True" in capsys.readouterr().out
    folder = RunFolder(run)
    assert folder.last_checkpoint().name == "checkpoint-2"
    assert (folder.adapter_dir / "adapter_model.safetensors").exists()
    assert folder.read_run()["status"] == "interrupted"
    resumed = train(fresh_model(model_dir), tokenizer, train_set, settings, run, resume=True)
    assert resumed.global_step == 8
    expected = [loss for _, loss in uninterrupted.train_losses]
    assert [loss for _, loss in resumed.train_losses] == pytest.approx(expected, abs=1e-6)


def test_run_folder_refusals(tiny, uninterrupted, tmp_path):
    model_dir, tokenizer, train_set, _ = tiny
    settings = tiny_settings(model_dir, max_steps=2)
    with pytest.raises(RunFolderError, match="does not exist"):
        train(fresh_model(model_dir), tokenizer, train_set, settings, tmp_path / "none", resume=True)
    with pytest.raises(RunFolderError, match="already holds a training run.*resume=True"):
        train(fresh_model(model_dir), tokenizer, train_set, settings, uninterrupted.run_dir)
    with pytest.raises(RunFolderError, match="holds no checkpoint"):
        train(fresh_model(model_dir), tokenizer, train_set, settings, uninterrupted.run_dir, resume=True)

    run = tmp_path / "run"
    train(fresh_model(model_dir), tokenizer, train_set, settings, run, callbacks=[StopAfter(1)])
    folder = RunFolder(run)
    other = json.loads(folder.run_file.read_text())
    other["model"] |= {"name_or_path": "someone/other-model", "hidden_size": 999}
    folder.run_file.write_text(json.dumps(other))
    with pytest.raises(RunFolderError, match="run of another model.*other-model"):
        train(fresh_model(model_dir), tokenizer, train_set, settings, run, resume=True)
    other["model"] |= {"name_or_path": model_dir, "hidden_size": 64}
    folder.run_file.write_text(json.dumps(other))
    (folder.last_checkpoint() / "trainer_state.json").unlink()
    with pytest.raises(RunFolderError, match="checkpoint-1 is corrupt"):
        train(fresh_model(model_dir), tokenizer, train_set, settings, run, resume=True)
    folder.run_file.write_text("{not json")
    with pytest.raises(RunFolderError, match="run.json is corrupt"):
        train(fresh_model(model_dir), tokenizer, train_set, settings, run, resume=True)


def test_model_with_another_adapter_trains_the_settings_adapter(tiny, tmp_path):
    model_dir, tokenizer, train_set, _ = tiny
    settings = tiny_settings(model_dir, max_steps=1)
    other = tiny_settings(model_dir)
    other.lora.r, other.lora.target_modules = 2, ["q_proj"]
    wrapped = _with_adapter(fresh_model(model_dir), other)
    with pytest.warns(UserWarning, match=r"already carried a LoRA adapter .*it was taken off"):
        result = train(wrapped, tokenizer, load_examples(demo_data_paths()[0]).select(range(8)), settings, tmp_path / "run")
    config = json.loads((result.adapter_dir / "adapter_config.json").read_text())
    assert result.global_step == 1 and config["r"] == 8 and len(config["target_modules"]) == 7


def test_same_seed_same_adapter_init_and_no_peft_warning(tiny):
    model_dir = tiny[0]
    settings = tiny_settings(model_dir)
    inits = []
    for _ in range(2):
        torch.manual_seed(settings.train.seed)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            model = _with_adapter(fresh_model(model_dir), settings)
        assert not [w for w in caught if "is_gradient_checkpointing" in str(w.message)]
        inits.append(next(p for n, p in model.named_parameters() if "lora_A" in n).detach().clone())
    assert torch.equal(inits[0], inits[1])


def test_notebook_progress_bar_has_its_widget():
    """tqdm's notebook bar needs ipywidgets' IProgress; without it Jupyter shows 'IProgress not found'."""
    from tqdm.notebook import tqdm as notebook_tqdm

    bar = notebook_tqdm(total=2, display=False)
    bar.update(2)
    bar.close()


def test_logged_steps_print_numbers_as_numbers_and_the_eval_bar_is_labelled(tiny, tmp_path, capsys):
    model_dir, tokenizer, train_set, eval_set = tiny
    verbosity = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_warning()  # transformers' default, which shows its bars (a benchmark run earlier may have set "error")
    try:
        train(fresh_model(model_dir), tokenizer, train_set, tiny_settings(model_dir, max_steps=2), tmp_path / "run",
              eval_data=eval_set)
    finally:
        transformers.logging.set_verbosity(verbosity)
    printed = capsys.readouterr()
    assert "held-out loss: 100%" in printed.err
    lines = [line for line in printed.out.splitlines() if line.startswith("{'loss'")]
    assert len(lines) == 2
    for line in lines:
        record = ast.literal_eval(line)
        assert all(isinstance(record[k], float) for k in ("loss", "grad_norm", "learning_rate", "epoch"))
        assert all(len(f"{record[k]:.10g}".replace(".", "").lstrip("0")) <= 4 for k in ("loss", "grad_norm"))


class LearningRates(TrainerCallback):
    """Keeps the optimizer's learning rate per parameter name at the first step."""

    def __init__(self):
        self.by_name: dict[str, float] = {}

    def on_step_end(self, args, state, control, model=None, optimizer=None, **kwargs):
        if not self.by_name:
            names = {id(p): n for n, p in model.named_parameters()}
            self.by_name = {names[id(p)]: group["lr"] for group in optimizer.param_groups for p in group["params"]}


def test_loraplus_ratio_gives_lora_b_its_larger_learning_rate(tiny, tmp_path):
    model_dir, tokenizer, train_set, _ = tiny
    settings = tiny_settings(model_dir, max_steps=2, warmup_ratio=0.0, lr_scheduler_type="constant",
                             loraplus_lr_ratio=16.0)
    rates = LearningRates()
    train(fresh_model(model_dir), tokenizer, train_set, settings, tmp_path / "run", callbacks=[rates])
    a = sorted({lr for name, lr in rates.by_name.items() if "lora_A" in name})
    b = sorted({lr for name, lr in rates.by_name.items() if "lora_B" in name})
    assert a == pytest.approx([1e-2]) and b == pytest.approx([0.16])
