"""bf16 weights and activations with float32 master weights in the optimizer: a Lightning precision plugin."""

from __future__ import annotations

import functools
from typing import Any

import torch
from lightning.pytorch import LightningModule
from lightning.pytorch.plugins.precision import HalfPrecision
from lightning.pytorch.strategies import Strategy
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor, nn
from torchmetrics import Metric

from .nn.cpu_choices import bf16_pays, cpu_name


class BF16MasterWeights(HalfPrecision):
    """Train in bf16 end to end while the optimizer updates float32 copies of the weights.

    Under ``bf16-mixed`` autocast casts every weight, and the float32 residual stream, to bf16 in every
    forward. Here the model itself is bf16 (``bf16-true``), and, as with fairseq's ``--bf16`` or Megatron,
    the optimizer steps float32 master weights, so an update below bf16's resolution (8 bits of
    mantissa) still accumulates instead of rounding away:

    - gradients of each backward are added to the masters' in float32 (accumulated micro-batches too);
      gradient clipping and the optimizer step act on the masters, which are then copied into the model;
    - the model's ``state_dict()`` (so every checkpoint) holds the float32 masters, so loading,
      averaging, export and resuming see float32 weights; a resumed run restores its masters from it;
    - when ``fit`` ends the model is float32 again, holding the masters.

    Use it instead of ``trainer.precision``: ``trainer.plugins: [lightning_transformer.BF16MasterWeights]``,
    on one device or under DDP (FSDP has its own mixed-precision policies). Callbacks see the model's bf16
    gradients of the last micro-batch in ``on_before_optimizer_step``. Outside ``fit`` it runs the model in
    bf16 as ``bf16-true`` does.

    Where bf16 is slower than float32 (a CPU that emulates bf16 matmuls, having neither AVX512-BF16
    nor AMX, or a GPU older than Ampere), it trains in float32 instead and warns, unless
    ``fall_back_to_float32`` is false. The choice is measured once per machine
    (:func:`~lightning_transformer.nn.cpu_choices.bf16_pays`).
    """

    def __init__(self, fall_back_to_float32: bool = True) -> None:
        super().__init__("bf16-true")
        self.fall_back_to_float32 = fall_back_to_float32
        self._fp32: dict[int, Tensor] = {}
        self._pairs: list[tuple[nn.Parameter, Tensor]] = []
        self._names: dict[str, Tensor] = {}
        self._module: LightningModule | None = None
        self._hook = None

    def convert_module(self, module: nn.Module) -> nn.Module:
        strategy = module.trainer.strategy if isinstance(module, LightningModule) else None
        device = strategy.root_device if strategy is not None else torch.device("cpu")
        bf16 = not self.fall_back_to_float32 or bf16_is_faster(device, strategy)
        self.precision = "bf16-true" if bf16 else "32-true"
        self._desired_input_dtype = torch.bfloat16 if bf16 else torch.float32
        if not bf16:  # the cast below also undoes a bf16 `trainer.init_module()`
            rank_zero_warn(f"BF16MasterWeights: bf16 is slower than float32 on this {device_name(device)}, so "
                           "this run trains in float32; pass fall_back_to_float32=False to the plugin to use bf16 "
                           "anyway.")
            return super().convert_module(module)
        # Kept before the cast so that masters start from the exact float32 weights.
        self._fp32 = {id(p): p.detach().float().clone() for p in module.parameters() if p.is_floating_point()}
        module = super().convert_module(module)
        for metric in module.modules():  # running sums (validation loss) stay float32
            if isinstance(metric, Metric):
                metric.set_dtype(torch.float32)
        return module

    def connect(self, model: nn.Module, optimizers: list, lr_schedulers: list) -> tuple[nn.Module, list, list]:
        if self._desired_input_dtype != torch.bfloat16:  # fell back to float32: no masters to keep
            return super().connect(model, optimizers, lr_schedulers)
        masters: dict[int, Tensor] = {}
        for optimizer in optimizers:
            if optimizer.state:
                raise RuntimeError("BF16MasterWeights needs optimizers without state when fit starts; create them "
                                   "in configure_optimizers.")
            for group in optimizer.param_groups:
                group["params"] = [self._master(p, masters) for p in group["params"]]
        self._module = next((m for m in model.modules() if isinstance(m, LightningModule)), None)
        params = dict(self._module.named_parameters(remove_duplicate=False)) if self._module is not None else {}
        unique = self._module.parameters() if self._module is not None else ()
        self._pairs = [(p, masters[id(p)]) for p in unique if id(p) in masters]
        self._names = {name: masters[id(p)] for name, p in params.items() if id(p) in masters}
        if self._names:  # a partial: torch flags a public hook with an attribute, which a bound method cannot take
            self._hook = self._module.register_state_dict_post_hook(functools.partial(self._masters_into_state_dict))
        self._fp32 = {}
        return super().connect(model, optimizers, lr_schedulers)

    def _master(self, param: Tensor, masters: dict[int, Tensor]) -> Tensor:
        if id(param) not in masters:
            start = self._fp32.get(id(param), param.detach().float()).to(param.device)
            masters[id(param)] = start.clone().requires_grad_(param.requires_grad)
        return masters[id(param)]

    def _masters_into_state_dict(self, module: nn.Module, state_dict: dict[str, Any], prefix: str, *_) -> None:
        for name, master in self._names.items():
            if prefix + name in state_dict:
                state_dict[prefix + name] = master.detach()

    def pre_backward(self, tensor: Tensor, module: LightningModule) -> Tensor:
        for param, _ in self._pairs:  # the previous backward's share is in the masters already
            param.grad = None
        return super().pre_backward(tensor, module)

    def post_backward(self, tensor: Tensor, module: LightningModule) -> Tensor:
        tensor = super().post_backward(tensor, module)
        with torch.no_grad():
            for param, master in self._pairs:
                if param.grad is not None:
                    master.grad = param.grad.float() if master.grad is None else master.grad.add_(param.grad)
        return tensor

    def optimizer_step(self, optimizer, model: LightningModule, closure, **kwargs: Any) -> Any:
        result = super().optimizer_step(optimizer, model, closure, **kwargs)
        with torch.no_grad():
            for param, master in self._pairs:
                param.copy_(master)
        return result

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        state = checkpoint.get("state_dict", {})
        with torch.no_grad():
            for name, master in self._names.items():
                if name in state:
                    master.copy_(state[name])

    def teardown(self) -> None:
        if self._hook is not None:
            self._hook.remove()
            self._module.float()
            with torch.no_grad():
                for param, master in self._pairs:
                    param.copy_(master)
        self._pairs, self._names, self._module, self._hook = [], {}, None, None
        super().teardown()


def bf16_is_faster(device: torch.device, strategy: Strategy | None = None) -> bool:
    """Whether training in bf16 beats float32 on ``device``: measured once per CPU
    (:func:`~lightning_transformer.nn.cpu_choices.bf16_pays`); on a GPU, whether it has bf16 tensor cores.
    Under a multi-process ``strategy`` every rank takes rank 0's answer, so that no two train in different dtypes."""
    if device.type == "cuda":
        faster = torch.cuda.is_bf16_supported(including_emulation=False)
    else:
        faster = device.type != "cpu" or bf16_pays()
    return faster if strategy is None else strategy.broadcast(faster, src=0)


def device_name(device: torch.device) -> str:
    """``device`` as a warning names it: "GPU (its name)", "CPU (its model)"."""
    if device.type == "cuda":
        return f"GPU ({torch.cuda.get_device_name(device)})"
    return f"CPU ({cpu_name()})" if device.type == "cpu" else device.type
