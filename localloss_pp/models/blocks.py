"""Locally trained blocks: one layer + its local heads + its own optimizer + its own RNG.

Every block is created with a seed derived from (run seed, block index) and uses only its own
generators: one on the CPU for the initialisation of all its weights and fixed random matrices, one
on its device for dropout masks. No block touches torch's process-global generator, so a block
computes the same numbers whatever process or pipeline stage it runs in (docs/architecture.md,
"The one invariant").

Training API, used the same way by the one-process loop and by a pipeline stage:
``out, ctx = block.train_forward(x)`` computes the (detached, max-pooled) output for the next
block; ``stats = block.train_update(ctx, y, y_onehot)`` then computes the local loss on the
pre-dropout activation, backpropagates it into this block only, and steps the block's optimizer.
"""
from __future__ import annotations

import contextlib
import math
import types

import torch
import torch.nn as nn
import torch.nn.functional as F

from localloss_pp.config import LossConfig, OptimConfig
from localloss_pp.models.losses import LinearFAFunction, LocalLoss
from localloss_pp.seeds import derive_seed

__all__ = ["Unit", "activation_dtype", "LinearFA", "LocalBlock", "LocalLinearBlock",
           "LocalConvBlock", "OutputLayer", "decoder_pool", "make_pool", "STAT_FIELDS",
           "make_optimizer", "output_loss_scale", "OwnOptimizer", "OutputSteps"]

# Order of the per-batch statistics vector returned by train_update/evaluate.
STAT_FIELDS = ("loss", "loss_sim", "loss_pred", "correct")


def make_optimizer(params, optim: OptimConfig) -> torch.optim.Optimizer:
    """The reference's optimizer choice; lr starts at 0 and is set each epoch.

    The fused implementations update each parameter in one kernel without temporaries; the
    per-parameter for-loop version spends much of a CPU step in allocating and page-faulting
    temporary buffers."""
    params = list(params)
    if optim.optim == "sgd":
        return torch.optim.SGD(params, lr=0.0, momentum=optim.momentum,
                               weight_decay=optim.weight_decay, nesterov=optim.nesterov,
                               fused=True)
    return torch.optim.Adam(params, lr=0.0, weight_decay=optim.weight_decay,
                            amsgrad=optim.optim == "amsgrad", fused=True)


def output_loss_scale(loss: LossConfig) -> float:
    """The output layer's loss scale: (1 - beta) for local predsim, else 1 (reference rule)."""
    return (1 - loss.beta) if (not loss.backprop and loss.loss_sup == "predsim") else 1.0


class OwnOptimizer:
    """What every unit does with its own optimizer (`self.optimizer`, made in setup)."""

    optimizer: torch.optim.Optimizer | None

    def set_lr(self, lr: float) -> None:
        for group in self.optimizer.param_groups:
            group["lr"] = lr

    def step(self) -> None:
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)

    def train_update(self, ctx, y: torch.Tensor, y_onehot: torch.Tensor) -> torch.Tensor:
        """Local loss, backward into this unit only, optimizer step; returns the stats."""
        stats = self.local_backward(ctx, y, y_onehot)
        self.step()
        return stats


def _amp_settings(device: torch.device, precision: str) -> tuple | None:
    return (device.type, torch.bfloat16) if precision == "bf16" else None


def activation_dtype(precision: str) -> torch.dtype:
    """The dtype of a block's output, which is what travels between stages: the one place that
    decides it (bf16 under --precision bf16, else fp32)."""
    return torch.bfloat16 if precision == "bf16" else torch.float32


def _autocast(amp: tuple | None):
    """torch.autocast for the block's precision (a no-op context under fp32)."""
    if amp is None:
        return contextlib.nullcontext()
    return torch.autocast(amp[0], dtype=amp[1])


class LinearFA(nn.Module):
    """Linear layer trained with feedback alignment: the input gradient uses a fixed matrix."""

    def __init__(self, in_features: int, out_features: int):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.weight = nn.Parameter(torch.empty(out_features, in_features))
        self.bias = nn.Parameter(torch.empty(out_features))
        self.register_buffer("feedback", torch.empty(out_features, in_features))

    def forward(self, x):
        return LinearFAFunction.apply(x, self.weight, self.bias, self.feedback)

    def extra_repr(self):
        return f"in_features={self.in_features}, out_features={self.out_features}"


def _default_init(module: nn.Module, gen: torch.Generator) -> None:
    """PyTorch's default Linear/Conv init (uniform +-1/sqrt(fan_in)) drawn from `gen`."""
    w = module.weight
    fan_in = w.size(1) * math.prod(w.shape[2:])
    bound = 1.0 / math.sqrt(fan_in) if fan_in > 0 else 0.0
    w.uniform_(-bound, bound, generator=gen)
    if getattr(module, "bias", None) is not None:
        module.bias.uniform_(-bound, bound, generator=gen)


def _own_code(method, tag: int):
    """`method` rebound to a copy of its function with a code object of its own.

    torch.compile keeps its cache of compiled graphs, and its recompile budget
    (torch._dynamo.config.recompile_limit), per code object. Compiling the bound methods
    directly would make every block of a class share one code object: each block shape x
    train/eval x grad mode x last-batch size would be another entry against one budget, and
    past it dynamo silently runs the rest eagerly. With its own code object every block
    compiles a few graphs of its own (fixed shapes, then a dynamic batch size)."""
    fn = method.__func__
    code = fn.__code__.replace(co_name=f"{fn.__name__}_block{tag}")
    clone = types.FunctionType(code, fn.__globals__, code.co_name, fn.__defaults__,
                               fn.__closure__)
    clone.__kwdefaults__ = fn.__kwdefaults__
    clone.__qualname__ = f"{fn.__qualname__}[block {tag}]"
    return types.MethodType(clone, method.__self__)


def make_pool(kind: str) -> nn.Module:
    """The pooling layers of the reference's VGG layer builder."""
    table = {"M": lambda: nn.MaxPool2d(2, 2), "M3": lambda: nn.MaxPool2d(3, 2, 1),
             "M4": lambda: nn.MaxPool2d(4, 4), "A": lambda: nn.AvgPool2d(2, 2),
             "A3": lambda: nn.AvgPool2d(3, 2, 1), "A4": lambda: nn.AvgPool2d(4, 4)}
    return table[kind]()


def decoder_pool(ch_out: int, dim_out: int, dim_in_decoder: int):
    """Average pool that brings a conv map under `dim_in_decoder` values (docs/algorithm.md 4.4).

    Returns (pool or None, pooled height, pooled width, decoder input size).
    """
    kh = kw = 1
    oh = ow = dim_out
    d = ch_out * oh * ow
    while d > dim_in_decoder and kh < dim_out:
        kh *= 2
        oh = math.ceil(dim_out / kh)
        d = ch_out * oh * ow
        if d > dim_in_decoder:
            kw *= 2
            ow = math.ceil(dim_out / kw)
            d = ch_out * oh * ow
    if kh == 1 and kw == 1:
        return None, oh, ow, d
    ph = (kh * (oh - dim_out // kh)) // 2
    pw = (kw * (ow - dim_out // kw)) // 2
    return nn.AvgPool2d((kh, kw), padding=(ph, pw)), oh, ow, d


class Unit(OwnOptimizer, nn.Module):
    """A pipeline unit: what every locally trained unit (a linear or conv block, a residual
    unit) owns and does the same way. It owns its index, its seed, the pools that follow it
    (`post`), its optimizer, its dropout generator (`dropout_generator`, seeded from (seed,
    index), saved in checkpoints), its autocast settings and the dtype of what it sends on.

    A subclass provides `forward_parts(x, detach)` -> (output before `post`, context of the
    local loss), `local_loss(ctx, y, y_onehot)` -> (loss, stats), `materialize()` and
    `describe()`; this class turns them into the unit protocol's train and eval forwards."""

    channels_last_capable = False

    def __init__(self, *, index: int, seed: int):
        super().__init__()
        self.index = index
        self._seed = seed
        self.local = True
        self.post = nn.Sequential()  # max-pools that follow this unit travel with it
        self.optimizer: torch.optim.Optimizer | None = None
        self.dropout_generator: torch.Generator | None = None
        self._amp: tuple | None = None  # (device type, dtype) of autocast, None: fp32
        self.act_dtype = torch.float32
        self._channels_last = False

    def setup(self, device: torch.device, optim: OptimConfig, *, replica: int = 0,
              precision: str = "fp32", channels_last: bool = False,
              compile: bool | str = False) -> None:
        """Move to `device`, create the dropout generator there and the unit's optimizer.

        Replica r > 0 of a data-parallel run draws its own dropout masks. Under bf16 precision
        the forward passes and local losses run under autocast and the unit's output (what
        travels to the next unit) is bf16; weights and optimizer state stay fp32. `compile`:
        torch.compile what `compile_parts` names (True: inductor; a string names the
        backend)."""
        self.to(device)
        if channels_last and self.channels_last_capable:
            self.to(memory_format=torch.channels_last)
            self._channels_last = True
        self.dropout_generator = torch.Generator(device=device)
        self.dropout_generator.manual_seed(derive_seed(
            self._seed, self.index, "dropout" if replica == 0 else f"dropout/replica{replica}"))
        self.optimizer = make_optimizer(self.parameters(), optim)
        self._amp = _amp_settings(device, precision)
        self.act_dtype = activation_dtype(precision)
        if compile:
            self.compile_parts(compile if isinstance(compile, str) else "inductor")

    def compile_parts(self, backend: str) -> None:
        """torch.compile this unit's hot methods (none by default: the unit runs eagerly)."""

    def forward_parts(self, x: torch.Tensor, detach: bool):  # pragma: no cover - abstract
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Plain forward (global backprop chain or inference)."""
        return self.post(self.forward_parts(x, detach=False)[0])

    def train_forward(self, x: torch.Tensor, detach: bool = True, **inputs):
        """Output for the next unit (pooled; detached unless `detach` is False) and the context
        that local_loss needs. `inputs`: what a unit's objective reads besides its input (the
        network's input `image`), passed on to forward_parts."""
        with _autocast(self._amp):
            out, ctx = self.forward_parts(x, detach, **inputs)
            out = self.post(out.detach() if detach else out)
        return (out.to(self.act_dtype) if detach else out), ctx

    def local_backward(self, ctx, y: torch.Tensor, y_onehot: torch.Tensor) -> torch.Tensor:
        """Local loss and its backward into this unit only (gradients left in .grad)."""
        with _autocast(self._amp):
            loss, stats = self.local_loss(ctx, y, y_onehot)
        loss.backward()
        return stats

    @torch.no_grad()
    def evaluate(self, x, y, y_onehot, with_stats: bool = True, **inputs):
        """Eval-mode output for the next unit and, if asked, the local stats on this batch."""
        with _autocast(self._amp):
            out, ctx = self.forward_parts(x, False, **inputs)
            stats = self.local_loss(ctx, y, y_onehot)[1] if with_stats and self.local \
                else None
            out = self.post(out)
        return out.to(self.act_dtype), stats


class LocalBlock(Unit):
    """Common machinery of the linear and conv blocks; subclasses build `encoder` and heads."""

    def __init__(self, *, index: int, seed: int, num_classes: int, loss: LossConfig,
                 dropout: float, nonlin: str, first_layer: bool):
        super().__init__(index=index, seed=seed)
        self.num_classes = num_classes
        self.cfg = loss
        self.dropout_p = dropout
        self.negative_slope = 0.01 if nonlin == "leakyrelu" else 0.0
        self.first_layer = first_layer
        self.local = not loss.backprop
        self.use_pred = self.local and loss.loss_sup in ("pred", "predsim")
        self.use_sim = self.local and (loss.loss_sup in ("sim", "predsim")
                                       or loss.loss_unsup == "sim")
        self.use_recon = self.local and loss.loss_unsup == "recon" and not first_layer
        self.loss_fn = LocalLoss(loss, local=self.local, use_pred=self.use_pred,
                                 use_sim=self.use_sim, use_recon=self.use_recon)

    init_purpose = "init"  # what the initialisation seed is derived for (with seed and index)

    # --- construction -------------------------------------------------------------------------
    def materialize(self) -> None:
        """Allocate the meta-built modules on the CPU and initialise them from the block's seed.

        Blocks are built on the meta device (shapes only); a process materializes just the
        blocks of its own pipeline stage."""
        self.to_empty(device="cpu")
        gen = torch.Generator().manual_seed(derive_seed(self._seed, self.index, self.init_purpose))
        with torch.no_grad():
            for module in self.modules():
                if isinstance(module, (nn.Linear, nn.Conv2d, nn.ConvTranspose2d)):
                    _default_init(module, gen)
                elif isinstance(module, nn.modules.batchnorm._BatchNorm):
                    module.reset_parameters()
                elif isinstance(module, LinearFA):
                    module.weight.zero_()
                    module.bias.zero_()
                    bound = 1.0 / math.sqrt(module.in_features)
                    module.feedback.uniform_(-bound, bound, generator=gen)
            if hasattr(self, "decoder_y") and isinstance(self.decoder_y, nn.Linear):
                self.decoder_y.weight.zero_()
            if self.cfg.bio and self.local:
                bound = 1.0 / math.sqrt(self.num_classes)
                self.proj_y.uniform_(-bound, bound, generator=gen)

    def _build_common_heads(self, feat: int, dec_in: int) -> None:
        """decoder_y (pred, or LinearFA under bio) and proj_y (bio); called inside meta context."""
        if self.use_pred:
            if self.cfg.bio:
                self.decoder_y = LinearFA(dec_in, self.cfg.target_proj_size)
            else:
                self.decoder_y = nn.Linear(dec_in, self.num_classes)
        if self.cfg.bio and self.local:
            self.register_buffer("proj_y", torch.empty(self.cfg.target_proj_size,
                                                       self.num_classes))

    def compile_parts(self, backend: str) -> None:
        self.encode = torch.compile(_own_code(self.encode, self.index), backend=backend)
        self.local_loss = torch.compile(_own_code(self.local_loss, self.index), backend=backend)

    def describe(self) -> str:
        enc = self.encoder
        if isinstance(enc, nn.Linear):
            return f"Linear({enc.in_features}->{enc.out_features})"
        k = enc.kernel_size[0]
        return f"Conv{k}x{k}({enc.in_channels}->{enc.out_channels})@{self.dim_out}"

    # --- forward pieces -----------------------------------------------------------------------
    def nonlin(self, x):
        if self.negative_slope:
            return F.leaky_relu(x, self.negative_slope)
        return F.relu(x)

    def encode(self, x: torch.Tensor) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def _dropout(self, h: torch.Tensor) -> torch.Tensor:
        p = self.dropout_p
        if not self.training or p == 0:
            return h
        shape = (h.size(0), h.size(1), 1, 1) if h.dim() == 4 else h.shape
        mask = torch.empty(shape, dtype=h.dtype, device=h.device)
        mask.bernoulli_(1.0 - p, generator=self.dropout_generator)
        return h * mask / (1.0 - p)

    def forward_parts(self, x: torch.Tensor, detach: bool):
        """(layer, dropout) output and the context (input, pre-dropout output) of the losses."""
        h = self.encode(x)
        return self._dropout(h), (x, h)

    # --- local losses ---------------------------------------------------------------------------
    def sim_input(self, h: torch.Tensor) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def pred_input(self, h: torch.Tensor) -> torch.Tensor:
        return h

    def local_loss(self, ctx, y: torch.Tensor, y_onehot: torch.Tensor):
        """(loss, stats) of one batch; stats = STAT_FIELDS as a detached float tensor."""
        x, h = ctx
        return self.loss_fn(self, x, h, y, y_onehot)


class LocalLinearBlock(LocalBlock):
    """Linear -> BatchNorm1d -> nonlin -> Dropout, with pred decoder and square sim head."""

    def __init__(self, num_in: int, num_out: int, *, batch_norm: bool = True, **kw):
        super().__init__(**kw)
        self.num_in, self.num_out = num_in, num_out
        with torch.device("meta"):
            self.encoder = nn.Linear(num_in, num_out)
            self.bn = nn.BatchNorm1d(num_out) if batch_norm else None
            self._build_common_heads(num_out, num_out)
            if self.use_sim and not self.cfg.bio:
                self.linear_loss = nn.Linear(num_out, num_out, bias=False)
            if self.use_recon:
                self.decoder_x = nn.Linear(num_out, num_in)

    def encode(self, x):
        h = self.encoder(x.flatten(1))
        if self.bn is not None:
            h = self.bn(h)
        return self.nonlin(h)

    def train_forward(self, x, detach=True):
        return super().train_forward(x.flatten(1), detach)

    def evaluate(self, x, y, y_onehot, with_stats=True):
        return super().evaluate(x.flatten(1), y, y_onehot, with_stats)

    def sim_input(self, h):
        return h if self.cfg.bio else self.linear_loss(h)


class LocalConvBlock(LocalBlock):
    """Conv -> BatchNorm2d -> nonlin -> Dropout2d, with pooled pred decoder and 3x3 sim head."""

    def __init__(self, ch_in: int, ch_out: int, *, kernel_size: int, stride: int, padding: int,
                 dim_out: int, dim_in_decoder: int, batch_norm: bool = True, bias: bool = True,
                 **kw):
        super().__init__(**kw)
        self.ch_in, self.ch_out, self.dim_out = ch_in, ch_out, dim_out
        pool, self.pool_h, self.pool_w, dec_in = decoder_pool(ch_out, dim_out, dim_in_decoder)
        self.decoder_in = dec_in
        with torch.device("meta"):
            self.encoder = nn.Conv2d(ch_in, ch_out, kernel_size, stride, padding, bias=bias)
            self.bn = nn.BatchNorm2d(ch_out) if batch_norm else None
            self.avg_pool = pool if (self.use_pred or (self.cfg.bio and self.local)) else None
            self._build_common_heads(ch_out, dec_in)
            if self.use_sim and not self.cfg.bio:
                self.conv_loss = nn.Conv2d(ch_out, ch_out, 3, 1, 1, bias=False)
            if self.use_recon:
                self.decoder_x = nn.ConvTranspose2d(ch_out, ch_in, kernel_size, stride, padding)

    channels_last_capable = True

    def encode(self, x):
        if self._channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        h = self.encoder(x)
        if self.bn is not None:
            h = self.bn(h)
        return self.nonlin(h)

    def pred_input(self, h):
        return self.avg_pool(h) if self.avg_pool is not None else h

    def sim_input(self, h):
        if self.cfg.bio:
            return self.pred_input(h)
        return self.conv_loss(h)


class OutputSteps(OwnOptimizer):
    """What an output unit does with its forward (`self(x)`), its `loss` and its autocast
    settings (`self._amp`): the global loss's train steps and predictions."""

    def train_update(self, x, y):
        """Local-mode step of the output layer on a detached input: (logits, scaled loss)."""
        out = self.train_backward(x, y)
        self.step()
        return out

    def train_backward(self, x, y):
        """Forward and backward of the global loss on a detached input (grads left in .grad)."""
        with _autocast(self._amp):
            logits = self(x)
            loss = self.loss(logits, y)
        loss.backward()
        return logits.detach(), loss.detach()

    def predict(self, x, y):
        """Eval-mode (logits, scaled loss)."""
        with _autocast(self._amp):
            logits = self(x)
            return logits, self.loss(logits, y)


class OutputLayer(OutputSteps, nn.Module):
    """The final linear classifier with its own optimizer and the (scaled) global CE."""

    def __init__(self, num_in: int, num_classes: int, *, index: int, seed: int,
                 zero_init: bool, loss_scale: float):
        super().__init__()
        self.index = index
        self.loss_scale = loss_scale
        self._seed, self._zero_init = seed, zero_init
        with torch.device("meta"):
            self.linear = nn.Linear(num_in, num_classes)
        self.optimizer: torch.optim.Optimizer | None = None
        self._amp: tuple | None = None

    def materialize(self) -> None:
        self.to_empty(device="cpu")
        gen = torch.Generator().manual_seed(derive_seed(self._seed, self.index, "init"))
        with torch.no_grad():
            _default_init(self.linear, gen)
            if self._zero_init:
                self.linear.weight.zero_()

    def describe(self) -> str:
        return f"Linear({self.linear.in_features}->{self.linear.out_features})"

    def setup(self, device: torch.device, optim: OptimConfig, *, replica: int = 0,
              precision: str = "fp32", channels_last: bool = False,
              compile: bool | str = False) -> None:
        self.to(device)
        self.optimizer = make_optimizer(self.parameters(), optim)
        self._amp = _amp_settings(device, precision)

    def forward(self, x):
        return self.linear(x.flatten(1))

    def loss(self, logits, y):
        """Global cross-entropy, scaled by (1 - beta) for local predsim (reference rule)."""
        return self.loss_scale * F.cross_entropy(logits, y)

