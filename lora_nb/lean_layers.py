"""Lean layers: the same training computation with fewer passes over memory and less kept for backward.

On a CPU a training step's time goes to matrix products (about three quarters) and to the passes
over [tokens x width] tensors around them. Two layers do more of those passes than they need; while
training (`lean_layers`), the kit runs them another way, with the same values and gradients:

Gated-SiLU MLPs (Llama, Qwen, Mistral, SmolLM, ...): `silu(gate) * up` keeps `gate` and `up` only
(`_SiluTimes`); autograd's own graph also keeps `silu(gate)`, the largest saved activation.

LoRA linears (peft's `lora.Linear` over a plain `nn.Linear`), peft's forward and its backward:

    peft       y = base(x) + B(A(x)) * s     2 products + a [tokens x out] multiply and add,
                                             and the same multiply again in the backward pass
    here       h = A(x) * s                  [tokens x r]: r is 8-64, the multiply costs nothing
               y = x W^T + h B^T             the LoRA product accumulates into the base output
               backward: dx = dy W + (dy B s) A, accumulated in place as well

On the demo model (LoRA r 16 on every linear, 1,300 tokens a step) the LoRA path spent about as
much time in those [tokens x out] passes as in its own products. Any other case keeps peft's
forward: 4-bit or 8-bit base layers, DoRA and other LoRA variants, several active adapters, merged
or disabled adapters, mixed dtypes, and autocast (mixed precision on a GPU).
"""

from __future__ import annotations

import contextlib
import types

import torch
from torch.nn import functional as F

PROBE_TOLERANCE = {torch.float32: 1e-4, torch.float64: 1e-8}  # relative; other dtypes (bf16, fp16): 2e-2


class _SiluTimes(torch.autograd.Function):
    """`silu(gate) * up` that keeps only `gate` and `up` for the backward pass (silu is recomputed).

    Autograd's own graph keeps `gate`, `silu(gate)` and `up`: one [tokens x intermediate] tensor
    more per layer, 750 MiB on the demo model at 8 x 512 tokens (the largest saved activation).
    """

    @staticmethod
    def forward(ctx, gate, up):
        ctx.save_for_backward(gate, up)
        return F.silu(gate) * up

    @staticmethod
    def backward(ctx, grad):
        gate, up = ctx.saved_tensors
        # autograd's own kernels for silu(gate) * up: the same values, in four passes over the tensors
        return torch.ops.aten.silu_backward(grad * up, gate), grad * F.silu(gate)


def _lean_mlp_forward(self, x):
    return self.down_proj(_SiluTimes.apply(self.gate_proj(x), self.up_proj(x)))


def swiglu_mlps(model) -> list[torch.nn.Module]:
    """The gated-SiLU MLPs (`down(silu(gate(x)) * up(x))`, Llama-style) whose output `_lean_mlp_forward`
    reproduces: checked numerically on one module per class, in eval mode and without gradients."""
    found, verdict = [], {}
    for module in model.modules():
        if not all(hasattr(module, name) for name in ("gate_proj", "up_proj", "down_proj", "act_fn")):
            continue
        if type(module.act_fn).__name__ not in ("SiLU", "SiLUActivation") or "forward" in vars(module):
            continue
        cls = type(module)
        if cls not in verdict:
            weight = next(p for p in module.parameters() if p.is_floating_point())
            x = torch.randn(1, 3, module.gate_proj.in_features, generator=torch.Generator().manual_seed(0))
            x = x.to(device=weight.device, dtype=weight.dtype)
            was_training = module.training
            module.eval()
            try:
                with torch.no_grad():
                    own, lean = module(x).float(), _lean_mlp_forward(module, x).float()
                verdict[cls] = bool(torch.allclose(own, lean, rtol=PROBE_TOLERANCE.get(weight.dtype, 2e-2), atol=1e-6))
            except (TypeError, ValueError, RuntimeError, AttributeError):
                verdict[cls] = False
            finally:
                module.train(was_training)
        if verdict[cls]:
            found.append(module)
    return found


class _LoraLinear(torch.autograd.Function):
    """`x W^T + b + (A(d) * s) B^T` with `d` = `x` (no dropout) or `dropped` (dropout applied outside).

    Saves `x` (or `d`), the base and LoRA weights and the [tokens x r] `A(d) * s`; peft's own graph
    keeps `x`, `d` and `A(d)` as well. Gradients reach `x`, `dropped`, and any weight that needs one.
    """

    @staticmethod
    def forward(ctx, x, dropped, weight, bias, lora_a, lora_b, scaling):
        rows = x.reshape(-1, x.shape[-1])
        source = rows if dropped is None else dropped.reshape(-1, x.shape[-1])
        low = source @ lora_a.T
        low.mul_(scaling)
        out = rows @ weight.T if bias is None else torch.addmm(bias, rows, weight.T)
        out.addmm_(low, lora_b.T)
        # x itself is needed for A's gradient only without dropout (with it, the dropped copy is), and for
        # W's gradient only if W trains: keeping it anyway cost each adapted input a second copy per block
        keep_rows = dropped is None or weight.requires_grad
        ctx.save_for_backward(rows if keep_rows else None, None if dropped is None else source, weight, lora_a, lora_b,
                              low)
        ctx.scaling, ctx.shape, ctx.has_bias = scaling, x.shape, bias is not None
        return out.view(*x.shape[:-1], out.shape[-1])

    @staticmethod
    def backward(ctx, grad):
        rows, source, weight, lora_a, lora_b, low = ctx.saved_tensors
        source = rows if source is None else source
        g = grad.reshape(-1, grad.shape[-1])
        need_x, need_d, need_w, need_b, need_a, need_lb, _ = ctx.needs_input_grad
        g_low = (g @ lora_b).mul_(ctx.scaling)  # d loss / d A(d), [tokens x r]
        grad_x = grad_d = None
        if need_x:
            grad_x = g @ weight
            if not need_d and source is rows:
                grad_x.addmm_(g_low, lora_a)
        if need_d:
            grad_d = (g_low @ lora_a).view(ctx.shape)
        if grad_x is not None:
            grad_x = grad_x.view(ctx.shape)
        return (
            grad_x,
            grad_d,
            g.T @ rows if need_w else None,
            g.sum(0) if need_b and ctx.has_bias else None,
            g_low.T @ source if need_a else None,
            g.T @ low if need_lb else None,
            None,
        )


def _fused_lora_forward(self, x, *args, **kwargs):
    """peft's `lora.Linear.forward`, through `_LoraLinear` when the call is a plain one (see module doc)."""
    adapter = _single_plain_adapter(self, x, args, kwargs)
    if adapter is None:
        return type(self).forward(self, x, *args, **kwargs)
    base, lora_a, lora_b = self.base_layer, self.lora_A[adapter].weight, self.lora_B[adapter].weight
    dropout = self.lora_dropout[adapter]
    dropped = None if isinstance(dropout, torch.nn.Identity) else dropout(x)
    return _LoraLinear.apply(x, dropped, base.weight, base.bias, lora_a, lora_b, float(self.scaling[adapter]))


def _single_plain_adapter(layer, x, args, kwargs) -> str | None:
    """The one active vanilla adapter of `layer` for this call, or None when peft's forward must run."""
    if args or kwargs or layer.disable_adapters or layer.merged:
        return None
    active = [name for name in layer.active_adapters if name in layer.lora_A]
    if len(active) != 1 or active[0] in getattr(layer, "lora_variant", {}):
        return None
    dtype = layer.base_layer.weight.dtype
    if x.dtype != dtype or layer.lora_A[active[0]].weight.dtype != dtype or torch.is_autocast_enabled(x.device.type):
        return None
    if layer.lora_A[active[0]].bias is not None or layer.lora_B[active[0]].bias is not None:
        return None
    return active[0]


def lora_linears(model) -> list[torch.nn.Module]:
    """peft `lora.Linear` layers over a plain `nn.Linear` (not 4-bit, 8-bit or other base layers)."""
    try:
        from peft.tuners.lora.layer import Linear as LoraLinear
    except ImportError:
        return []
    return [m for m in model.modules()
            if type(m) is LoraLinear and type(m.base_layer) is torch.nn.Linear and "forward" not in vars(m)]


@contextlib.contextmanager
def lean_layers(model):
    """While training: gated-SiLU MLPs and LoRA linears run their lean forms; restored on exit."""
    mlps, loras = swiglu_mlps(model), lora_linears(model)
    for mlp in mlps:
        mlp.forward = types.MethodType(_lean_mlp_forward, mlp)
    for layer in loras:
        layer.forward = types.MethodType(_fused_lora_forward, layer)
    try:
        yield
    finally:
        for module in mlps + loras:
            del module.forward
