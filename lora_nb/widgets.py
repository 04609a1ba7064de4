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
import math
import time
import warnings
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import ipywidgets as W
import matplotlib.figure
import matplotlib.pyplot as plt
import peft
import torch.nn
import traitlets
import yaml

from . import formats
from .errors import ConfigFileError, LoraNbError, SettingsError, quote
from .estimate import count_trainable, estimate_for_lengths
from .files import write_text_atomic
from .fit import GPUS, plan_fit
from .presets import PRESETS, get_preset
from .settings import ALL_LINEAR, SECTIONS, FieldSpec, KitSettings, LoraSettings, field_specs
from .targets import Targets, find_targets

SLIDER_SPAN = 4096  # int ranges up to this wide become sliders; wider ones (seeds, sequence lengths) text boxes
LOG_DECADES = 3  # positive float ranges spanning this many powers of ten or more get a log-scale slider
POW2_RATIO = 1000  # int ranges from >= 1 whose max/min reaches this get a powers-of-two slider (r, alpha, batch)
TAB_TITLES = ("LoRA", "Targets", "Quantization", "Training", "Export")
_NO_PRESET = "(choose a preset)"
_WIDE = W.Layout(width="500px")
_STYLE = {"description_width": "205px"}  # the longest name, per_device_train_batch_size, fits uncut
_TABS_WIDTH = "640px"  # fixed, so the live panel beside the tabs stays put when another tab opens

Key = tuple[str, str]  # (section, field), section "" for KitSettings' own fields


class StepSlider(W.HBox):
    """A slider over the usual values (powers of two) with a box beside it for any other value.

    A linear 1-1024 slider crams 8, 16 and 32 into its first pixels, and a small drag jumps r from 20
    to 125. Here the stops are the powers of two in the allowed range, evenly spaced. A value typed into
    the box need not be a stop (20, or one outside the range, which the live panel then reports): it
    joins the stops while it is shown. ``value`` is the one value both parts show.
    """

    value = traitlets.Any()

    def __init__(self, lo: int, hi: int, **common: Any):
        self.stops = [2**k for k in range(hi.bit_length()) if lo <= 2**k <= hi]
        self.slider = W.SelectionSlider(options=self.stops, continuous_update=False, **common)
        self.box = W.IntText(layout=W.Layout(width="80px"), tooltip=common.get("tooltip", ""))
        self._syncing = False
        super().__init__([self.slider, self.box])  # no tooltip on the box itself: its view cannot show one
        self.slider.observe(self._from_part, names="value")
        self.box.observe(self._from_part, names="value")
        self.value = self.stops[0]

    @property
    def disabled(self) -> bool:
        """Whether both parts are disabled."""
        return self.slider.disabled

    @disabled.setter
    def disabled(self, value: bool) -> None:
        self.slider.disabled = self.box.disabled = value

    @traitlets.observe("value")
    def _show(self, change: dict[str, Any]) -> None:
        value = change["new"]
        if not isinstance(value, int) or isinstance(value, bool):
            return  # not a number: the draft keeps it and the panel reports it
        self._syncing = True
        try:
            options = sorted({*self.stops, value})
            if list(self.slider.options) != options:
                self.slider.options = options
            self.slider.value = value
            self.box.value = value
        finally:
            self._syncing = False

    def _from_part(self, change: dict[str, Any]) -> None:
        if not self._syncing:
            self.value = change["new"]


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
    return reasons


class SaveBar:
    """The panel's Save button: writes the settings that ``03_train.ipynb`` trains with, and says where and when.

    Saving is the learner's own act: nothing is written until the button is pressed (or
    :meth:`LoraConfigurator.save` is called), so "Run All" never saves defaults as if they were chosen, and
    the bar says when the shown settings differ from the saved ones.

    Args:
        path: The file the button writes (``<run_dir>/configured.yaml``).
        save: Writes the current settings there; returns the path (raises the kit's errors).
        current: The settings as currently shown.
    """

    def __init__(self, path: Path, save: Callable[[], Path], current: Callable[[], KitSettings]):
        self.path = path
        self._save, self._current = save, current
        self.saved: KitSettings | None = None  # what the button last wrote
        self.saved_at: float | None = None
        self.button = W.Button(description="Save for training", icon="save", button_style="primary",
                               tooltip=f"Write the settings shown to {path}, which 03_train.ipynb trains with")
        self.button.add_class("lora-nb-save-settings")
        self.button.on_click(lambda _b: self.press())
        self.status = _html("lora-nb-save-status")
        self.widget = W.VBox([self.button, self.status])

    def press(self) -> None:
        """Saves, then shows the absolute path and the time (or the problem)."""
        try:
            path = self._save()
        except (LoraNbError, OSError) as err:
            self.status.value = f"<span style='color:#b00'>not saved: {html.escape(str(err))}</span>"
            return
        self.path, self.saved, self.saved_at = path, self._current(), time.time()
        self.show(errors=[])

    def show(self, errors: Sequence[str]) -> None:
        """Updates the status line for the current settings."""
        self.button.disabled = bool(errors)
        text, color = self.state()
        if errors:
            text += " Fix the errors below to save."
        self.status.value = f"<small style='color:{color}'>{html.escape(text)}</small>"

    def state(self) -> tuple[str, str]:
        """The save state in words (saved where and when, changed since, or not saved yet), and its colour."""
        where = str(self.path.resolve())
        if self.saved is None:
            return f"Not saved yet. 03_train.ipynb trains with {where} {_saved_when(self.path)}", "#333"
        at = time.strftime("%H:%M:%S", time.localtime(self.saved_at))
        if self._current() != self.saved:
            return (f"Changed since saved at {at}: press Save again, or 03_train.ipynb trains with the saved "
                    f"settings in {where}.", "#a60")
        return f"Saved at {at} to {where}; 03_train.ipynb trains with it.", "#070"


def _saved_when(path: Path) -> str:
    if path.is_file():
        stamp = time.strftime("%Y-%m-%d %H:%M", time.localtime(path.stat().st_mtime))
        return f"(that file was saved earlier, on {stamp}; press Save to replace it with what you see)"
    return "once you press Save; until then it uses the demo-cpu preset"


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
        self._targets = _find_targets(model)
        self._quiet = False  # True while the code (not the user) sets control values
        self._parse_errors: dict[Key, str] = {}
        self._keys: dict[int, Key] = {}  # id(widget) -> the field it edits
        self._help: dict[int, W.HTML] = {}  # id("?" toggle) -> its help panel
        self._reasons: dict[Key, W.HTML] = {}  # field -> where the reason it is disabled shows
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
        self.message = f"preset {html.escape(name)} applied: {html.escape(PRESETS[name].description)}"
        self._show_message()

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
            f"  training: lr={_num(tr.learning_rate)}, epochs={_num(tr.num_train_epochs)}, max_steps={tr.max_steps}, "
            f"batch={tr.per_device_train_batch_size} x {tr.gradient_accumulation_steps}, optim={tr.optim}",
        ]
        if self.trainable is not None:
            lines.append(f"  trainable parameters: {_trainable_text(*self.trainable)}")
        if self.memory is not None:
            parts = ", ".join(f"{k} {_mib(v)}" for k, v in self.memory.parts.items())
            lines.append(f"  memory estimate: {_mib(self.memory.total_bytes)} ({parts})")
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
    # Building the widgets from the field specs
    # ---------------------------------------------------------------------------------------------

    def _build(self) -> W.Widget:
        lora_specs = field_specs(LoraSettings)
        target_names = {"target_modules", "layers_to_transform"} if self._targets is not None else set()
        lora_tab = self._field_rows("lora", [s for s in lora_specs if s.group != "targets"])
        targets_tab = W.VBox(
            ([self._target_picker()] if self._targets is not None else [])
            + [self._field_rows("lora", [s for s in lora_specs if s.group == "targets" and s.name not in target_names])])
        tabs = W.Tab(children=[lora_tab, targets_tab, self._field_rows("quant", field_specs(SECTIONS["quant"])),
                               self._field_rows("train", field_specs(SECTIONS["train"])), self._export_area()])
        tabs.titles = TAB_TITLES
        tabs.layout = W.Layout(width=_TABS_WIDTH, min_width=_TABS_WIDTH)
        tabs.add_class("lora-nb-tabs")
        tabs.observe(self._on_change, names="selected_index")  # exports are written when their tab opens
        self._tabs = tabs

        model_spec = next(s for s in field_specs(KitSettings) if s.name == "model_name_or_path")
        model_row = self._field_row("", model_spec)
        self._preset = W.Dropdown(options=[_NO_PRESET, *PRESETS], description="preset",
                                  tooltip="Fill every setting from a named preset (lora_nb.presets)",
                                  style=_STYLE, layout=_WIDE)
        self._preset.add_class("lora-nb-preset")
        self._preset.observe(self._on_change, names="value")

        self._trainable_html = _html("lora-nb-trainable")
        self._memory_html = _html("lora-nb-memory")
        self._gpu = _gpu_dropdown(self._on_gpu)
        self._warnings_html = _html("lora-nb-warnings")
        self._errors_html = _html("lora-nb-errors")
        self._message_html = _html("lora-nb-message")
        self.save_bar = SaveBar(self.run_dir / formats.FORMATS["kit"].file_name, lambda: self.save("kit"), lambda: self.draft)
        panel = W.VBox([W.HTML("<b>Live check</b>"), self.save_bar.widget, self._trainable_html, self._gpu, self._memory_html,
                        self._warnings_html, self._errors_html, self._message_html],
                       layout=W.Layout(width="400px", min_width="400px", border="1px solid #ccc", padding="6px"))
        panel.add_class("lora-nb-panel")
        root = W.VBox([W.VBox([model_row, self._preset]), W.HBox([tabs, panel])])
        root.add_class("lora-nb-configurator")
        return root

    def _field_rows(self, section: str, specs: Sequence[FieldSpec]) -> W.VBox:
        rows: list[W.Widget] = []
        group = None
        order = list(dict.fromkeys(s.group for s in specs))  # groups in order of first appearance
        for spec in sorted(specs, key=lambda s: order.index(s.group)):
            if spec.group != group:
                group = spec.group
                rows.append(W.HTML(f"<b>{html.escape(group)}</b>"))
            rows.append(self._field_row(section, spec))
        return W.VBox(rows)

    def _field_row(self, section: str, spec: FieldSpec) -> W.Widget:
        control = _control_for(spec)
        name = f"{section}.{spec.name}" if section else spec.name
        control.add_class(f"lora-nb-{spec.name.replace('_', '-')}")
        self._register(control, (section, spec.name))
        self.controls[name] = control
        toggle = W.ToggleButton(value=False, description="?", tooltip=f"Explain {name}",
                                layout=W.Layout(width="32px"))
        toggle.add_class("lora-nb-help-toggle")
        panel = W.HTML(_help_html(spec), layout=W.Layout(display="none", width="500px"))
        panel.add_class("lora-nb-help")
        self._help[id(toggle)] = panel
        toggle.observe(self._on_change, names="value")
        reason = W.HTML(layout=W.Layout(display="none"))
        reason.add_class("lora-nb-inactive-reason")
        self._reasons[(section, spec.name)] = reason
        return W.VBox([W.HBox([control, toggle]), panel, reason])

    def _register(self, control: W.Widget, key: Key) -> None:
        self._keys[id(control)] = key
        control.observe(self._on_change, names="value")

    def _target_picker(self) -> W.Widget:
        t = self._targets
        self._all_linear = W.Checkbox(description="all linear (every linear layer but the output head)",
                                      indent=False, tooltip="target_modules='all-linear'",
                                      style={"description_width": "initial"}, layout=W.Layout(width="auto"))
        self._all_linear.add_class("lora-nb-all-linear")
        self._register(self._all_linear, ("lora", "target_modules"))
        self._target_boxes: dict[str, W.Checkbox] = {}
        groups = []
        for group, names in (("attention", t.attention), ("MLP", t.mlp), ("other", t.other)):
            boxes = []
            for n in names:
                if n in self._target_boxes:  # a name in two groups (GPT-2 c_proj) gets one box
                    continue
                shapes = ", ".join(f"{i}->{o}" for i, o in t.shapes[n])
                box = W.Checkbox(description=n, indent=False, tooltip=f"{n}: {shapes}", layout=W.Layout(width="150px"))
                box.add_class(f"lora-nb-target-{n.replace('_', '-')}")
                self._register(box, ("lora", "target_modules"))
                self._target_boxes[n] = box
                boxes.append(box)
            if boxes:
                groups.append(W.VBox([W.HTML(f"<i>{group}</i>"), W.HBox(boxes, layout=W.Layout(flex_flow="row wrap"))]))
        qv = _q_and_v(t)
        buttons = []
        for label, names, cls in (("attention only", t.attention, "attention"), ("q + v", qv, "qv"),
                                  ("all linear", ALL_LINEAR, "all")):
            button = W.Button(description=label, disabled=not names, tooltip=f"target_modules = {names!r}")
            button.add_class(f"lora-nb-targets-{cls}")
            button.on_click(lambda _b, names=names: self._set_field(("lora", "target_modules"), names))
            buttons.append(button)
        self.controls["lora.target_modules"] = self._all_linear
        self._target_buttons = buttons

        self._every_block = W.Checkbox(description="every block", indent=False,
                                       tooltip="layers_to_transform = null: adapt all transformer blocks")
        self._every_block.add_class("lora-nb-every-block")
        self._blocks = W.SelectMultiple(options=list(range(t.n_layers)), rows=min(8, max(t.n_layers, 1)),
                                        description="blocks", tooltip="Blocks to adapt (ctrl/shift-click)",
                                        layout=W.Layout(width="200px"))
        self._blocks.add_class("lora-nb-layers-to-transform")
        for w in (self._every_block, self._blocks):
            self._register(w, ("lora", "layers_to_transform"))
        self.controls["lora.layers_to_transform"] = self._blocks
        spec = next(s for s in field_specs(LoraSettings) if s.name == "layers_to_transform")
        return W.VBox([
            W.HTML("<b>targets</b> (layers found in the model; hover for shapes)"),
            W.HBox(buttons), self._all_linear, *groups,
            W.HTML(f"<b>layers_to_transform</b> ({t.n_layers} blocks in "
                   f"<code>{html.escape(str(t.layers_pattern))}</code>)"),
            W.HBox([self._every_block, self._blocks]), W.HTML(_help_html(spec)),
        ])

    def _export_area(self) -> W.Widget:
        self._export_text: dict[str, W.Textarea] = {}
        self._export_path: dict[str, W.Text] = {}
        pages = []
        self._save_buttons: dict[str, W.Button] = {}
        for form, entry in formats.FORMATS.items():
            text = W.Textarea(layout=W.Layout(width="600px", height="300px"))
            text.add_class(f"lora-nb-export-{form}")
            path = W.Text(value=str(self.run_dir / entry.file_name), description="file", layout=_WIDE)
            path.add_class(f"lora-nb-save-path-{form}")
            button = W.Button(description=f"Save {entry.title}", icon="save")
            button.add_class(f"lora-nb-save-{form}")
            button.on_click(lambda _b, form=form: self._on_save(form))
            self._export_text[form], self._export_path[form], self._save_buttons[form] = text, path, button
            pages.append(W.VBox([text, W.HBox([path, button])]))
        inner = W.Tab(children=pages)
        inner.titles = tuple(entry.title for entry in formats.FORMATS.values())
        self._load_path = W.Text(value=str(self.run_dir / formats.FORMATS["kit"].file_name), description="load file",
                                 tooltip="A kit, axolotl, lora: YAML or peft JSON file", layout=_WIDE)
        self._load_path.add_class("lora-nb-load-path")
        self._load_button = W.Button(description="Load", icon="folder-open")
        self._load_button.add_class("lora-nb-load")
        self._load_button.on_click(lambda _b: self._on_load())
        self._upload = W.FileUpload(accept=".yaml,.yml,.json", multiple=False, description="Upload")
        self._upload.add_class("lora-nb-upload")
        self._upload.observe(self._on_change, names="value")
        return W.VBox([inner, W.HBox([self._load_path, self._load_button, self._upload])])

    # ---------------------------------------------------------------------------------------------
    # The one handler, and the actions of the buttons
    # ---------------------------------------------------------------------------------------------

    def _on_change(self, change: dict[str, Any]) -> None:
        """Every control's value change: write it back into the draft, re-validate, refresh the panel."""
        if self._quiet:
            return
        owner = change["owner"]
        try:
            if id(owner) in self._help:
                self._help[id(owner)].layout.display = "block" if change["new"] else "none"
                return
            if owner is getattr(self, "_preset", None):
                if change["new"] != _NO_PRESET:
                    self._guard(lambda: self.apply_preset(change["new"]))
                    with self._quietly():
                        self._preset.value = _NO_PRESET
                return
            if owner is getattr(self, "_tabs", None):
                if change["new"] == TAB_TITLES.index("Export"):
                    self._show_exports()
                return
            if owner is getattr(self, "_upload", None):
                self._guard(self._load_upload)
                return
            key = self._keys[id(owner)]
            self._read_field(key, owner)
            if key in (("lora", "target_modules"), ("lora", "layers_to_transform")) and key not in self._parse_errors:
                self._write_field(key)  # keep the box states consistent (all-linear ticks every box)
            self._refresh()
        except Exception as err:  # a handler must never raise into the frontend
            self.errors.append(f"internal error while updating: {type(err).__name__}: {err}")
            self._show_panel()

    def _guard(self, action: Any) -> None:
        try:
            action()
        except (LoraNbError, ValueError, OSError) as err:
            self.message = f"<span style='color:#b00'>{html.escape(str(err))}</span>"
            self._show_message()

    def _on_save(self, form: str) -> None:
        def save() -> None:
            path = self.save(form, self._export_path[form].value)
            self.message = f"saved {formats.FORMATS[form].title} to <code>{html.escape(str(path))}</code>"
            self._show_message()
        self._guard(save)

    def _on_load(self) -> None:
        def load() -> None:
            unknown = self.load(self._load_path.value)
            self.message = f"loaded <code>{html.escape(self._load_path.value)}</code>" + (
                f"; keys not used by the kit: {html.escape(', '.join(unknown))}" if unknown else "")
            self._show_message()
        self._guard(load)

    def _load_upload(self) -> None:
        files = self._upload.value
        if not files:
            return
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
        self.message = f"loaded upload {html.escape(name)}" + (
            f"; keys not used by the kit: {html.escape(quote(unknown, 300))}" if unknown else "")
        self._show_message()

    def _set_field(self, key: Key, value: Any) -> None:
        """A button's action: set one field, show it, re-validate."""
        try:
            _set(self._draft, key, copy.deepcopy(value))
            self._parse_errors.pop(key, None)
            self._write_field(key)
            self._refresh()
        except Exception as err:
            self.errors.append(f"internal error while updating: {type(err).__name__}: {err}")
            self._show_panel()

    # ---------------------------------------------------------------------------------------------
    # Controls <-> draft
    # ---------------------------------------------------------------------------------------------

    @contextlib.contextmanager
    def _quietly(self) -> Iterator[None]:
        was, self._quiet = self._quiet, True
        try:
            yield
        finally:
            self._quiet = was

    def _read_field(self, key: Key, owner: W.Widget) -> None:
        self._parse_errors.pop(key, None)
        if key == ("lora", "target_modules") and self._targets is not None:
            if owner is self._all_linear:
                value: Any = ALL_LINEAR if self._all_linear.value else [
                    n for n, b in self._target_boxes.items() if b.value]
            else:
                value = [n for n, b in self._target_boxes.items() if b.value]
        elif key == ("lora", "layers_to_transform") and self._targets is not None:
            value = None if self._every_block.value else sorted(self._blocks.value)
            if value == []:
                self._parse_errors[key] = ("layers_to_transform: no block selected; pick at least one block "
                                           "or tick 'every block'")
                return
        else:
            spec = _spec(key)
            try:
                value = _from_control(spec, owner)
            except ValueError as err:
                self._parse_errors[key] = f"{_label(key)}: {err}"
                return
        _set(self._draft, key, value)

    def _write_controls(self) -> None:
        for key in {self._keys[i] for i in self._keys}:
            self._write_field(key)

    def _write_field(self, key: Key) -> None:
        value = _get(self._draft, key)
        with self._quietly():
            if key == ("lora", "target_modules") and self._targets is not None:
                every = value == ALL_LINEAR or ALL_LINEAR in value  # ["all-linear", "lm_head"]: all, plus more
                self._all_linear.value = every
                chosen = set(value) if isinstance(value, list) else set()
                for n, box in self._target_boxes.items():
                    box.value = every or n in chosen
                    box.disabled = every
            elif key == ("lora", "layers_to_transform") and self._targets is not None:
                self._every_block.value = value is None
                chosen = [value] if isinstance(value, int) else value or []
                self._blocks.value = tuple(i for i in chosen if i in self._blocks.options)
                self._blocks.disabled = value is None
            else:
                key_name = f"{key[0]}.{key[1]}" if key[0] else key[1]
                _to_control(_spec(key), self.controls[key_name], value)

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
        self._show_panel()
        self._show_inactive()
        self.save_bar.show(errors)
        if self._tabs.selected_index == TAB_TITLES.index("Export"):
            self._show_exports()

    def _show_panel(self) -> None:
        if self.trainable is not None:
            self._trainable_html.value = (f"<b>Trainable parameters:</b> "
                                          f"<span class='lora-nb-trainable-count'>{_trainable_text(*self.trainable)}</span>")
        elif self.model is None:
            self._trainable_html.value = "<b>Trainable parameters:</b> give the configurator a model to count them"
        else:
            self._trainable_html.value = ("<b>Trainable parameters:</b> <span class='lora-nb-trainable-count'>"
                                          "n/a</span> (fix the errors below)")
        self._memory_html.value = self._memory_panel_html()
        self._warnings_html.value = _list_html("Warnings", self.warnings, "#a60")
        self._errors_html.value = _list_html("Errors", self.errors, "#b00")

    def _show_inactive(self) -> None:
        """Disables the knobs that do nothing with the current choice and shows why beside them."""
        reasons = inactive_reasons(self._draft)
        for key, note in self._reasons.items():
            reason = reasons.get(key, "")
            self.controls[_label(key)].disabled = bool(reason)
            note.value = f"<small style='color:#777'>{html.escape(_label(key))}: {html.escape(reason)}</small>"
            note.layout.display = "block" if reason else "none"

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

    def _on_gpu(self, change: dict[str, Any]) -> None:
        self._memory_html.value = self._memory_panel_html()

    def gpu_verdict(self) -> Any:
        """The planner's :class:`~lora_nb.fit.FitReport` for the chosen GPU (at the data's longest batch), or None."""
        if self._gpu.value == _NO_GPU or self.memory is None or self.model is None:
            return None
        return plan_fit(self.model.config, self._gpu.value, settings=self._draft, seq_len=self.memory.seq_len)

    def _memory_panel_html(self) -> str:
        if self.memory is None:
            return ""
        text = _memory_html(self.memory)
        if len(self.memory_by_length) > 1:
            rows = "".join(f"<tr><td>{html.escape(name)}</td><td>{m.batch_size} x {m.seq_len}</td>"
                           f"<td style='text-align:right'>{_mib(m.total_bytes)}</td></tr>"
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

    def _show_message(self) -> None:
        self._message_html.value = self.message

    def _show_exports(self) -> None:
        """Writes the export texts (only while the Export tab is open: each dump re-validates, ~0.1 s)."""
        for form in formats.FORMATS:
            if self.errors:
                text = "# fix the errors first:\n" + "\n".join(f"# - {e}" for e in self.errors)
            else:
                try:
                    text = formats.dump_settings(self._draft, form, self.model)
                except Exception as err:
                    text = f"# cannot export: {err}"
            self._export_text[form].value = text
            self._save_buttons[form].disabled = bool(self.errors)


# -------------------------------------------------------------------------------------------------
# Field spec -> control
# -------------------------------------------------------------------------------------------------


def _control_for(spec: FieldSpec) -> W.Widget:
    """The control a field gets, from its type and range alone."""
    common = {"description": spec.name, "tooltip": _tooltip(spec), "style": _STYLE, "layout": _WIDE}
    lo, hi = spec.min, spec.max
    if spec.choices is not None:
        return W.Dropdown(options=[(str(c), c) for c in spec.choices], **common)
    if spec.type is bool:
        return W.Checkbox(indent=False, **common)
    if spec.type is int:
        if lo is not None and hi is not None and lo >= 1 and hi / lo >= POW2_RATIO:
            return StepSlider(int(lo), int(hi), **common)
        if lo is not None and hi is not None and hi - lo <= SLIDER_SPAN:
            return W.IntSlider(min=int(lo), max=int(hi), continuous_update=False, **common)
        return W.BoundedIntText(min=int(lo) if lo is not None else -(2**53), max=int(hi) if hi is not None else 2**53,
                                **common)
    if spec.type is float:
        if lo is not None and hi is not None:
            if lo > 0 and math.log10(hi / lo) >= LOG_DECADES:
                return W.FloatLogSlider(base=10, min=math.log10(lo), max=math.log10(hi), step=0.01,
                                        readout_format=".3g", continuous_update=False, **common)
            step = 10 ** math.floor(math.log10((hi - lo) / 1000))
            return W.FloatSlider(min=lo, max=hi, step=step, readout_format=".3g", continuous_update=False, **common)
        return W.FloatText(**common)
    if spec.type is str:
        return W.Text(**common)
    return W.Text(placeholder=spec.type_name, **common)  # unions and lists: the value written as YAML


def _from_control(spec: FieldSpec, control: W.Widget) -> Any:
    """The settings value a control holds. Raises ValueError for text that is not YAML."""
    value = control.value
    if isinstance(control, W.FloatLogSlider):
        return float(f"{value:.3g}")  # the log slider lands on 10**(k*step): 1.995e-4 means 2e-4
    if isinstance(control, W.FloatSlider):
        return round(value, 10)
    if isinstance(control, W.Text) and spec.type is not str:
        try:
            return yaml.safe_load(value) if value.strip() else None
        except yaml.YAMLError as err:
            raise ValueError(f"cannot read {value!r} as a value ({spec.type_name}): "
                             f"{str(err).splitlines()[0]}") from None
    return value


def _to_control(spec: FieldSpec, control: W.Widget, value: Any) -> None:
    """Shows a settings value in its control; a value the control cannot hold is left to the error panel."""
    if isinstance(control, W.Text) and spec.type is not str:
        control.value = "" if value is None else yaml.safe_dump(value, default_flow_style=True, width=10**6
                                                                ).removesuffix("...\n").strip()
        return
    try:
        control.value = value
    except Exception:  # wrong type for the control (e.g. text in a slider): the draft keeps it, errors show it
        pass


def _tooltip(spec: FieldSpec) -> str:
    text = spec.help
    if spec.recommended:
        text += f" Usual range: {spec.recommended[0]:g} to {spec.recommended[1]:g}."
    return text + f" Default: {spec.default!r}."


def _help_html(spec: FieldSpec) -> str:
    facts = [f"type {html.escape(spec.type_name)}", f"default {html.escape(repr(spec.default))}"]
    if spec.min is not None or spec.max is not None:
        facts.append(f"allowed {_num(spec.min) if spec.min is not None else '-inf'} to "
                     f"{_num(spec.max) if spec.max is not None else 'inf'}")
    if spec.recommended:
        facts.append(f"<b>usual range {_num(spec.recommended[0])} to {_num(spec.recommended[1])}</b>")
    return (f"<div style='font-size:90%;line-height:1.3;white-space:normal'><code>{spec.name}</code>: "
            f"{html.escape(spec.help)}<br><i>{'; '.join(facts)}</i></div>")


# -------------------------------------------------------------------------------------------------
# Small helpers
# -------------------------------------------------------------------------------------------------


def _find_targets(model: Any) -> Targets | None:
    return None if model is None else find_targets(model)


def _q_and_v(targets: Targets) -> list[str]:
    """The query and value projections by their usual names (empty for fused ones such as c_attn)."""
    pairs = (("q_proj", "v_proj"), ("query", "value"), ("q", "v"), ("wq", "wv"))
    return next((list(p) for p in pairs if all(n in targets.attention for n in p)), [])


def _check_form(form: str) -> None:
    """Refuses an export form the configurator does not write, naming the ones it does."""
    if form not in formats.FORMATS:
        raise SettingsError(f"export form must be one of {', '.join(formats.FORMATS)}, got {quote(form)}: choose one "
                            "of them")


def _spec(key: Key) -> FieldSpec:
    cls = KitSettings if not key[0] else SECTIONS[key[0]]
    return next(s for s in field_specs(cls) if s.name == key[1])


def _label(key: Key) -> str:
    return f"{key[0]}.{key[1]}" if key[0] else key[1]


def _get(settings: KitSettings, key: Key) -> Any:
    return getattr(getattr(settings, key[0]) if key[0] else settings, key[1])


def _set(settings: KitSettings, key: Key, value: Any) -> None:
    setattr(getattr(settings, key[0]) if key[0] else settings, key[1], value)


def _html(css_class: str) -> W.HTML:
    widget = W.HTML()
    widget.add_class(css_class)
    return widget


def _num(value: float) -> str:
    return f"{value:g}"


def _scale(lora: LoraSettings) -> str:
    """The scale for the summary; a draft may hold values it cannot be computed from."""
    try:
        return "scale " + lora.scale_text()
    except (TypeError, ZeroDivisionError, ValueError):
        return "scale n/a"


def _trainable_text(trainable: int, total: int) -> str:
    return f"{trainable:,} of {total:,} ({100 * trainable / total:.3f}%)"


def _mib(size: float) -> str:
    return f"{size / 2**20:,.1f} MiB"


_NO_GPU = "(no GPU verdict)"


def _gpu_dropdown(handler: Any) -> W.Dropdown:
    dropdown = W.Dropdown(options=[_NO_GPU, *GPUS], value=_NO_GPU, description="will it fit on",
                          tooltip="Verdict of the fit planner (lora_nb.fit) for this GPU", style=_STYLE)
    dropdown.add_class("lora-nb-gpu")
    dropdown.observe(handler, names="value")
    return dropdown


def _memory_html(memory: Any) -> str:
    rows = "".join(f"<tr><td>{html.escape(k)}</td><td style='text-align:right'>{_mib(v)}</td></tr>"
                   for k, v in memory.parts.items() if v)
    return (f"<b>Memory estimate</b> (batch {memory.batch_size} x {memory.seq_len} tokens, {memory.device}):"
            f"<table>{rows}<tr><td><b>total</b></td><td style='text-align:right'><b>{_mib(memory.total_bytes)}"
            f"</b></td></tr></table><small>{html.escape(memory.notes[0]) if memory.notes else ''}</small>")


def _list_html(title: str, items: list[str], color: str) -> str:
    if not items:
        return ""
    lis = "".join(f"<li>{html.escape(i)}</li>" for i in items)
    return f"<b style='color:{color}'>{title}</b><ul style='color:{color};margin:0'>{lis}</ul>"


# -------------------------------------------------------------------------------------------------
# Trainable parameters against the rank, for a plot
# -------------------------------------------------------------------------------------------------


def trainable_by_rank(model: torch.nn.Module, ranks: Sequence[int],
                      target_sets: dict[str, str | list[str]] | None = None) -> dict[str, list[int]]:
    """Exact trainable-parameter counts (:func:`~lora_nb.estimate.count_trainable`) for each rank and target set.

    Args:
        model: The base model.
        ranks: LoRA ranks to count.
        target_sets: Label -> ``target_modules``; default q+v, attention and all-linear of this model.

    Returns:
        Label -> one count per rank.
    """
    target_sets = target_sets if target_sets is not None else default_target_sets(model)
    return {label: [count_trainable(model, LoraSettings(r=r, target_modules=copy.deepcopy(t)))[0] for r in ranks]
            for label, t in target_sets.items()}


def default_target_sets(model: torch.nn.Module) -> dict[str, str | list[str]]:
    """q+v (when the model has them separately), all attention layers, and all-linear."""
    targets = _find_targets(model)
    sets: dict[str, str | list[str]] = {}
    if _q_and_v(targets):
        sets["q + v"] = _q_and_v(targets)
    sets["attention"] = list(targets.attention)
    sets["all-linear"] = ALL_LINEAR
    return sets


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
    for label, values in counts.items():
        ax.plot(ranks, values, marker="o", label=label)
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


__all__ = ["LoraConfigurator", "plot_trainable_vs_rank", "trainable_by_rank", "default_target_sets"]
