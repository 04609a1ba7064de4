"""Reliability: the rows of docs/errors.md not already covered by a module's own tests.

Each test feeds the kit one bad input or failure (a layer the model lacks, a full disk, a half-written
checkpoint...) and asserts on the kit's answer: an exception of its own type, or a warning where
training can go on, whose message names the value and what to do; and that nothing the user already
had is overwritten or lost. Everything runs on the tiny model in a few steps.
"""

from __future__ import annotations

import errno
import json
import os
import random
import shutil
from pathlib import Path

import pytest
import torch
from peft.tuners.lora import LoraLayer
from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback

from lora_nb import files, formats
from lora_nb.__main__ import main
from lora_nb.adapters import save_adapter
from lora_nb.data import load_examples
from lora_nb.demo_task import demo_data_paths
from lora_nb.errors import ConfigFileError, DataError, RunFolderError, SettingsError
from lora_nb.files import write_text_atomic
from lora_nb.formats import load_settings, save_settings
from lora_nb.pipeline import configure
from lora_nb.run_folder import RunFolder
from lora_nb.settings import KitSettings, LoraSettings, TrainSettings
from lora_nb.train import _with_adapter, train
from tests.test_train import StopAfter

ENOSPC = OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))  # "No space left on device"
EACCES = PermissionError(errno.EACCES, os.strerror(errno.EACCES))  # "Permission denied"


def small_settings(model_dir: str, lora: LoraSettings | None = None, **train_kwargs) -> KitSettings:
    base = dict(learning_rate=1e-2, max_steps=2, per_device_train_batch_size=2, logging_steps=1, seed=0,
                precision="fp32", max_seq_length=96)
    return KitSettings(model_name_or_path=model_dir, lora=lora or LoraSettings(r=4, lora_alpha=8),
                       train=TrainSettings(**(base | train_kwargs)))


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir):
    return AutoTokenizer.from_pretrained(tiny_model_dir)


@pytest.fixture(scope="module")
def examples():
    return load_examples(demo_data_paths()[0]).select(range(8))


def fresh_model(model_dir):
    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)


def leftovers(folder: Path) -> list[str]:
    """Hidden temporary files or folders a failed write could leave behind."""
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


# ------------------------------------------------------------------------- settings against the model
@pytest.mark.parametrize("targets,named", [(["nope"], "['nope']"), (["q_proj", "v_prj"], "['v_prj']")])
def test_targets_the_model_lacks_are_refused_before_training(tiny_model_dir, tokenizer, examples, tmp_path, targets, named):
    settings = small_settings(tiny_model_dir, LoraSettings(target_modules=targets))
    with pytest.raises(SettingsError) as err:
        train(fresh_model(tiny_model_dir), tokenizer, examples, settings, tmp_path / "run")
    assert str(err.value).startswith(f"target_modules {named} not found in the model (peft would skip them silently)")
    assert "its adaptable layers are ['q_proj', 'k_proj', 'v_proj'" in str(err.value)
    assert not (tmp_path / "run").exists()  # refused before anything was written


def test_layers_beyond_the_model_are_refused_before_training(tiny_model_dir, tokenizer, examples, tmp_path):
    settings = small_settings(tiny_model_dir, LoraSettings(target_modules=["q_proj"], layers_to_transform=[0, 5]))
    with pytest.raises(SettingsError, match=r"^layers_to_transform \[5\] outside the model's blocks 0 to 1$"):
        train(fresh_model(tiny_model_dir), tokenizer, examples, settings, tmp_path / "run")
    assert not (tmp_path / "run").exists()


# --------------------------------------------------------------------------------------- settings files
def test_unknown_keys_in_a_settings_file_are_named(tiny_model_dir, tmp_path):
    path = tmp_path / "typo.yaml"
    path.write_text(f"base_model: {tiny_model_dir}\nadapter: lora\nlora_rr: 32\nlora_alpha: 16\n")
    assert load_settings(path).unknown_keys == {"lora_rr": 32}
    with pytest.warns(UserWarning, match=r"typo\.yaml: the kit does not use the keys \['lora_rr'\]; they are ignored"):
        settings = configure(path)
    assert settings.lora.r == LoraSettings().r and settings.lora.lora_alpha == 16


def test_cli_with_a_model_path_that_does_not_exist(tmp_path, capsys):
    missing = tmp_path / "no-model"
    assert main(["run", "--model", str(missing), "--out", str(tmp_path / "run"), "--max-steps", "1"]) == 1
    err = capsys.readouterr().err
    assert err == f"lora-nb: Model folder {str(missing)!r} does not exist. Check the path (a relative one starts from {Path.cwd()}), or use a hub ID such as 'HuggingFaceTB/SmolLM2-135M-Instruct'.\n"
    assert not (tmp_path / "run").exists()


# ------------------------------------------------------------------------------------------------ data
def test_bad_data_file_stops_train_before_anything_is_written(tiny_model_dir, tokenizer, tmp_path):
    chat = {"messages": [{"role": "user", "content": "Hi?"}, {"role": "assistant", "content": "Hi."}]}
    data = tmp_path / "train.jsonl"
    data.write_text(json.dumps(chat) + "\n\n" + json.dumps(chat) + "\n{\"messages\": [\n")
    with pytest.raises(DataError, match=r"train\.jsonl:4: not valid JSON .*one complete JSON object"):
        train(fresh_model(tiny_model_dir), tokenizer, data, small_settings(tiny_model_dir), tmp_path / "run")
    assert not (tmp_path / "run").exists()


def test_examples_longer_than_max_length_warn_and_training_goes_on(tiny_model_dir, tokenizer, examples, tmp_path):
    settings = small_settings(tiny_model_dir, max_seq_length=40, max_steps=1)
    with pytest.warns(UserWarning, match=r"^\d+ of 8 examples were longer than max_length=40 tokens \(longest: \d+\)"):
        result = train(fresh_model(tiny_model_dir), tokenizer, examples, settings, tmp_path / "run")
    assert result.global_step == 1 and RunFolder(result.run_dir).read_run()["status"] == "finished"


# ------------------------------------------------------------------------------------ run folders
@pytest.fixture(scope="module")
def checkpointed_original(tiny_model_dir, tokenizer, examples, tmp_path_factory):
    """A finished 2-step run with checkpoint-1 and checkpoint-2, trained once."""
    settings = small_settings(tiny_model_dir, save_steps=1)
    run = tmp_path_factory.mktemp("checkpointed") / "run"
    train(fresh_model(tiny_model_dir), tokenizer, examples, settings, run)
    assert [p.name for p in RunFolder(run).checkpoints()] == ["checkpoint-1", "checkpoint-2"]
    return settings, run


@pytest.fixture
def checkpointed_run(checkpointed_original, tmp_path):
    """A copy of that run for a test to damage."""
    settings, original = checkpointed_original
    return settings, Path(shutil.copytree(original, tmp_path / "run"))


def test_half_written_checkpoint_is_skipped_with_a_warning(checkpointed_run, tiny_model_dir, tokenizer, examples):
    settings, run = checkpointed_run
    # A process killed while saving leaves the checkpoint without trainer_state.json (written last).
    (run / "checkpoint-2" / "trainer_state.json").unlink()
    with pytest.warns(UserWarning, match=r"Skipping incomplete checkpoint-2 .*resuming from checkpoint-1"):
        result = train(fresh_model(tiny_model_dir), tokenizer, examples, settings, run, resume=True)
    assert result.global_step == 2 and [s for s, _ in result.train_losses] == [1, 2]
    assert RunFolder(run).read_run()["resumed_from"] == "checkpoint-1"


def test_no_complete_checkpoint_and_missing_run_json(checkpointed_run, tiny_model_dir, tokenizer, examples):
    settings, run = checkpointed_run
    for name in ("checkpoint-1", "checkpoint-2"):
        (run / name / "adapter_model.safetensors").unlink()
    with pytest.raises(RunFolderError, match=r"checkpoint-2 is corrupt: it holds no adapter weights .*Delete that folder"):
        train(fresh_model(tiny_model_dir), tokenizer, examples, settings, run, resume=True)
    (run / "run.json").unlink()
    with pytest.raises(RunFolderError, match=r"holds no run\.json, so it is not a run folder of this kit"):
        train(fresh_model(tiny_model_dir), tokenizer, examples, settings, run, resume=True)


# ----------------------------------------------------------------------- disk full, read-only folders
def _failing_replace(monkeypatch, error: OSError, after: int = 0):
    """os.replace fails once with `error`, at call number `after` + 1 (a full disk, a read-only folder)."""
    real, calls = os.replace, []

    def replace(src, dst, *args, **kwargs):
        calls.append(dst)
        if len(calls) == after + 1:
            raise error
        return real(src, dst, *args, **kwargs)

    monkeypatch.setattr(os, "replace", replace)
    return calls


def test_full_disk_keeps_the_previous_settings_file(tmp_path, monkeypatch):
    path = tmp_path / "settings.yaml"
    save_settings(KitSettings(lora=LoraSettings(r=4)), path)
    before = path.read_bytes()
    _failing_replace(monkeypatch, ENOSPC)
    with pytest.raises(ConfigFileError, match=r"Cannot write .*settings\.yaml: No space left on device.*unchanged"):
        save_settings(KitSettings(lora=LoraSettings(r=64)), path)
    assert path.read_bytes() == before and leftovers(tmp_path) == []


def test_failed_write_inside_the_file_keeps_the_previous_settings_file(tmp_path, monkeypatch):
    path = tmp_path / "settings.yaml"
    save_settings(KitSettings(lora=LoraSettings(r=4)), path)
    before = path.read_bytes()
    real_fdopen = os.fdopen

    class FullFile:
        def __init__(self, handle):
            self.handle = handle

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.handle.close()

        def write(self, text):
            raise ENOSPC

    monkeypatch.setattr(formats.os, "fdopen", lambda *a, **k: FullFile(real_fdopen(*a, **k)))
    with pytest.raises(ConfigFileError, match="No space left on device"):
        save_settings(KitSettings(lora=LoraSettings(r=64)), path)
    assert path.read_bytes() == before and leftovers(tmp_path) == []


def test_full_disk_keeps_the_previous_run_file(tmp_path, monkeypatch):
    path = tmp_path / "run.json"
    write_text_atomic(path, '{"status": "finished"}\n')
    _failing_replace(monkeypatch, ENOSPC)
    with pytest.raises(RunFolderError) as err:
        write_text_atomic(path, '{"status": "running"}\n')
    assert str(err.value) == (
        f"Cannot write {path}: No space left on device. Nothing was overwritten (the previous run.json, if any, "
        "is unchanged). Free some disk space or choose a writable folder, then try again.")
    assert isinstance(err.value, OSError)  # code that caught OSError still does
    assert path.read_text() == '{"status": "finished"}\n' and leftovers(tmp_path) == []


@pytest.fixture(scope="module")
def peft_model(tiny_model_dir):
    torch.manual_seed(0)
    return _with_adapter(fresh_model(tiny_model_dir), small_settings(tiny_model_dir))


def _files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


@pytest.mark.parametrize("failing", ["save_pretrained", "swap"])
def test_full_disk_keeps_the_previous_adapter(peft_model, tmp_path, monkeypatch, failing):
    target = tmp_path / "adapter"
    save_adapter(peft_model, target)
    before = _files(target)
    if failing == "save_pretrained":  # the disk fills while the new adapter is written
        monkeypatch.setattr(peft_model, "save_pretrained", lambda *a, **k: (_ for _ in ()).throw(ENOSPC))
    else:  # old adapter moved aside, then moving the new one in fails
        _failing_replace(monkeypatch, ENOSPC, after=1)
    with pytest.raises(RunFolderError, match=r"Cannot write .*adapter: No space left on device\. Nothing was overwritten"):
        save_adapter(peft_model, target)
    monkeypatch.undo()
    assert _files(target) == before and leftovers(tmp_path) == []


def test_read_only_output_folder_stops_train_before_training(tiny_model_dir, tokenizer, examples, tmp_path, monkeypatch):
    # Tests run as root, where chmod does not block writes: the folder refuses new files instead.
    def refuse(*args, **kwargs):
        raise EACCES

    monkeypatch.setattr(files.tempfile, "mkstemp", refuse)
    started = []

    class Started(TrainerCallback):
        def on_train_begin(self, *args, **kwargs):
            started.append(True)

    with pytest.raises(RunFolderError, match=r"Cannot write .*settings\.yaml: Permission denied\. .*choose a writable folder"):
        train(fresh_model(tiny_model_dir), tokenizer, examples, small_settings(tiny_model_dir), tmp_path / "run",
              callbacks=[Started()])
    assert started == [] and leftovers(tmp_path / "run") == []


def test_run_folder_that_cannot_be_created(tiny_model_dir, tokenizer, examples, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("a file where the run's parent folder should be")
    with pytest.raises(RunFolderError, match=r"Cannot write .*file/run: .*Free some disk space or choose a writable folder"):
        train(fresh_model(tiny_model_dir), tokenizer, examples, small_settings(tiny_model_dir), blocker / "run")
    assert blocker.read_text().startswith("a file")


# ----------------------------------------------------------------------------------- reproducibility
class InitialLoraA(TrainerCallback):
    """Copy every lora_A weight when training begins (after the adapter was created)."""

    def __init__(self):
        self.weights: dict[str, torch.Tensor] = {}

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self.weights = {n: p.detach().clone() for n, p in model.named_parameters() if "lora_A" in n}


def test_same_seed_same_adapter_and_losses_whatever_the_global_rng(tiny_model_dir, tokenizer, examples, tmp_path):
    settings = small_settings(tiny_model_dir, lora=LoraSettings(r=4, lora_alpha=8, lora_dropout=0.1))
    runs = []
    for i, disturb in enumerate((1, 12345)):
        torch.manual_seed(disturb)  # different global RNG state before each call
        random.seed(disturb)
        torch.rand(disturb % 97 + 1)
        probe = InitialLoraA()
        result = train(fresh_model(tiny_model_dir), tokenizer, examples, settings, tmp_path / f"run{i}", callbacks=[probe])
        runs.append((probe.weights, [loss for _, loss in result.train_losses]))
    (init_a, losses_a), (init_b, losses_b) = runs
    assert len(init_a) == 14 and init_a.keys() == init_b.keys()  # 7 linears x 2 blocks
    assert all(torch.equal(init_a[n], init_b[n]) for n in init_a)
    assert len(losses_a) == 2 and losses_a == losses_b

    # The kit seeds before get_peft_model: without that, peft's draw of lora_A follows the global RNG.
    torch.manual_seed(1)
    unseeded = _with_adapter(fresh_model(tiny_model_dir), settings)
    other = {n: p for n, p in unseeded.named_parameters() if "lora_A" in n}
    assert other.keys() == init_a.keys() and not any(torch.equal(init_a[n], other[n]) for n in other)


# ------------------------------------------------------------------- notebook habits (issue 11, item 1)
def test_training_twice_on_the_same_model_object_starts_from_the_base(tiny_model_dir, tokenizer, examples, tmp_path):
    model = fresh_model(tiny_model_dir)
    original = {n: p.detach().clone() for n, p in model.named_parameters()}
    settings = small_settings(tiny_model_dir)
    first = train(model, tokenizer, examples, settings, tmp_path / "run1")
    # The first run's get_peft_model replaced the layers of `model` in place; run the same call again.
    with pytest.warns(UserWarning, match=r"already carried a LoRA adapter .*taken off"):
        second = train(model, tokenizer, examples, settings, tmp_path / "run2")
    assert [loss for _, loss in second.train_losses] == [loss for _, loss in first.train_losses]
    assert json.loads((second.adapter_dir / "adapter_config.json").read_text())["r"] == 4
    base = second.model.get_base_model()
    assert sum(isinstance(m, LoraLayer) for m in base.modules()) == 14  # 7 linears x 2 blocks, none wrapped twice
    with second.model.disable_adapter():
        now = {n.replace(".base_layer", ""): p for n, p in base.named_parameters() if "lora_" not in n}
    assert now.keys() == original.keys() and all(torch.equal(now[n], original[n]) for n in original)


# ------------------------------------------------------------- inits that rewrite the base (item 4)
class LogitsAtEnd(TrainerCallback):
    """The trained model's logits on a fixed input, taken when training ends (before the kit converts)."""

    def __init__(self, ids: torch.Tensor):
        self.ids, self.logits = ids, None

    def on_train_end(self, args, state, control, model=None, **kwargs):
        model.eval()
        with torch.no_grad():
            self.logits = model(input_ids=self.ids).logits.clone()


@pytest.mark.parametrize("init", ["pissa", "olora"])
def test_weight_rewriting_init_keeps_the_base_and_saves_a_plain_lora(init, tiny_model_dir, tokenizer, examples, tmp_path):
    from lora_nb.adapters import load_adapter, merge_adapter
    from lora_nb.evaluate import heldout_loss

    settings = small_settings(tiny_model_dir, lora=LoraSettings(r=4, lora_alpha=8, init_lora_weights=init))
    ids = torch.tensor([[5, 17, 33, 60, 2, 9]])
    probe = LogitsAtEnd(ids)
    result = train(fresh_model(tiny_model_dir), tokenizer, examples, settings, tmp_path / "run", callbacks=[probe])
    base = fresh_model(tiny_model_dir)
    # "Before" (adapter off) is the pristine base again, not the residual W - s B0 A0.
    assert heldout_loss(result.model, tokenizer, examples, adapter=False).loss == pytest.approx(
        heldout_loss(base, tokenizer, examples).loss, abs=1e-5)
    result.model.eval()
    with torch.no_grad():
        assert (result.model(input_ids=ids).logits - probe.logits).abs().max() < 1e-4  # "after" = what was trained
    config = json.loads((result.adapter_dir / "adapter_config.json").read_text())
    assert config["r"] == 8 and config["init_lora_weights"] is True  # peft's conversion: rank 2r, plain LoRA
    reloaded = load_adapter(base, result.run_dir)
    with torch.no_grad():
        assert (reloaded(input_ids=ids).logits - probe.logits).abs().max() < 1e-4
    merged = AutoModelForCausalLM.from_pretrained(merge_adapter(result.run_dir, tmp_path / "merged"))
    with torch.no_grad():
        assert (merged(input_ids=ids).logits - probe.logits).abs().max() < 1e-4


def test_a_pissa_run_resumes_to_the_uninterrupted_losses(tiny_model_dir, tokenizer, examples, tmp_path):
    settings = small_settings(tiny_model_dir, lora=LoraSettings(r=4, lora_alpha=8, init_lora_weights="pissa"), max_steps=3)
    whole = train(fresh_model(tiny_model_dir), tokenizer, examples, settings, tmp_path / "whole")
    train(fresh_model(tiny_model_dir), tokenizer, examples, settings, tmp_path / "parts", callbacks=[StopAfter(1)])
    resumed = train(fresh_model(tiny_model_dir), tokenizer, examples, settings, tmp_path / "parts", resume=True)
    assert [loss for _, loss in resumed.train_losses][-2:] == pytest.approx([loss for _, loss in whole.train_losses][1:], abs=1e-6)
    ids = torch.tensor([[5, 17, 33, 60, 2, 9]])
    with torch.no_grad():
        assert (resumed.model(input_ids=ids).logits - whole.model(input_ids=ids).logits).abs().max() < 1e-4


def test_before_numbers_refused_on_a_rewritten_base_the_kit_did_not_restore(tiny_model_dir, tokenizer, examples):
    from peft import LoraConfig, get_peft_model

    from lora_nb.errors import ModelLoadError
    from lora_nb.evaluate import heldout_loss

    model = get_peft_model(fresh_model(tiny_model_dir), LoraConfig(r=4, target_modules=["q_proj"], init_lora_weights="pissa"))
    with pytest.raises(ModelLoadError, match=r"init_lora_weights 'pissa', which rewrote the base weights.*load the base model fresh"):
        heldout_loss(model, tokenizer, examples, adapter=False)
    with pytest.raises(SettingsError, match=r"rewrote the base weights, so its base model cannot be recovered"):
        train(model, tokenizer, examples, small_settings(tiny_model_dir), "unused-run-dir")
    assert not Path("unused-run-dir").exists()


# ---------------------------------------------------------------- never write over the user's files (item 5)
def test_new_run_refuses_a_folder_with_the_users_own_files(tiny_model_dir, tokenizer, examples, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "settings.yaml").write_text("my own notes\n")
    (out / "metrics.json").write_text('{"mine": 1}\n')
    (out / "notes.txt").write_text("unrelated\n")
    with pytest.raises(RunFolderError, match=r"already holds metrics\.json, settings\.yaml, which this kit did not write"):
        train(fresh_model(tiny_model_dir), tokenizer, examples, small_settings(tiny_model_dir), out)
    assert (out / "settings.yaml").read_text() == "my own notes\n" and (out / "metrics.json").read_text() == '{"mine": 1}\n'
    assert sorted(p.name for p in out.iterdir()) == ["metrics.json", "notes.txt", "settings.yaml"]
    (out / "settings.yaml").unlink()
    (out / "metrics.json").unlink()
    result = train(fresh_model(tiny_model_dir), tokenizer, examples, small_settings(tiny_model_dir), out)
    assert (out / "notes.txt").read_text() == "unrelated\n" and "settings.yaml" in RunFolder(out).written()
    write_report_into = tmp_path / "plain"
    write_report_into.mkdir()
    (write_report_into / "metrics.json").write_text("{}\n")
    from lora_nb.evaluate import EvalReport, write_report

    with pytest.raises(RunFolderError, match=r"already holds metrics\.json, which this kit did not write"):
        write_report(EvalReport({"before": {}, "after": {}}), write_report_into)
    write_report(EvalReport({"before": {}, "after": {}}), result.run_dir)  # the kit's own run: allowed
    assert {"metrics.json", "generations.md"} <= RunFolder(result.run_dir).written()


def test_a_run_folder_in_use_is_locked(tiny_model_dir, tokenizer, examples, tmp_path):
    run = tmp_path / "run"
    with RunFolder(run).lock():
        with pytest.raises(RunFolderError, match=r"run is in use by another training run \(process \d+ since .*\)\. .*wait until"):
            train(fresh_model(tiny_model_dir), tokenizer, examples, small_settings(tiny_model_dir), run)
        assert sorted(p.name for p in run.iterdir()) == [".lora-nb.lock"]
    assert list(run.iterdir()) == []  # the lock goes with the run
    assert train(fresh_model(tiny_model_dir), tokenizer, examples, small_settings(tiny_model_dir), run).global_step == 2


def test_a_run_folder_locked_by_another_process_and_released_when_it_dies(tiny_model_dir, tokenizer, examples, tmp_path):
    import subprocess
    import sys

    run = tmp_path / "run"
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time\nfrom lora_nb.run_folder import RunFolder\n"
         f"with RunFolder({str(run)!r}).lock():\n    print('locked', flush=True)\n    time.sleep(120)"],
        stdout=subprocess.PIPE, text=True, env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])})
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(RunFolderError, match=rf"in use by another training run \(process {holder.pid} since"):
            train(fresh_model(tiny_model_dir), tokenizer, examples, small_settings(tiny_model_dir), run)
    finally:
        holder.kill()  # SIGKILL: no clean-up runs in the holder
        holder.wait()
    assert train(fresh_model(tiny_model_dir), tokenizer, examples, small_settings(tiny_model_dir), run).global_step == 2


def test_cli_out_with_the_users_files_is_refused(tiny_model_dir, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "log.jsonl").write_text("my log\n")
    assert main(["run", "--model", tiny_model_dir, "--out", str(out), "--max-steps", "1"]) == 1
    assert "which this kit did not write there" in capsys.readouterr().err
    assert [p.name for p in out.iterdir()] == ["log.jsonl"] and (out / "log.jsonl").read_text() == "my log\n"


def test_weight_rewriting_init_refused_on_a_quantized_base_or_with_dora(tiny_model_dir, tokenizer, examples, tmp_path):
    from lora_nb.loading import load_model

    quantized = load_model(tiny_model_dir, "4bit", strict=True).model
    pissa = small_settings(tiny_model_dir, lora=LoraSettings(r=4, lora_alpha=8, init_lora_weights="pissa"))
    with pytest.raises(SettingsError, match=r"'pissa' rewrites the base weights, which cannot be done faithfully on a quantized"):
        train(quantized, tokenizer, examples, pissa, tmp_path / "run")
    dora = small_settings(tiny_model_dir, lora=LoraSettings(r=4, lora_alpha=8, init_lora_weights="olora", use_dora=True))
    with pytest.raises(SettingsError, match=r"'olora' with use_dora cannot be saved as an adapter of the original base"):
        train(fresh_model(tiny_model_dir), tokenizer, examples, dora, tmp_path / "run")
    assert not (tmp_path / "run").exists()


def test_merge_never_writes_over_the_base_model_or_foreign_files(checkpointed_original, tiny_model_dir, tmp_path):
    from lora_nb.adapters import merge_adapter

    _, run = checkpointed_original
    before = _files(Path(tiny_model_dir))
    with pytest.raises(RunFolderError, match=r"it is the base model's folder .*would overwrite its files"):
        merge_adapter(run, tiny_model_dir)
    with pytest.raises(RunFolderError, match=r"it is the adapter's folder"):
        merge_adapter(run, run / "adapter")
    assert _files(Path(tiny_model_dir)) == before
    blocker = tmp_path / "model.safetensors"
    blocker.write_text("a file")
    with pytest.raises(RunFolderError, match=r"it is a file, not a folder"):
        merge_adapter(run, blocker)
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "config.json").write_text("{}")
    with pytest.raises(RunFolderError, match=r"already holds \['config\.json'\], which this kit did not write"):
        merge_adapter(run, mine)
    assert (mine / "config.json").read_text() == "{}" and blocker.read_text() == "a file"
    out = merge_adapter(run, tmp_path / "merged")
    assert merge_adapter(run, out) == out and (out / "lora-nb-merged.json").exists()  # the kit's own: replaced
    assert leftovers(tmp_path) == []


# -------------------------------------------------------------------------------- resume (item 6)
def test_resume_refuses_other_weights_and_another_adapter_shape(checkpointed_run, tiny_model_dir, tokenizer, examples, tmp_path):
    from lora_nb.train import check_resumable

    settings, run = checkpointed_run
    other_dir = tmp_path / "other" / Path(tiny_model_dir).name  # same folder name, same architecture
    other = fresh_model(tiny_model_dir)
    with torch.no_grad():
        other.get_input_embeddings().weight.mul_(1.5)
    other.save_pretrained(other_dir)
    with pytest.raises(RunFolderError, match=r"is a run of another model .*same architecture and size, but other weights"):
        train(AutoModelForCausalLM.from_pretrained(other_dir), tokenizer, examples, settings, run, resume=True)
    wider = small_settings(tiny_model_dir, lora=LoraSettings(r=8, lora_alpha=16), save_steps=1)
    for attempt in (lambda: check_resumable(run, wider),  # the command line's check, before the model loads
                    lambda: train(fresh_model(tiny_model_dir), tokenizer, examples, wider, run, resume=True)):
        with pytest.raises(RunFolderError, match=r"checkpoint-2 holds an adapter of another shape .*\(r 4 -> 8\)"):
            attempt()
    assert RunFolder(run).read_run()["status"] == "finished"


def test_weights_digest_is_the_same_in_every_precision_and_spans_big_tables(tiny_model_dir):
    from lora_nb.loading import load_model
    from lora_nb.run_folder import weights_digest

    digest = weights_digest(fresh_model(tiny_model_dir))
    assert weights_digest(AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.bfloat16)) == digest
    assert weights_digest(load_model(tiny_model_dir, "4bit", strict=True).model) == digest
    big = torch.nn.Embedding(49152, 576)  # the demo model's table: 28.3M values, past float32's exact integers
    holder = type("Holder", (), {"get_input_embeddings": lambda self: big})()
    assert len(weights_digest(holder)) == 16


# ---------------------------------------------------------------- models the kit cannot train (item 7)
def test_an_encoder_loaded_as_a_causal_lm_is_refused(tokenizer, examples, tmp_path):
    from transformers import BertConfig

    from lora_nb.errors import ModelLoadError

    bert = AutoModelForCausalLM.from_config(BertConfig(vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=2,
                                                       num_attention_heads=4, intermediate_size=64))
    with pytest.raises(ModelLoadError, match=r"\(bert\) is not a causal \(decoder-only\) language model.*Use a decoder-only model"):
        train(bert, tokenizer, examples, small_settings("bert"), tmp_path / "run")
    assert not (tmp_path / "run").exists()


def test_max_seq_length_beyond_learned_positions_is_refused(tokenizer, examples, tmp_path):
    from transformers import GPT2Config

    gpt2 = AutoModelForCausalLM.from_config(GPT2Config(vocab_size=len(tokenizer), n_embd=32, n_layer=2, n_head=4, n_positions=64))
    with pytest.raises(SettingsError, match=r"max_seq_length is 96, but .*\(gpt2\) has position embeddings for 64 tokens "
                                            r"only .*IndexError.*set train\.max_seq_length to 64 or less"):
        train(gpt2, tokenizer, examples, small_settings("gpt2", LoraSettings(r=4, lora_alpha=8, fan_in_fan_out=True)),
              tmp_path / "run")
    assert not (tmp_path / "run").exists()


# ----------------------------------------------------------------- damaged or foreign run files (item 10)
def test_run_and_log_files_of_the_wrong_json_type(checkpointed_run, tiny_model_dir, tokenizer, examples):
    from lora_nb.plots import loss_points
    from lora_nb.runs import load_run

    settings, run = checkpointed_run
    log = run / "log.jsonl"
    good = log.read_text().splitlines()
    log.write_text("\n".join([good[0], "[1, 2]", '"a string"', "7", '{"step": "two", "loss": 1.0}', *good[1:]]) + "\n")
    with pytest.warns(UserWarning, match=r"log\.jsonl: line\(s\) \[2, 3, 4, 5\] are not log records of the kit"):
        assert [r["step"] for r in RunFolder(run).read_log()] == [json.loads(line)["step"] for line in good]
    with pytest.warns(UserWarning, match=r"line\(s\) \[2, 3, 4, 5\]"):
        assert [s for s, _ in loss_points(run)[0]] == [1, 2]
    (run / "run.json").write_text("[1, 2, 3]\n")
    assert load_run(run).run == {}
    with pytest.raises(RunFolderError, match=r"run\.json is corrupt: it holds a JSON list, where the kit writes an object"):
        train(fresh_model(tiny_model_dir), tokenizer, examples, settings, run, resume=True)


def test_files_cut_short_are_named_or_skipped(checkpointed_run, tiny_model_dir, tokenizer, examples, tmp_path):
    from lora_nb.errors import ModelLoadError
    from lora_nb.adapters import load_adapter
    from lora_nb.loading import load_model

    settings, run = checkpointed_run
    optimizer = run / "checkpoint-2" / "optimizer.pt"
    optimizer.write_bytes(optimizer.read_bytes()[:-300])  # a copy or a full disk cut it short
    with pytest.warns(UserWarning, match=r"Skipping incomplete checkpoint-2 \(optimizer\.pt is cut short: its zip directory is missing"):
        result = train(fresh_model(tiny_model_dir), tokenizer, examples, settings, run, resume=True)
    assert RunFolder(run).read_run()["resumed_from"] == "checkpoint-1" and result.global_step == 2
    weights = result.adapter_dir / "adapter_model.safetensors"
    size = weights.stat().st_size
    weights.write_bytes(weights.read_bytes()[: size // 2])
    with pytest.raises(ModelLoadError, match=rf"adapter_model\.safetensors is cut short: {size // 2:,} of {size:,} bytes"):
        load_adapter(fresh_model(tiny_model_dir), run)
    model_copy = Path(shutil.copytree(tiny_model_dir, tmp_path / "model"))
    (model_copy / "model.safetensors").write_bytes((model_copy / "model.safetensors").read_bytes()[:5000])
    with pytest.raises(ModelLoadError, match=r"model\.safetensors is cut short: 5,000 of [\d,]+ bytes.*Copy or download"):
        load_model(str(model_copy), "none")


def test_an_adapter_on_another_architecture(checkpointed_original, tokenizer):
    from transformers import GPT2Config

    from lora_nb.errors import ModelLoadError
    from lora_nb.adapters import load_adapter

    _, run = checkpointed_original
    gpt2 = AutoModelForCausalLM.from_config(GPT2Config(vocab_size=len(tokenizer), n_embd=32, n_layer=2, n_head=4))
    with pytest.raises(ModelLoadError, match=r"adapter in .*adapter \(trained on '.*model'\) does not fit .*\(gpt2\): .*Load the base model it was trained on"):
        load_adapter(gpt2, run)


def test_a_chat_template_that_refuses_a_system_turn(tiny_model_dir, examples, tmp_path):
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    tokenizer.chat_template = ("{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not supported') }}"
                               "{% endif %}" + tokenizer.chat_template)
    chat = [{"role": "user", "content": "Hi?"}, {"role": "assistant", "content": "Hi."}]
    data = tmp_path / "train.jsonl"
    data.write_text("\n".join(json.dumps({"messages": m}) for m in
                              (chat, chat, [{"role": "system", "content": "Be brief."}, *chat])) + "\n")
    with pytest.raises(DataError, match=r"train\.jsonl:3: the chat template of .* refuses this example \(System role not "
                                        r"supported\)\. This model's chat template has no system turn"):
        train(fresh_model(tiny_model_dir), tokenizer, data, small_settings(tiny_model_dir), tmp_path / "run")
    assert not (tmp_path / "run").exists()
    from lora_nb.evaluate import evaluate_run

    with pytest.raises(DataError, match=r"train\.jsonl:3: the chat template .* refuses this example"):
        evaluate_run(fresh_model(tiny_model_dir), tokenizer, data)  # the held-out side says it the same way


def test_layers_pattern_that_peft_refuses_is_said_in_the_kits_words(tiny_model_dir, tokenizer, examples, tmp_path):
    lora = LoraSettings(r=4, lora_alpha=8, target_modules=["q_proj"], layers_to_transform=[0], layers_pattern="layers|h")
    model = fresh_model(tiny_model_dir)
    with pytest.raises(SettingsError, match=r"peft could not put the LoRA adapter on .*\(llama\): Target modules \{'q_proj'\} "
                                            r"not found .*layers_pattern is one plain name"):
        train(model, tokenizer, examples, small_settings(tiny_model_dir, lora=lora), tmp_path / "run")
    assert not [n for n, _ in model.named_modules() if "lora_" in n] and not (tmp_path / "run").exists()


# ------------------------------------------------------------- the disk fills while Trainer saves a checkpoint
def test_full_disk_during_a_checkpoint_names_the_last_good_one(tiny_model_dir, tokenizer, examples, tmp_path, monkeypatch):
    from transformers import Trainer

    real = Trainer._save_optimizer_and_scheduler

    def save(self, output_dir):
        if self.state.global_step == 2:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), os.path.join(output_dir, "optimizer.pt"))
        return real(self, output_dir)

    monkeypatch.setattr(Trainer, "_save_optimizer_and_scheduler", save)
    settings = small_settings(tiny_model_dir, max_steps=3, save_steps=1)
    run = tmp_path / "run"
    with pytest.raises(RunFolderError) as err:
        train(fresh_model(tiny_model_dir), tokenizer, examples, settings, run)
    assert str(err.value) == (
        f"Training stopped: writing into {run} failed ({run / 'checkpoint-2' / 'optimizer.pt'}): No space left on device. "
        f"The last good checkpoint is {run / 'checkpoint-1'} (step 1): free some space, then call train(..., resume=True) "
        "with the same run_dir (command line: --resume) to continue from it.")
    assert RunFolder(run).read_run()["status"] == "failed" and not (run / ".lora-nb.lock").exists()
    monkeypatch.undo()
    with pytest.warns(UserWarning, match=r"Skipping incomplete checkpoint-2 .*resuming from checkpoint-1"):
        assert train(fresh_model(tiny_model_dir), tokenizer, examples, settings, run, resume=True).global_step == 3


def _train_notebook_run_twice(tmp_path: Path, monkeypatch) -> list[list[tuple[int, float]]]:
    """Notebook 03 top to bottom, then its training cell once more in the same kernel, as users re-run cells.

    Returns:
        The (step, loss) log of each of the two run folders, after checking both are finished runs.
    """
    import nbformat
    from nbclient import NotebookClient

    root = Path(__file__).resolve().parents[1]
    monkeypatch.setenv("PYTHONPATH", str(root))  # the kernel imports this checkout's lora_nb
    (tmp_path / "notebooks").mkdir()
    notebook = nbformat.read(root / "notebooks" / "03_train.ipynb", as_version=4)
    cell = next(i for i, c in enumerate(notebook.cells) if c.cell_type == "code" and "result = train(" in c.source)
    client = NotebookClient(notebook, timeout=1800, kernel_name="python3",  # a busy machine: minutes per cell
                            resources={"metadata": {"path": str(tmp_path / "notebooks")}})
    with client.setup_kernel():
        for i, code in enumerate(notebook.cells):
            client.execute_cell(code, i)
        client.execute_cell(notebook.cells[cell], cell)  # raises CellExecutionError on any error
    outputs = nbformat.writes(notebook)
    assert "already carried a LoRA adapter" in outputs and "Error" not in outputs
    runs = sorted((tmp_path / "runs").glob("train-*"))
    assert len(runs) == 2
    logs = []
    for run in runs:
        record = RunFolder(run).read_run()
        assert record["status"] == "finished" and record["global_step"] > 0
        logs.append([(r["step"], r["loss"]) for r in RunFolder(run).read_log() if "loss" in r])
    return logs


@pytest.mark.slow  # a notebook kernel: 20-70 s even with the tiny model
def test_notebook_training_cell_run_twice_on_the_tiny_model(tiny_model_dir, tmp_path, monkeypatch):
    settings = small_settings(tiny_model_dir, max_steps=3)  # 02_configure_lora's saved settings, tiny and short
    save_settings(settings, tmp_path / "runs" / "configured.yaml")
    first, second = _train_notebook_run_twice(tmp_path, monkeypatch)
    assert [s for s, _ in first] == [1, 2, 3] and first == second  # the second run started from the same base
    for run in (tmp_path / "runs").glob("train-*"):  # each adapter is the configured one, not one stacked on another
        assert json.loads((run / "adapter" / "adapter_config.json").read_text())["r"] == settings.lora.r
