"""Widgets: the LoRA configurator, where every knob of a run is picked with its explanation beside it.

:class:`LoraConfigurator` is generated from the settings fields (:func:`lora_nb.settings.field_specs`):
numbers with a range become sliders (log scale when the range spans decades, as the learning
rate's; a :class:`StepSlider` over powers of two with a box for any other value for integers such as
r, lora_alpha and the batch size), ``Literal`` choices dropdowns, booleans checkboxes, anything else a
text box read as YAML. Knobs that do nothing with the current choice (:func:`inactive_reasons`) are
disabled, with the reason shown under them.
Each control carries its help text as a tooltip and behind a "?" toggle. One ``observe`` handler
writes the changed value back into a draft :class:`~lora_nb.settings.KitSettings` and re-validates;
a live panel then shows the exact trainable-parameter count, the memory estimate by part, advice and
problems. A bad combination is shown as an error in the panel, never raised out of a handler.
The panel's :class:`SaveBar` writes ``configured.yaml`` for ``03_train`` only when pressed.

Layout (the tabs have a fixed width, so the panel stays put when another tab opens)::

    [model]  [preset v]
    ┌ LoRA ┬ Targets ┬ Quantization ┬ Training ┬ Export ┐     live panel: [Save for training]
    │ r ──●──── [16] [?]   ...                          │     saved where and when / trainable /
    └───────────────────────────────────────────────────┘     memory / warnings / errors

Where widgets cannot render (a notebook run headless, a terminal), the configurator's text/plain
form is a readable summary of the settings and the counts.
"""

from __future__ import annotations

import contextlib
import copy
import html
import warnings
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import ipywidgets as W
import matplotlib.figure
import matplotlib.pyplot as plt
import peft
import torch.nn

from . import formats
from .errors import ConfigFileError, LoraNbError, SettingsError, quote
from .estimate import count_trainable, default_target_sets, estimate_for_lengths, trainable_by_rank
from .fit import plan_fit
from .panels import (NO_GPU, STYLE, WIDE, ExportTab, FieldRow, Key, LivePanel, SaveBar, StepSlider, TargetPicker,
                     field_rows, help_html, label, memory_html, mib, num, trainable_text)
from .presets import PRESETS, get_preset
from .settings import ALL_LINEAR, SECTIONS, KitSettings, LoraSettings, field_specs
from .targets import find_targets

TAB_TITLES = ("LoRA", "Targets", "Quantization", "Training", "Export")
_NO_PRESET = "(choose a preset)"
_TABS_WIDTH = "640px"  # fixed, so the live panel beside the tabs stays put when another tab opens


def inactive_reasons(settings: KitSettings) -> dict[Key, str]:
    """Knobs that do nothing with the current choice, each with the reason (their controls are disabled).

    Args:
        settings: The settings as shown.

    Returns:
        ``(section, field)`` -> a short reason, e.g. the ``bnb_4bit_*`` knobs while ``load_in`` is not 4bit.
    """
    reasons: dict[Key, str] = {}
    load_in = settings.quant.load_in
    if load_in != "4bit":
        for spec in field_specs(SECTIONS["quant"]):
            if spec.name.startswith("bnb_4bit_"):
                reasons[("quant", spec.name)] = f"only used with load_in: 4bit (now: {load_in})"
    if settings.lora.init_lora_weights != "loftq":
        reasons[("lora", "loftq_bits")] = (f"only used with init_lora_weights: loftq "
                                           f"(now: {settings.lora.init_lora_weights})")
    if settings.train.loraplus_lr_ratio is None:
        reasons[("train", "loraplus_lr_embedding")] = "only used with loraplus_lr_ratio (now: null)"
    return reasons



class LoraConfigurator:
    """A ``display()``-able configurator of every LoRA, quantization and training setting.

    Args:
        model: The base model (before ``get_peft_model``). With it, targets are picked from its layers
            and the trainable count and memory estimate are live; without it, targets are typed as text.
        settings: Starting settings; default ``KitSettings()``. Copied, never changed in place.
        run_dir: Folder where the export buttons save files by default (``runs`` of the repository;
            a notebook in ``notebooks/`` passes ``"../runs"``).

    Attributes:
        widget: The root ipywidgets container (what ``display(configurator)`` shows).
        controls: ``"lora.r"``-style key -> the control generated for that field.
        errors: Problems of the current draft (shown in the panel; empty when valid).
        warnings: Advice on the current draft.
        trainable: ``(trainable, total)`` parameters of the current draft, or None.
        memory: The :class:`~lora_nb.estimate.MemoryEstimate` of the current draft, or None.
    """

    def __init__(self, model: torch.nn.Module | None = None, settings: KitSettings | None = None,
                 run_dir: str | Path = "runs"):
        self.model = model
        self.run_dir = Path(run_dir)
        self._draft = copy.deepcopy(settings) if settings is not None else KitSettings()
        self._targets = None if model is None else find_targets(model)
        self._quiet = False  # True while the code (not the user) sets control values
        self._parse_errors: dict[Key, str] = {}
        self.controls: dict[str, W.Widget] = {}
        self.errors: list[str] = []
        self.warnings: list[str] = []
        self.trainable: tuple[int, int] | None = None
        self.memory: Any = None
        self.memory_by_length: dict[str, Any] = {}  # "longest batch" / "typical batch" / "worst case" estimates
        self.data_lengths: list[int] = []  # tokens per training example, from set_data_lengths
        self.message = ""  # result of the last button action (save, load, preset)
        self.widget = self._build()
        self._write_controls()
        self._refresh()

    # ---------------------------------------------------------------------------------------------
    # Public API
    # ---------------------------------------------------------------------------------------------

    @property
    def settings(self) -> KitSettings:
        """The validated settings shown in the widgets (a copy).

        Raises:
            SettingsError: Listing every problem, when the current choice is invalid.
        """
        problems = list(self._parse_errors.values()) + self._draft.problems(self.model)
        if problems:
            raise SettingsError(problems)
        return copy.deepcopy(self._draft)

    @settings.setter
    def settings(self, settings: KitSettings) -> None:
        self.set_settings(settings)

    @property
    def draft(self) -> KitSettings:
        """The settings as currently shown, valid or not (a copy)."""
        return copy.deepcopy(self._draft)

    def set_settings(self, settings: KitSettings) -> None:
        """Shows ``settings`` in every control (invalid values are kept and reported in the panel)."""
        self._draft = copy.deepcopy(settings)
        self._parse_errors.clear()
        self._write_controls()
        self._refresh()

    def peft_config(self) -> peft.LoraConfig:
        """The ``peft.LoraConfig`` of the validated settings ('all-linear' expanded when a model is known).

        Raises:
            SettingsError: When the settings are invalid.
        """
        return self.settings.to_peft(self.model)

    def apply(self, model: torch.nn.Module | None = None) -> peft.PeftModel:
        """Wraps a model with the chosen adapter (``peft.get_peft_model``).

        Args:
            model: The base model; default the configurator's own model.

        Returns:
            The peft model; only the adapter (and ``modules_to_save``) is trainable.

        Raises:
            SettingsError: When the settings are invalid, or no model is known.
        """
        model = model if model is not None else self.model
        if model is None:
            raise SettingsError("apply() needs a model: pass one, or give the configurator one")
        settings = self.settings
        settings.lora.check(model)
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
            return peft.get_peft_model(model, settings.to_peft(model))

    def apply_preset(self, name: str) -> None:
        """Shows the preset ``name`` (from :mod:`lora_nb.presets`); the model name is kept."""
        preset = get_preset(name)
        preset.model_name_or_path = self._draft.model_name_or_path
        self.set_settings(preset)
        self._say(f"preset {html.escape(name)} applied: {html.escape(PRESETS[name].description)}")

    def export_text(self, form: str) -> str:
        """The current settings as text in one of :data:`lora_nb.formats.FORMATS` (``kit``, ``axolotl``,
        ``lora``, ``peft``, ``python`` ...).

        Raises:
            SettingsError: When the settings are invalid or the form is unknown.
        """
        _check_form(form)
        return formats.dump_settings(self.settings, form, self.model)

    def save(self, form: str = "kit", path: str | Path | None = None) -> Path:
        """Saves the current settings in one form.

        Args:
            form: A name in :data:`lora_nb.formats.FORMATS`.
            path: Destination; default the run folder's file for that form (``runs/configured.yaml`` ...).

        Returns:
            The path written.

        Raises:
            SettingsError: When the settings are invalid.
            ConfigFileError: When the file cannot be written.
        """
        _check_form(form)
        entry = formats.FORMATS[form]
        if path is not None and not str(path).strip():
            raise ConfigFileError(f"the {entry.title} file name is empty: type a path such as "
                                  f"{self.run_dir / entry.file_name}")
        path = Path(path) if path is not None else self.run_dir / entry.file_name
        formats.save_settings(self.settings, path, form, self.model)
        return path

    def load(self, source: str | Path) -> list[str]:
        """Reads settings from a file (any form :func:`lora_nb.formats.load_settings` knows) into the widgets.

        Returns:
            Keys of the file the kit does not use (shown as a warning, not dropped silently).

        Raises:
            ConfigFileError, SettingsError: When the file cannot be read or holds invalid values.
        """
        result = formats.load_settings(Path(source))
        self.set_settings(result.settings)
        return list(result.unknown_keys)

    def summary(self) -> str:
        """A plain-text summary: model, main settings, trainable count, memory, warnings and errors."""
        s = self._draft
        lo, qu, tr = s.lora, s.quant, s.train
        targets = lo.target_modules if lo.target_modules == ALL_LINEAR else ", ".join(map(str, lo.target_modules))
        layers = "every block" if lo.layers_to_transform is None else f"blocks {lo.layers_to_transform}"
        lines = [
            f"LoRA configurator for {s.model_name_or_path}",
            f"  LoRA:     r={lo.r}, lora_alpha={lo.lora_alpha} ({_scale(lo)}), dropout={lo.lora_dropout:g}, "
            f"bias={lo.bias}, use_rslora={lo.use_rslora}, use_dora={lo.use_dora}",
            f"  targets:  {targets} ({layers})",
            f"  quant:    load_in={qu.load_in}" + (f", {qu.bnb_4bit_quant_type}" if qu.load_in == "4bit" else ""),
            f"  training: lr={num(tr.learning_rate)}, epochs={num(tr.num_train_epochs)}, max_steps={tr.max_steps}, "
            f"batch={tr.per_device_train_batch_size} x {tr.gradient_accumulation_steps}, optim={tr.optim}",
        ]
        if self.trainable is not None:
            lines.append(f"  trainable parameters: {trainable_text(*self.trainable)}")
        if self.memory is not None:
            parts = ", ".join(f"{k} {mib(v)}" for k, v in self.memory.parts.items())
            lines.append(f"  memory estimate: {mib(self.memory.total_bytes)} ({parts})")
        lines += [f"  warning: {w}" for w in self.warnings]
        lines += [f"  error: {e}" for e in self.errors]
        return "\n".join(lines)

    def __repr__(self) -> str:
        return self.summary()

    def _repr_pretty_(self, printer: Any, cycle: bool) -> None:
        printer.text(self.summary())

    def _repr_mimebundle_(self, **kwargs: Any) -> dict[str, Any]:
        """The widget view where widgets render, with the text summary as text/plain everywhere else."""
        bundle = self.widget._repr_mimebundle_(**kwargs)
        bundle["text/plain"] = self.summary()
        return bundle

    # ---------------------------------------------------------------------------------------------
    # Building: tabs of generated rows, the targets picker, the export tab, the live panel
    # ---------------------------------------------------------------------------------------------

    def _build(self) -> W.Widget:
        picker_keys = set(TargetPicker.KEYS) if self._targets is not None else set()
        rows = {key: FieldRow(key, spec, self._on_edit) for key, spec in (
            ((section, spec.name), spec) for section, cls in (("", KitSettings), *SECTIONS.items())
            for spec in field_specs(cls) if spec.name not in SECTIONS)
            if key not in picker_keys}
        self._rows = rows
        self.controls = {label(key): row.control for key, row in rows.items()}
        self._reasons = {key: row.reason for key, row in rows.items()}
        self.targets_tab = None
        targets_children = []
        if self._targets is not None:
            layers_help = help_html(next(s for s in field_specs(LoraSettings) if s.name == "layers_to_transform"))
            self.targets_tab = TargetPicker(self._targets, self._on_edit, self._set_field, layers_help)
            self.controls |= {label(key): control for key, control in self.targets_tab.controls.items()}
            targets_children.append(self.targets_tab.widget)

        def section_rows(section: str, keep: Callable[[Any], bool] = lambda spec: True) -> list[FieldRow]:
            return [row for (sec, _), row in rows.items() if sec == section and keep(row.spec)]

        tabs = W.Tab(children=[
            field_rows(section_rows("lora", lambda spec: spec.group != "targets")),
            W.VBox(targets_children + [field_rows(section_rows("lora", lambda spec: spec.group == "targets"))]),
            field_rows(section_rows("quant")), field_rows(section_rows("train")), self._export_tab().widget])
        tabs.titles = TAB_TITLES
        tabs.layout = W.Layout(width=_TABS_WIDTH, min_width=_TABS_WIDTH)
        tabs.add_class("lora-nb-tabs")
        tabs.observe(self._on_tab, names="selected_index")  # exports are written when their tab opens
        self._tabs = tabs

        self._preset = W.Dropdown(options=[_NO_PRESET, *PRESETS], description="preset",
                                  tooltip="Fill every setting from a named preset (lora_nb.presets)",
                                  style=STYLE, layout=WIDE)
        self._preset.add_class("lora-nb-preset")
        self._preset.observe(self._on_preset, names="value")
        self.save_bar = SaveBar(self.run_dir / formats.FORMATS["kit"].file_name, lambda: self.save("kit"),
                                lambda: self.draft)
        self.panel = LivePanel(self.save_bar, self._show_memory)
        root = W.VBox([W.VBox([rows[("", "model_name_or_path")].widget, self._preset]),
                       W.HBox([tabs, self.panel.widget])])
        root.add_class("lora-nb-configurator")
        return root

    def _export_tab(self) -> ExportTab:
        def save(form: str, path: str) -> None:
            saved = self.save(form, path)
            self._say(f"saved {formats.FORMATS[form].title} to <code>{html.escape(str(saved))}</code>")

        def load(path: str) -> None:
            unknown = self.load(path)
            self._say(f"loaded <code>{html.escape(path)}</code>" + (
                f"; keys not used by the kit: {html.escape(', '.join(unknown))}" if unknown else ""))

        self.export_tab = ExportTab(self.run_dir, lambda form, path: self._guard(lambda: save(form, path)),
                                    lambda path: self._guard(lambda: load(path)),
                                    lambda files: self._guard(lambda: self._load_upload(files)))
        return self.export_tab

    # ---------------------------------------------------------------------------------------------
    # What the parts report: an edit, a value set by a button, a tab or a preset chosen
    # ---------------------------------------------------------------------------------------------

    def _on_edit(self, key: Key, read: Callable[[], Any]) -> None:
        """A control's value changed: write it back into the draft, re-validate, refresh the panel."""
        if self._quiet:
            return
        with self._reporting():
            self._parse_errors.pop(key, None)
            try:
                _set(self._draft, key, read())
            except ValueError as err:
                self._parse_errors[key] = f"{label(key)}: {err}"
            else:
                if key in TargetPicker.KEYS:
                    self._show_field(key)  # keep the box states consistent (all-linear ticks every box)
            self._refresh()

    def _set_field(self, key: Key, value: Any) -> None:
        """A button's action: set one field, show it, re-validate."""
        with self._reporting():
            _set(self._draft, key, copy.deepcopy(value))
            self._parse_errors.pop(key, None)
            self._show_field(key)
            self._refresh()

    def _on_tab(self, change: dict[str, Any]) -> None:
        if change["new"] == TAB_TITLES.index("Export"):
            with self._reporting():
                self.export_tab.show(self._draft, self.errors, self.model)

    def _on_preset(self, change: dict[str, Any]) -> None:
        if self._quiet or change["new"] == _NO_PRESET:
            return
        self._guard(lambda: self.apply_preset(change["new"]))
        with self._quietly():
            self._preset.value = _NO_PRESET

    @contextlib.contextmanager
    def _reporting(self) -> Iterator[None]:
        """A handler must never raise into the frontend: an unexpected error is shown in the panel."""
        try:
            yield
        except Exception as err:
            self.errors.append(f"internal error while updating: {type(err).__name__}: {err}")
            self.panel.show(self.trainable, self.model is not None, self.warnings, self.errors)

    def _guard(self, action: Callable[[], None]) -> None:
        """A button's action: the kit's errors become the panel's message."""
        try:
            action()
        except (LoraNbError, ValueError, OSError) as err:
            self._say(f"<span style='color:#b00'>{html.escape(str(err))}</span>")

    def _say(self, message: str) -> None:
        self.message = message
        self.panel.message_html.value = message

    def _load_upload(self, files: Any) -> None:
        item = files[0]
        name = quote(str(item.get("name", "")), 80)
        content = item["content"]
        if len(content) > formats.MAX_SETTINGS_CHARS:
            raise ConfigFileError(f"upload {name} holds {len(content):,} bytes, more than a settings file's "
                                  f"{formats.MAX_SETTINGS_CHARS:,}: upload the settings file (.yaml, .yml or .json)")
        try:
            text = bytes(content).decode("utf-8-sig")
        except UnicodeDecodeError as err:
            raise ConfigFileError(f"upload {name} is not UTF-8 text (byte {bytes(content)[err.start]:#04x} at offset "
                                  f"{err.start}): save it as UTF-8 (in most editors: 'Save with encoding' -> "
                                  "UTF-8) and upload it again") from None
        # The upload's text is parsed as settings, never as a path: its content cannot open a file here.
        result = formats.load_settings_text(text, where=f"upload {name}")
        self.set_settings(result.settings)
        unknown = list(result.unknown_keys)
        self._say(f"loaded upload {html.escape(name)}" + (
            f"; keys not used by the kit: {html.escape(quote(unknown, 300))}" if unknown else ""))

    # ---------------------------------------------------------------------------------------------
    # Draft -> controls
    # ---------------------------------------------------------------------------------------------

    @contextlib.contextmanager
    def _quietly(self) -> Iterator[None]:
        was, self._quiet = self._quiet, True
        try:
            yield
        finally:
            self._quiet = was

    def _write_controls(self) -> None:
        for key in [*self._rows, *(TargetPicker.KEYS[:1] if self.targets_tab is not None else ())]:
            self._show_field(key)

    def _show_field(self, key: Key) -> None:
        with self._quietly():
            if key in self._rows:
                self._rows[key].show(_get(self._draft, key))
            else:
                self.targets_tab.show(self._draft)

    # ---------------------------------------------------------------------------------------------
    # Validation and the live panel
    # ---------------------------------------------------------------------------------------------

    def _refresh(self) -> None:
        """Re-validates the draft and recomputes counts, memory, warnings and the exports."""
        draft = self._draft
        errors = list(self._parse_errors.values())
        try:
            errors += draft.problems(self.model)
        except Exception as err:
            errors.append(f"could not check the settings: {err}")
        warnings: list[str] = []
        if not errors:
            try:
                warnings = draft.advice()
            except Exception as err:
                warnings = [f"could not compute advice: {err}"]
        self.trainable, self.memory = None, None
        if not errors and self.model is not None:
            try:
                self.trainable = count_trainable(self.model, draft.lora)
                self._estimate_memory(draft)
            except Exception as err:
                errors.append(f"could not count parameters: {err}")
        self.errors, self.warnings = errors, warnings
        self.panel.show(self.trainable, self.model is not None, warnings, errors)
        self._show_memory()
        reasons = inactive_reasons(draft)
        for key, row in self._rows.items():
            row.show_reason(reasons.get(key, ""))
        self.save_bar.show(errors)
        if self._tabs.selected_index == TAB_TITLES.index("Export"):
            self.export_tab.show(draft, errors, self.model)

    # -- memory panel: the data's own lengths and a GPU verdict -----------------------------------
    def set_data_lengths(self, data: Any) -> None:
        """Makes the memory panel estimate the data's own lengths (longest and typical batch) beside the worst case.

        Args:
            data: Tokens per example (a list of ints), or a tokenized data set with ``input_ids``
                (``data.tokenize_examples``); an empty list goes back to the worst case only.
        """
        if hasattr(data, "column_names") or isinstance(data, dict):
            data = [len(ids) for ids in data["input_ids"]]
        self.data_lengths = [int(n) for n in data]
        self._refresh()

    def _estimate_memory(self, draft: KitSettings) -> None:
        self.memory_by_length = estimate_for_lengths(self.model, draft, self.data_lengths)
        self.memory = next(iter(self.memory_by_length.values()))  # the data's longest batch when known

    def gpu_verdict(self) -> Any:
        """The planner's :class:`~lora_nb.fit.FitReport` for the chosen GPU (at the data's longest batch), or None."""
        if self.panel.gpu.value == NO_GPU or self.memory is None or self.model is None:
            return None
        return plan_fit(self.model.config, self.panel.gpu.value, settings=self._draft, seq_len=self.memory.seq_len)

    def _show_memory(self) -> None:
        self.panel.memory_html.value = self._memory_panel_html()

    def _memory_panel_html(self) -> str:
        if self.memory is None:
            return ""
        text = memory_html(self.memory)
        if len(self.memory_by_length) > 1:
            rows = "".join(f"<tr><td>{html.escape(name)}</td><td>{m.batch_size} x {m.seq_len}</td>"
                           f"<td style='text-align:right'>{mib(m.total_bytes)}</td></tr>"
                           for name, m in self.memory_by_length.items())
            text = (f"<b>For your data</b> ({len(self.data_lengths)} examples):<table class='lora-nb-lengths'>{rows}"
                    f"</table>" + text)
        try:
            report = self.gpu_verdict()
        except Exception as err:  # an estimate problem must not break the panel
            return text + f"<br><small>no GPU verdict: {html.escape(str(err))}</small>"
        if report is not None:
            color = {"fits": "#070", "tight": "#a60"}.get(report.verdict, "#b00")
            text += (f"<div class='lora-nb-verdict'><b>On a {html.escape(report.gpu)}:</b> <span style='color:{color}'>"
                     f"<b>{report.verdict}</b></span> (needs about {report.need_bytes / 2**30:.1f} of "
                     f"{report.memory_bytes / 2**30:.1f} GiB; largest batch {report.largest_batch or 'none'})"
                     + (f"<br>to make it fit: {html.escape(report.fix)}" if report.fix else "") + "</div>")
        return text


# -------------------------------------------------------------------------------------------------
# Small helpers
# -------------------------------------------------------------------------------------------------


def _check_form(form: str) -> None:
    """Refuses an export form the configurator does not write, naming the ones it does."""
    if form not in formats.FORMATS:
        raise SettingsError(f"export form must be one of {', '.join(formats.FORMATS)}, got {quote(form)}: choose one "
                            "of them")


def _get(settings: KitSettings, key: Key) -> Any:
    return getattr(getattr(settings, key[0]) if key[0] else settings, key[1])


def _set(settings: KitSettings, key: Key, value: Any) -> None:
    setattr(getattr(settings, key[0]) if key[0] else settings, key[1], value)


def _scale(lora: LoraSettings) -> str:
    """The scale for the summary; a draft may hold values it cannot be computed from."""
    try:
        return "scale " + lora.scale_text()
    except (TypeError, ZeroDivisionError, ValueError):
        return "scale n/a"


# -------------------------------------------------------------------------------------------------
# Trainable parameters against the rank, as a plot (the counts: lora_nb.estimate.trainable_by_rank)
# -------------------------------------------------------------------------------------------------


def plot_trainable_vs_rank(model: torch.nn.Module, ranks: Sequence[int] = (1, 2, 4, 8, 16, 32, 64, 128),
                           target_sets: dict[str, str | list[str]] | None = None) -> matplotlib.figure.Figure:
    """Plots trainable parameters against the rank for a few target sets (exact counts, log-log axes).

    Args:
        model: The base model.
        ranks: LoRA ranks on the x axis.
        target_sets: Label -> ``target_modules``; default q+v, attention and all-linear.

    Returns:
        The figure (a notebook shows it when it is the cell's value).
    """
    counts = trainable_by_rank(model, ranks, target_sets)
    total = sum(p.numel() for p in model.parameters())
    fig, ax = plt.subplots(figsize=(6.5, 4))
    for target_set, values in counts.items():
        ax.plot(ranks, values, marker="o", label=target_set)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xticks(list(ranks), [str(r) for r in ranks])
    for share in (0.001, 0.01, 0.1):
        ax.axhline(share * total, color="grey", lw=0.6, ls=":")
        ax.annotate(f"{share:.1%} of the model", (ranks[0], share * total), fontsize=8, color="grey", va="bottom")
    ax.set_xlabel("LoRA rank r")
    ax.set_ylabel("trainable parameters")
    ax.set_title("Trainable parameters grow linearly with r")
    ax.legend()
    fig.tight_layout()
    plt.close(fig)  # returned, shown once by the notebook
    return fig


__all__ = ["LoraConfigurator", "StepSlider", "plot_trainable_vs_rank", "trainable_by_rank", "default_target_sets"]
