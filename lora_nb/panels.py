"""Panels: the parts the LoRA configurator (:mod:`lora_nb.widgets`) is made of, one class per tab or panel.

Each part builds its widgets, shows what it is given (``show``) and has one handler of its own, which
reports the user's act to the configurator through a callback; none of them holds or checks settings.

- :class:`FieldRow`: one generated control with its "?" help and the reason it is disabled;
- :class:`TargetPicker`: the Targets tab's boxes for the model's layers and blocks;
- :class:`ExportTab`: one page per :data:`lora_nb.formats.FORMATS` entry, and loading a file or an upload;
- :class:`LivePanel`: counts, memory, GPU verdict, warnings, errors, the last message, and the :class:`SaveBar`.
"""

from __future__ import annotations

import html
import math
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import ipywidgets as W
import traitlets
import yaml

from . import formats
from .errors import LoraNbError
from .estimate import q_and_v
from .fit import GPUS
from .settings import ALL_LINEAR, FieldSpec, KitSettings
from .targets import Targets

SLIDER_SPAN = 4096  # int ranges up to this wide become sliders; wider ones (seeds, sequence lengths) text boxes
LOG_DECADES = 3  # positive float ranges spanning this many powers of ten or more get a log-scale slider
POW2_RATIO = 1000  # int ranges from >= 1 whose max/min reaches this get a powers-of-two slider (r, alpha, batch)
NO_GPU = "(no GPU verdict)"
WIDE = W.Layout(width="500px")
STYLE = {"description_width": "205px"}  # the longest name, per_device_train_batch_size, fits uncut

Key = tuple[str, str]  # (section, field), section "" for KitSettings' own fields
# A user's edit: the field and how to read its new value (raises ValueError for text that is no value).
OnEdit = Callable[[Key, Callable[[], Any]], None]


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


# -------------------------------------------------------------------------------------------------
# One field
# -------------------------------------------------------------------------------------------------


class FieldRow:
    """One setting's control (generated from its spec), its "?" toggle with the help, and why it is disabled.

    Args:
        key: ``(section, field)``.
        spec: The field's spec.
        on_edit: Called with the key and a reader of the control's value when the user changes it.
    """

    def __init__(self, key: Key, spec: FieldSpec, on_edit: OnEdit):
        self.key, self.spec = key, spec
        self.control = control_for(spec)
        self.control.add_class(f"lora-nb-{spec.name.replace('_', '-')}")
        self.control.observe(lambda _change: on_edit(key, lambda: from_control(spec, self.control)), names="value")
        self.toggle = W.ToggleButton(value=False, description="?", tooltip=f"Explain {label(key)}",
                                     layout=W.Layout(width="32px"))
        self.toggle.add_class("lora-nb-help-toggle")
        self.help = W.HTML(help_html(spec), layout=W.Layout(display="none", width="500px"))
        self.help.add_class("lora-nb-help")
        self.toggle.observe(self._on_toggle, names="value")
        self.reason = W.HTML(layout=W.Layout(display="none"))
        self.reason.add_class("lora-nb-inactive-reason")
        self.widget = W.VBox([W.HBox([self.control, self.toggle]), self.help, self.reason])

    def show(self, value: Any) -> None:
        """Shows a settings value; a value the control cannot hold is left to the error panel."""
        to_control(self.spec, self.control, value)

    def show_reason(self, reason: str) -> None:
        """Disables the control with the reason beside it, or enables it (empty reason)."""
        self.control.disabled = bool(reason)
        self.reason.value = f"<small style='color:#777'>{html.escape(label(self.key))}: {html.escape(reason)}</small>"
        self.reason.layout.display = "block" if reason else "none"

    def _on_toggle(self, change: dict[str, Any]) -> None:
        self.help.layout.display = "block" if change["new"] else "none"


def field_rows(rows: Sequence[FieldRow]) -> W.VBox:
    """Rows under their group headings, groups in order of first appearance."""
    order = list(dict.fromkeys(row.spec.group for row in rows))
    children: list[W.Widget] = []
    group = None
    for row in sorted(rows, key=lambda r: order.index(r.spec.group)):
        if row.spec.group != group:
            group = row.spec.group
            children.append(W.HTML(f"<b>{html.escape(group)}</b>"))
        children.append(row.widget)
    return W.VBox(children)


# -------------------------------------------------------------------------------------------------
# The Targets tab
# -------------------------------------------------------------------------------------------------


class TargetPicker:
    """Boxes for the model's layers (``target_modules``) and blocks (``layers_to_transform``).

    Args:
        targets: The model's adaptable layers (:func:`lora_nb.targets.find_targets`).
        on_edit: Called with the edited field and a reader of its value.
        on_set: Called with a field and a value (the shortcut buttons).
    """

    KEYS: tuple[Key, Key] = (("lora", "target_modules"), ("lora", "layers_to_transform"))

    def __init__(self, targets: Targets, on_edit: OnEdit, on_set: Callable[[Key, Any], None], layers_help: str):
        t = self.targets = targets
        self._on_edit_cb = on_edit
        self.all_linear = W.Checkbox(description="all linear (every linear layer but the output head)",
                                     indent=False, tooltip="target_modules='all-linear'",
                                     style={"description_width": "initial"}, layout=W.Layout(width="auto"))
        self.all_linear.add_class("lora-nb-all-linear")
        self.boxes: dict[str, W.Checkbox] = {}
        groups = []
        for group, names in (("attention", t.attention), ("MLP", t.mlp), ("other", t.other)):
            boxes = []
            for n in names:
                if n in self.boxes:  # a name in two groups (GPT-2 c_proj) gets one box
                    continue
                shapes = ", ".join(f"{i}->{o}" for i, o in t.shapes[n])
                box = W.Checkbox(description=n, indent=False, tooltip=f"{n}: {shapes}", layout=W.Layout(width="150px"))
                box.add_class(f"lora-nb-target-{n.replace('_', '-')}")
                self.boxes[n] = box
                boxes.append(box)
            if boxes:
                groups.append(W.VBox([W.HTML(f"<i>{group}</i>"), W.HBox(boxes, layout=W.Layout(flex_flow="row wrap"))]))
        self.buttons = []
        for text, names, cls in (("attention only", t.attention, "attention"), ("q + v", q_and_v(t), "qv"),
                                 ("all linear", ALL_LINEAR, "all")):
            button = W.Button(description=text, disabled=not names, tooltip=f"target_modules = {names!r}")
            button.add_class(f"lora-nb-targets-{cls}")
            button.on_click(lambda _b, names=names: on_set(self.KEYS[0], names))
            self.buttons.append(button)
        self.every_block = W.Checkbox(description="every block", indent=False,
                                      tooltip="layers_to_transform = null: adapt all transformer blocks")
        self.every_block.add_class("lora-nb-every-block")
        self.blocks = W.SelectMultiple(options=list(range(t.n_layers)), rows=min(8, max(t.n_layers, 1)),
                                       description="blocks", tooltip="Blocks to adapt (ctrl/shift-click)",
                                       layout=W.Layout(width="200px"))
        self.blocks.add_class("lora-nb-layers-to-transform")
        for widget in (self.all_linear, *self.boxes.values(), self.every_block, self.blocks):
            widget.observe(self._on_pick, names="value")
        self.controls = {self.KEYS[0]: self.all_linear, self.KEYS[1]: self.blocks}
        self.widget = W.VBox([
            W.HTML("<b>targets</b> (layers found in the model; hover for shapes)"),
            W.HBox(self.buttons), self.all_linear, *groups,
            W.HTML(f"<b>layers_to_transform</b> ({t.n_layers} blocks in "
                   f"<code>{html.escape(str(t.layers_pattern))}</code>)"),
            W.HBox([self.every_block, self.blocks]), W.HTML(layers_help),
        ])

    def show(self, settings: KitSettings) -> None:
        """Ticks the boxes for the settings' targets and blocks ('all-linear' ticks and locks every box)."""
        value = settings.lora.target_modules
        every = value == ALL_LINEAR or ALL_LINEAR in value  # ["all-linear", "lm_head"]: all, plus more
        self.all_linear.value = every
        chosen = set(value) if isinstance(value, list) else set()
        for n, box in self.boxes.items():
            box.value = every or n in chosen
            box.disabled = every
        blocks = settings.lora.layers_to_transform
        self.every_block.value = blocks is None
        picked = [blocks] if isinstance(blocks, int) else blocks or []
        self.blocks.value = tuple(i for i in picked if i in self.blocks.options)
        self.blocks.disabled = blocks is None

    def _on_pick(self, change: dict[str, Any]) -> None:
        owner = change["owner"]
        if owner is self.every_block or owner is self.blocks:
            self._on_edit_cb(self.KEYS[1], self._blocks_value)
        elif owner is self.all_linear and self.all_linear.value:
            self._on_edit_cb(self.KEYS[0], lambda: ALL_LINEAR)
        else:
            self._on_edit_cb(self.KEYS[0], lambda: [n for n, b in self.boxes.items() if b.value])

    def _blocks_value(self) -> list[int] | None:
        if self.every_block.value:
            return None
        if not self.blocks.value:
            raise ValueError("no block selected; pick at least one block or tick 'every block'")
        return sorted(self.blocks.value)


# -------------------------------------------------------------------------------------------------
# The Export tab
# -------------------------------------------------------------------------------------------------


class ExportTab:
    """One page per form of :data:`lora_nb.formats.FORMATS` (its text and a Save button), and loading.

    Args:
        run_dir: Folder of the default file names.
        on_save: Called with a form and the path typed for it.
        on_load: Called with the path typed in the load box.
        on_upload: Called with the uploaded files (ipywidgets' ``FileUpload.value``).
    """

    def __init__(self, run_dir: Path, on_save: Callable[[str, str], None], on_load: Callable[[str], None],
                 on_upload: Callable[[Any], None]):
        self.texts: dict[str, W.Textarea] = {}
        self.paths: dict[str, W.Text] = {}
        self.save_buttons: dict[str, W.Button] = {}
        pages = []
        for form, entry in formats.FORMATS.items():
            text = W.Textarea(layout=W.Layout(width="600px", height="300px"))
            text.add_class(f"lora-nb-export-{form}")
            path = W.Text(value=str(run_dir / entry.file_name), description="file", layout=WIDE)
            path.add_class(f"lora-nb-save-path-{form}")
            button = W.Button(description=f"Save {entry.title}", icon="save")
            button.add_class(f"lora-nb-save-{form}")
            button.on_click(lambda _b, form=form: on_save(form, self.paths[form].value))
            self.texts[form], self.paths[form], self.save_buttons[form] = text, path, button
            pages.append(W.VBox([text, W.HBox([path, button])]))
        inner = W.Tab(children=pages)
        inner.titles = tuple(entry.title for entry in formats.FORMATS.values())
        self.load_path = W.Text(value=str(run_dir / formats.FORMATS["kit"].file_name), description="load file",
                                tooltip="A kit, axolotl, lora: YAML or peft JSON file", layout=WIDE)
        self.load_path.add_class("lora-nb-load-path")
        self.load_button = W.Button(description="Load", icon="folder-open")
        self.load_button.add_class("lora-nb-load")
        self.load_button.on_click(lambda _b: on_load(self.load_path.value))
        self.upload = W.FileUpload(accept=".yaml,.yml,.json", multiple=False, description="Upload")
        self.upload.add_class("lora-nb-upload")
        self._on_upload_cb = on_upload
        self.upload.observe(self._on_upload, names="value")
        self.widget = W.VBox([inner, W.HBox([self.load_path, self.load_button, self.upload])])

    def show(self, settings: KitSettings, errors: Sequence[str], model: Any) -> None:
        """Writes each form's text (each dump re-validates, ~0.1 s: call it only while the tab is open)."""
        for form in formats.FORMATS:
            if errors:
                text = "# fix the errors first:\n" + "\n".join(f"# - {e}" for e in errors)
            else:
                try:
                    text = formats.dump_settings(settings, form, model)
                except Exception as err:  # a form that cannot carry these settings says so in its page
                    text = f"# cannot export: {err}"
            self.texts[form].value = text
            self.save_buttons[form].disabled = bool(errors)

    def _on_upload(self, change: dict[str, Any]) -> None:
        if change["new"]:
            self._on_upload_cb(change["new"])


# -------------------------------------------------------------------------------------------------
# The live panel
# -------------------------------------------------------------------------------------------------


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
        self.status = html_widget("lora-nb-save-status")
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


class LivePanel:
    """Beside the tabs: the save bar, the trainable count, the GPU choice, memory, warnings, errors, a message.

    Args:
        save_bar: The Save button and its status.
        on_gpu: Called when another GPU is chosen (the memory part is then shown again).
    """

    def __init__(self, save_bar: SaveBar, on_gpu: Callable[[], None]):
        self.save_bar = save_bar
        self.trainable_html = html_widget("lora-nb-trainable")
        self.memory_html = html_widget("lora-nb-memory")
        self.gpu = W.Dropdown(options=[NO_GPU, *GPUS], value=NO_GPU, description="will it fit on",
                              tooltip="Verdict of the fit planner (lora_nb.fit) for this GPU", style=STYLE)
        self.gpu.add_class("lora-nb-gpu")
        self._on_gpu_cb = on_gpu
        self.gpu.observe(self._on_gpu, names="value")
        self.warnings_html = html_widget("lora-nb-warnings")
        self.errors_html = html_widget("lora-nb-errors")
        self.message_html = html_widget("lora-nb-message")
        self.widget = W.VBox([W.HTML("<b>Live check</b>"), save_bar.widget, self.trainable_html, self.gpu,
                              self.memory_html, self.warnings_html, self.errors_html, self.message_html],
                             layout=W.Layout(width="400px", min_width="400px", border="1px solid #ccc", padding="6px"))
        self.widget.add_class("lora-nb-panel")

    def show(self, trainable: tuple[int, int] | None, has_model: bool, warnings: list[str], errors: list[str]) -> None:
        """Shows the count (or why there is none), the warnings and the errors."""
        if trainable is not None:
            self.trainable_html.value = (f"<b>Trainable parameters:</b> "
                                         f"<span class='lora-nb-trainable-count'>{trainable_text(*trainable)}</span>")
        elif not has_model:
            self.trainable_html.value = "<b>Trainable parameters:</b> give the configurator a model to count them"
        else:
            self.trainable_html.value = ("<b>Trainable parameters:</b> <span class='lora-nb-trainable-count'>"
                                         "n/a</span> (fix the errors below)")
        self.warnings_html.value = _list_html("Warnings", warnings, "#a60")
        self.errors_html.value = _list_html("Errors", errors, "#b00")

    def _on_gpu(self, change: dict[str, Any]) -> None:
        self._on_gpu_cb()


def memory_html(memory: Any) -> str:
    """A memory estimate as a table of its parts and the total."""
    rows = "".join(f"<tr><td>{html.escape(k)}</td><td style='text-align:right'>{mib(v)}</td></tr>"
                   for k, v in memory.parts.items() if v)
    return (f"<b>Memory estimate</b> (batch {memory.batch_size} x {memory.seq_len} tokens, {memory.device}):"
            f"<table>{rows}<tr><td><b>total</b></td><td style='text-align:right'><b>{mib(memory.total_bytes)}"
            f"</b></td></tr></table><small>{html.escape(memory.notes[0]) if memory.notes else ''}</small>")


def _list_html(title: str, items: list[str], color: str) -> str:
    if not items:
        return ""
    lis = "".join(f"<li>{html.escape(i)}</li>" for i in items)
    return f"<b style='color:{color}'>{title}</b><ul style='color:{color};margin:0'>{lis}</ul>"


# -------------------------------------------------------------------------------------------------
# Field spec -> control
# -------------------------------------------------------------------------------------------------


def control_for(spec: FieldSpec) -> W.Widget:
    """The control a field gets, from its type and range alone."""
    common = {"description": spec.name, "tooltip": _tooltip(spec), "style": STYLE, "layout": WIDE}
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
    return W.Text(placeholder=spec.type_name, **common)  # unions, lists, mappings: the value written as YAML


def from_control(spec: FieldSpec, control: W.Widget) -> Any:
    """The settings value a control holds.

    Raises:
        ValueError: For text that is not YAML.
    """
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


def to_control(spec: FieldSpec, control: W.Widget, value: Any) -> None:
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


def help_html(spec: FieldSpec) -> str:
    """A field's help panel: its help text, type, default, allowed and usual range."""
    facts = [f"type {html.escape(spec.type_name)}", f"default {html.escape(repr(spec.default))}"]
    if spec.min is not None or spec.max is not None:
        facts.append(f"allowed {num(spec.min) if spec.min is not None else '-inf'} to "
                     f"{num(spec.max) if spec.max is not None else 'inf'}")
    if spec.recommended:
        facts.append(f"<b>usual range {num(spec.recommended[0])} to {num(spec.recommended[1])}</b>")
    return (f"<div style='font-size:90%;line-height:1.3;white-space:normal'><code>{spec.name}</code>: "
            f"{html.escape(spec.help)}<br><i>{'; '.join(facts)}</i></div>")


# -------------------------------------------------------------------------------------------------
# Small helpers
# -------------------------------------------------------------------------------------------------


def label(key: Key) -> str:
    """``lora.r`` for ``("lora", "r")``; a top-level field by its name alone."""
    return f"{key[0]}.{key[1]}" if key[0] else key[1]


def html_widget(css_class: str) -> W.HTML:
    """An empty HTML widget with a CSS class (what tests and the browser test find it by)."""
    widget = W.HTML()
    widget.add_class(css_class)
    return widget


def num(value: float) -> str:
    """A number as short as it reads (``2e-04`` as ``0.0002``)."""
    return f"{value:g}"


def trainable_text(trainable: int, total: int) -> str:
    """``1,234 of 56,789 (2.173%)``."""
    return f"{trainable:,} of {total:,} ({100 * trainable / total:.3f}%)"


def mib(size: float) -> str:
    """Bytes in MiB, one decimal."""
    return f"{size / 2**20:,.1f} MiB"
