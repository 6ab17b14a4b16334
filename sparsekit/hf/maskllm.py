"""MaskLLM (Fang et al., NeurIPS 2024): learn each 2:4 mask end to end on the language-model loss.

Every group of 4 consecutive inputs of a pruned linear chooses one of the six 2:4 patterns. The
choice is a categorical with logits ``gate`` [out * in / 4, 6]; training samples a soft mask by
Gumbel-softmax, softmax((gate * scale + g) / tau) @ patterns, and the loss flows into the logits
through W * mask. As in the paper's code:

- the logits start near zero (normal, std 0.01) plus a prior: a one-shot 2:4 mask M0 (SparseGPT by
  default) adds (overlap(pattern, M0) - 1) * std(gate) * strength, so the prior's pattern leads
  most groups;
- tau falls linearly from 4 to 0.05 and the scale rises from 100 to 500 over the run, so the
  samples harden towards one pattern per group;
- a regulariser rewards the kept weights' energy, - weight_reg * (1 - step / steps) * sum ||W * M||^2
  (gradient into the mask only), fading to zero by the last step;
- the weights stay frozen (``update_weights=True`` trains them too, at ``weight_lr_scale`` times
  the logits' lr).
- the weights start dense (the paper); ``start="prior"`` starts them from the one-shot result
  instead: its updated weights (SparseGPT's OBS update, or ``prior_update="admm"``) where its mask
  keeps them, the dense weights where it prunes, so the prior's hard mask is exactly the one-shot
  model.

At the end each group takes its most likely pattern, W becomes W * M_hard and the layer is an
ordinary nn.Linear with exact 2:4 zeros, which the rest of sparsekit compresses and serves. It runs
on the trainer (``sparsekit.hf.trainer``: FSDP2, one process or torchrun).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from sparsekit.models import set_submodule

from .attention import calibration_attention
from .trainer import TrainingJob

log = logging.getLogger(__name__)

# the six ways of keeping 2 of 4: [6, 4]
PATTERNS_2_4 = torch.tensor(
    [[1, 1, 0, 0], [1, 0, 1, 0], [1, 0, 0, 1], [0, 1, 1, 0], [0, 1, 0, 1], [0, 0, 1, 1]], dtype=torch.float32
)


@dataclass
class MaskLLMSettings:
    """The paper's schedule (its LLaMA-2 scripts: tau 4 -> 0.05, scale 1e2 -> 5e2, prior strength
    3, weight regularisation 1e-5)."""

    temperature: tuple[float, float] = (4.0, 0.05)
    scale: tuple[float, float] = (1e2, 5e2)
    prior_strength: float = 3.0
    weight_reg: float = 1e-5
    update_weights: bool = False
    weight_lr_scale: float = 0.1  # the weights' lr over the logits' (update_weights only)
    init_std: float = 0.01
    seed: int = 0

    def check(self) -> None:
        if min(self.temperature) <= 0 or min(self.scale) <= 0:
            raise ValueError(f"temperature and scale must be > 0, got {self.temperature}, {self.scale}")
        if self.prior_strength < 0 or self.weight_reg < 0:
            raise ValueError("prior_strength and weight_reg must be >= 0")
        if not self.weight_lr_scale > 0:
            raise ValueError(f"weight_lr_scale must be > 0, got {self.weight_lr_scale}")


@dataclass
class _Anneal:
    temperature: float = 4.0
    scale: float = 1e2
    norms: list[torch.Tensor] = field(default_factory=list)


def prior_logits(
    prior: torch.Tensor | None, groups: int, settings: MaskLLMSettings, generator
) -> torch.Tensor:
    """Initial logits [groups, 6]: noise of std ``init_std`` plus the prior's pull (prior: bool mask
    [out, in] of a one-shot 2:4 result, or None)."""
    gate = torch.randn(groups, 6, generator=generator) * settings.init_std
    if prior is not None and settings.prior_strength > 0:
        overlap = (PATTERNS_2_4 * prior.reshape(-1, 1, 4).float()).sum(-1)  # [groups, 6] in 0..2
        gate += (overlap - 1) * gate.std() * settings.prior_strength
    return gate


LOG_FLOOR = -30.0  # exp(-30) ~ 1e-13: probabilities below it are held there, far from subnormals


def gumbel_softmax_floored(logits: torch.Tensor, tau: float) -> torch.Tensor:
    """softmax((logits + g) / tau) over the last dim, g ~ Gumbel(0, 1), with every log-probability
    floored at ``LOG_FLOOR`` below the row's maximum (zero gradient there).

    At the schedule's end (tau 0.05, scale 500) F.gumbel_softmax can produce subnormal
    probabilities, which x86 CPUs compute 10-100x slower; the floor keeps every mask entry and its
    gradient normal and changes a mask entry by at most 6e-13. With the same generator state it
    draws the same noise as F.gumbel_softmax. logits: float [..., k]; returns float [..., k]."""
    gumbel = -torch.empty_like(logits).exponential_().log()
    z = (logits + gumbel) / tau
    z = (z - z.detach().amax(-1, keepdim=True)).clamp(min=LOG_FLOOR)
    p = z.exp()
    return p / p.sum(-1, keepdim=True)


class LearnedMask24Linear(nn.Module):
    """A linear whose 2:4 mask is learned: y = x (W * M(gate))^T + b, W [out, in]."""

    def __init__(self, linear: nn.Linear, gate: torch.Tensor, anneal: _Anneal, update_weights: bool):
        super().__init__()
        if linear.in_features % 4:
            raise ValueError(f"2:4 needs in_features divisible by 4, got {linear.in_features}")
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight = nn.Parameter(linear.weight.detach(), requires_grad=update_weights)
        self.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach(), requires_grad=False)
        self.gate = nn.Parameter(gate.to(self.weight.device))
        self.register_buffer("patterns", PATTERNS_2_4.to(self.weight.device), persistent=False)
        self.anneal = anneal

    def soft_mask(self) -> torch.Tensor:
        """[out, in] in the weight's dtype: a Gumbel-softmax sample while training, else the argmax."""
        if not self.training:
            return self.hard_mask().to(self.weight.dtype)
        choice = gumbel_softmax_floored(self.gate.float() * self.anneal.scale, self.anneal.temperature)
        return (choice @ self.patterns).view(self.out_features, self.in_features).to(self.weight.dtype)

    def hard_mask(self) -> torch.Tensor:
        """bool [out, in]: each group's most likely pattern."""
        return self.patterns[self.gate.argmax(-1)].view(self.out_features, self.in_features).bool()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mask = self.soft_mask()
        if self.training and torch.is_grad_enabled():
            self.anneal.norms.append((self.weight.detach() * mask).float().square().sum())
        return F.linear(x, self.weight * mask, self.bias)

    def to_linear(self) -> nn.Linear:
        """An nn.Linear holding W * M_hard (exact 2:4 zeros)."""
        linear = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None)
        linear = linear.to(device=self.weight.device, dtype=self.weight.dtype)
        with torch.no_grad():
            linear.weight.copy_(self.weight * self.hard_mask())
            if self.bias is not None:
                linear.bias.copy_(self.bias)
        linear.requires_grad_(False)
        return linear


class MaskLLMJob(TrainingJob):
    """The trainer's job: swap the pruned linears for learned-mask ones, anneal, bake the masks."""

    name = "maskllm"

    def __init__(self, priors: dict[str, torch.Tensor] | None, settings: MaskLLMSettings) -> None:
        settings.check()
        self.priors, self.settings = priors or {}, settings
        self.anneal = _Anneal(settings.temperature[0], settings.scale[0])
        self.names: list[str] = []
        self.changed_groups = 0
        self.groups = 0

    def prepare(self, model: nn.Module, layers: dict[str, nn.Module]) -> None:
        generator = torch.Generator().manual_seed(self.settings.seed)  # every rank draws the same logits
        for name, module in layers.items():
            if type(module) is not nn.Linear:
                raise ValueError(
                    f"maskllm learns masks of nn.Linear layers; {name} is {type(module).__name__}"
                )
            prior = self.priors.get(name)
            gate = prior_logits(prior, module.weight.numel() // 4, self.settings, generator)
            layer = LearnedMask24Linear(module, gate, self.anneal, self.settings.update_weights)
            set_submodule(model, name, layer)
            self.names.append(name)
        log.info("maskllm: learning the 2:4 masks of %d layers", len(self.names))

    def lr_scale(self, name: str) -> float:
        """The mask logits train at the scheduled lr, the weights (when they train) at a fraction."""
        return 1.0 if name.rsplit(".", 1)[-1] == "gate" else self.settings.weight_lr_scale

    def before_step(self, step: int, steps: int) -> None:
        t = step / steps
        (t0, t1), (s0, s1) = self.settings.temperature, self.settings.scale
        self.anneal.temperature = t0 + (t1 - t0) * t
        self.anneal.scale = s0 + (s1 - s0) * t
        self.anneal.norms.clear()

    def loss_term(self, step: int, steps: int) -> torch.Tensor | None:
        norms, self.anneal.norms[:] = list(self.anneal.norms), []
        if not self.settings.weight_reg or not norms:
            return None
        return -self.settings.weight_reg * (1 - step / steps) * torch.stack(norms).sum()

    def finish(self, model: nn.Module) -> None:
        for name in self.names:
            layer = model.get_submodule(name)
            if not isinstance(layer, LearnedMask24Linear):
                continue
            mask = layer.hard_mask()
            prior = self.priors.get(name)
            if prior is not None:
                groups = (mask != prior.to(mask.device)).view(-1, 4).any(-1)
                self.changed_groups += int(groups.sum())
            self.groups += mask.numel() // 4
            set_submodule(model, name, layer.to_linear())
        self.anneal.norms.clear()


PRIORS = ("sparsegpt", "wanda", "magnitude", "none")
STARTS = ("dense", "prior")


def check_prior(prior: str, start: str, prior_update: str) -> None:
    """Refuse a prior / start / update combination before any work."""
    if prior not in PRIORS:
        raise ValueError(f"prior must be one of {PRIORS}, got {prior!r}")
    if start not in STARTS:
        raise ValueError(f"start must be one of {STARTS}, got {start!r}")
    from sparsekit.pruning.compose import weight_update

    weight_update(prior_update)  # a clear error for an unknown update
    if prior == "none" and (start != "dense" or prior_update != "none"):
        raise ValueError("prior='none' has no one-shot weights: start='prior' and prior_update need a prior")
    if prior_update != "none" and start != "prior":
        raise ValueError(
            f"prior_update={prior_update!r} changes only the kept weights, which start='dense' puts back: "
            "use it with start='prior'"
        )


@torch.no_grad()
def one_shot_prior(
    model: nn.Module,
    ids: torch.Tensor,
    method: str,
    show_progress: bool = True,
    start: str = "dense",
    update: str = "none",
):
    """The 2:4 masks ``method`` (with weight ``update``, e.g. "admm") picks ({layer name: bool
    [out, in]}). start="dense" puts the dense weights back everywhere (MaskLLM masks the dense
    weights); start="prior" keeps the one-shot result's weights where its mask keeps them and puts
    the dense ones back where it prunes."""
    from sparsekit.nn.sparsify import sparse_candidates
    from sparsekit.pruning import PruneConfig, prune_model

    check_prior(method, start, update)
    if method == "none":
        return None
    layers = sparse_candidates(model)
    dense = {name: m.weight.detach().clone() for name, m in layers.items()}
    config = PruneConfig(method=method, sparsity="2:4", update=update, show_progress=show_progress)
    with calibration_attention():  # as sparsekit.prune runs its calibration forwards
        prune_model(model, ids, config)
    masks = {name: m.weight != 0 for name, m in sparse_candidates(model).items()}
    for name, m in sparse_candidates(model).items():
        m.weight.copy_(dense[name] if start == "dense" else torch.where(masks[name], m.weight, dense[name]))
    return masks


@dataclass
class MaskLLMReport:
    prior: str
    steps: int
    layers: int = 0
    groups: int = 0
    changed_from_prior: float = 0.0  # share of the groups of four whose pattern differs from the prior
    train: dict = field(default_factory=dict)
    calib: str = ""
    kind: str = "maskllm"

    def to_dict(self) -> dict:
        return {k: v for k, v in vars(self).items()}


def learn_masks(
    model: nn.Module,
    ids: torch.Tensor,
    config,
    prior: str = "sparsegpt",
    settings: MaskLLMSettings | None = None,
    evaluate=None,
    state_dir=None,
    resume: bool = False,
    start: str = "dense",
    prior_update: str = "none",
    prior_ids: torch.Tensor | None = None,
) -> MaskLLMReport:
    """Learn the 2:4 masks of ``model``'s decoder linears in place (MaskLLM); ``ids`` [n, L] int64
    are the training tokens, ``prior_ids`` [n', L'] the one-shot prior's calibration tokens
    (default ``ids``); ``config`` a ``TrainConfig`` (steps, lr, batch...); ``start`` and
    ``prior_update`` as in ``one_shot_prior``. The model comes back with exact 2:4 zeros in
    ordinary nn.Linear layers."""
    from .trainer import train

    check_prior(prior, start, prior_update)
    settings = settings or MaskLLMSettings(seed=config.seed)
    settings.check()
    calib = ids if prior_ids is None else prior_ids
    priors = one_shot_prior(model, calib, prior, config.show_progress, start, prior_update)
    job = MaskLLMJob(priors, settings)
    report = train(model, ids, config, evaluate=evaluate, state_dir=state_dir, resume=resume, job=job)
    changed = job.changed_groups / job.groups if priors and job.groups else 0.0
    log.info("maskllm: %.1f%% of the groups of four left the prior's pattern", 100 * changed)
    return MaskLLMReport(prior, config.steps, len(job.names), job.groups, changed, report.to_dict())
