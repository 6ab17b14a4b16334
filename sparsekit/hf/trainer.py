"""One trainer for everything after pruning: fine-tuning with masks held exact, distillation
(full teacher logits, or top-k logits precomputed to disk) and mask-preserving LoRA, on FSDP2.

The same code runs in one process and under ``torchrun``: the student (and the teacher) are
``fully_shard``-ed per decoder block (``sparsekit.hf.fsdp``), parameters are all-gathered in the
compute dtype (bf16 where the device has it) while the fp32 shards stay the master weights and
AdamW's state, gradients are reduced in fp32. A step takes ``batch_size`` sequences over all
processes, ``grad_accum`` micro-batches per process. Which sequences a step reads is a function of
(seed, step) alone (epochs of a seeded permutation), so a resumed run reads what the uninterrupted
run would have, and 1 and N processes read the same global batch.

Checkpoints (``save_every`` and at the end) are ``torch.distributed.checkpoint`` folders of the
trainable parameters and the optimizer state, written as ``.step-N.partial`` and renamed to
``step-N`` only when complete; ``latest`` names the newest complete one.
"""

from __future__ import annotations

import functools
import json
import logging
import math
import os
import resource
import shutil
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from tqdm.auto import tqdm

from sparsekit._io import write_json_atomic, write_text_atomic
from sparsekit.models import find_decoder_blocks, set_submodule
from sparsekit.nn import SparseLinear, densify
from sparsekit.nn.sparsify import release_memory, sparse_candidates
from sparsekit.pruning.capture import fast_bf16_matmuls

from . import fsdp

log = logging.getLogger(__name__)

SCHEDULES = ("constant", "cosine")
PRECISIONS = ("auto", "bf16", "fp32")


@dataclass
class TrainConfig:
    """How to train. ``batch_size`` is sequences per optimizer step over every process."""

    steps: int = 100
    lr: float = 2e-5
    batch_size: int = 4
    grad_accum: int = 1
    schedule: str = "constant"  # constant | cosine (to min_lr_ratio * lr), after linear warm-up
    warmup: int = 0
    min_lr_ratio: float = 0.0
    weight_decay: float = 0.0
    max_grad_norm: float | None = None  # clip to this global norm (the norm is logged either way)
    precision: str = "auto"  # auto: bf16 compute where the device runs it natively, else fp32
    activation_checkpointing: bool = False
    eval_every: int = 0
    save_every: int = 0
    keep_checkpoints: int = 2
    log_every: int = 10
    seed: int = 0
    temperature: float = 1.0
    lm_weight: float = 0.0
    teacher_topk: int = 0  # > 0: distill from the teacher's top-k logits precomputed to disk
    lora_rank: int = 0  # > 0: mask-preserving LoRA (peft) instead of full fine-tuning
    lora_alpha: float | None = None
    lora_targets: tuple[str, ...] = ()  # module names or suffixes; default: every pruned linear
    stop_after: int | None = None  # stop this run after this many steps (continue with resume)
    show_progress: bool = True

    def check(self, world_size: int) -> None:
        """Raise on a setting that cannot work, before any expensive work."""
        for name in ("steps", "batch_size", "grad_accum"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not self.lr > 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")
        if self.schedule not in SCHEDULES:
            raise ValueError(f"schedule must be one of {SCHEDULES}, got {self.schedule!r}")
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {PRECISIONS}, got {self.precision!r}")
        if not 0 <= self.warmup < self.steps:
            raise ValueError(f"warmup must be in [0, steps), got {self.warmup} of {self.steps}")
        if self.temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {self.temperature}")
        if self.batch_size % (world_size * self.grad_accum):
            raise ValueError(
                f"batch_size {self.batch_size} is not divisible by processes x grad_accum "
                f"({world_size} x {self.grad_accum}): every micro-batch must hold the same number of "
                "sequences; change --batch-size or --grad-accum"
            )


@dataclass
class TrainReport:
    steps: int
    lr: float
    seqlen: int
    nsamples: int
    batch_size: int
    grad_accum: int = 1
    world_size: int = 1
    precision: str = "fp32"
    loss: str = "lm"  # lm | distill | distill+lm | distill-topk(+lm)
    temperature: float = 1.0
    lm_weight: float = 0.0
    lora_rank: int = 0
    losses: list[float] = field(default_factory=list)  # the task loss (LM / distillation) per step
    job_losses: list[float] = field(default_factory=list)  # the job's extra term (MaskLLM's regulariser)
    lrs: list[float] = field(default_factory=list)
    grad_norms: list[float] = field(default_factory=list)
    evals: list[tuple[int, float]] = field(default_factory=list)
    ppl_before: float | None = None
    ppl_after: float | None = None
    masks_exact: bool = True
    masked_weights: int = 0
    trained_layers: int = 0
    trainable_params: int = 0
    resumed_from: int | None = None
    stopped_at: int | None = None
    tokens: int = 0
    tokens_per_s: float = 0.0
    state_mb_per_process: float = 0.0  # this rank's parameter + gradient + optimizer shards
    peak_rss_mb: float = 0.0
    seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class TrainingJob:
    """What trains, when it is not the pruned linears' weights (e.g. MaskLLM's mask logits).

    ``prepare`` runs before sharding: swap modules, set ``requires_grad`` on what trains.
    ``before_step`` sets per-step state (annealed temperatures) before each micro-batch's forward.
    ``loss_term`` is added to each micro-batch's loss after its forward (or None). ``finish``
    runs on the plain model after training (e.g. bake the learned masks in). ``lr_scale`` gives a
    trained parameter (by name) its multiple of the scheduled lr."""

    name = "job"

    def lr_scale(self, name: str) -> float:
        return 1.0

    def prepare(self, model: nn.Module, layers: dict[str, nn.Module]) -> None:
        raise NotImplementedError

    def before_step(self, step: int, steps: int) -> None:
        pass

    def loss_term(self, step: int, steps: int) -> torch.Tensor | None:
        return None

    def finish(self, model: nn.Module) -> None:
        pass


# --- data order and schedule --------------------------------------------------------------------


@functools.lru_cache(maxsize=4)
def _epoch_order(n: int, seed: int, epoch: int) -> torch.Tensor:
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch))


def step_rows(step: int, batch_size: int, n: int, seed: int) -> torch.Tensor:
    """The rows of the training tensor step ``step`` reads: [batch_size] int64, epochs of a seeded
    permutation of the n rows, so the order depends on (seed, step) only."""
    rows, i = [], step * batch_size
    while len(rows) < batch_size:
        epoch, offset = divmod(i, n)
        take = min(n - offset, batch_size - len(rows))
        rows.extend(_epoch_order(n, seed, epoch)[offset : offset + take].tolist())
        i += take
    return torch.tensor(rows, dtype=torch.int64)


def lr_at(step: int, config: TrainConfig) -> float:
    """Learning rate of step ``step`` (0-based): linear warm-up, then constant or cosine."""
    if step < config.warmup:
        return config.lr * (step + 1) / (config.warmup + 1)
    if config.schedule == "constant":
        return config.lr
    done = (step - config.warmup) / max(1, config.steps - config.warmup - 1)
    floor = config.min_lr_ratio * config.lr
    return floor + (config.lr - floor) * 0.5 * (1 + math.cos(math.pi * min(1.0, done)))


# --- losses ---------------------------------------------------------------------------------------


def distill_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 1.0):
    """temperature^2 * mean over tokens of KL(softmax(t / T) || softmax(s / T)); logits [B, L, V]."""
    s = torch.log_softmax(student_logits.float() / temperature, dim=-1).flatten(0, -2)
    t = torch.log_softmax(teacher_logits.float() / temperature, dim=-1).flatten(0, -2)
    return torch.nn.functional.kl_div(s, t, log_target=True, reduction="batchmean") * temperature**2


def topk_distill_loss(
    student_logits: torch.Tensor, values: torch.Tensor, indices: torch.Tensor, temperature: float = 1.0
) -> torch.Tensor:
    """KL from the teacher's top-k distribution (its k logits renormalised) to the student's
    probabilities of those k tokens; student_logits [B, L, V], values / indices [B, L, k]."""
    s = torch.log_softmax(student_logits.float() / temperature, dim=-1).gather(-1, indices.long())
    t = torch.log_softmax(values.float() / temperature, dim=-1)
    kl = (t.exp() * (t - s)).sum(-1)
    return kl.mean() * temperature**2


# --- the trainer ------------------------------------------------------------------------------------


def compute_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """bf16 for 'bf16', and for 'auto' where the device multiplies bf16 natively; None: fp32."""
    if precision == "fp32" or (precision == "auto" and not fast_bf16_matmuls(device)):
        return None
    if precision == "bf16" and not fast_bf16_matmuls(device):
        log.warning("precision bf16 on a device without native bf16 matmuls: it will be slow")
    return torch.bfloat16


def train_device() -> torch.device:
    """Where training computes: this rank's GPU when there is one, else the CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    return torch.device("cpu")


class _Teacher:
    """Where the teacher's targets come from: a sharded model, or top-k logits on disk."""

    def __init__(self, model: nn.Module | None, topk: dict[str, torch.Tensor] | None) -> None:
        self.model, self.topk = model, topk

    def loss(self, student_logits, batch, rows, config: TrainConfig) -> torch.Tensor:
        if self.topk is not None:
            return topk_distill_loss(
                student_logits, self.topk["values"][rows], self.topk["indices"][rows], config.temperature
            )
        with torch.no_grad():
            target = self.model(input_ids=batch, use_cache=False).logits
        return distill_loss(student_logits, target, config.temperature)


def precompute_topk(
    teacher: nn.Module, input_ids: torch.Tensor, k: int, folder: Path, batch_size: int = 4
) -> Path:
    """The teacher's top-k logits of every training token, written to ``folder/topk.safetensors``
    (values fp32, indices int32): n * L * k * 8 bytes on disk and in each process's memory.

    Under torchrun each rank computes its share of the rows and rank 0 joins the shares."""
    from safetensors.torch import load_file, save_file

    world, rank = dist.get_world_size(), dist.get_rank()
    target = folder / "topk.safetensors"
    meta = {"k": k, "rows": input_ids.shape[0], "seqlen": input_ids.shape[1]}
    meta_file = folder / "topk.json"
    if target.is_file() and meta_file.is_file() and json.loads(meta_file.read_text()) == meta:
        log.info("teacher top-%d logits: reusing %s", k, target)
        return target
    folder.mkdir(parents=True, exist_ok=True)
    mine = torch.arange(rank, input_ids.shape[0], world)
    device = next(teacher.parameters()).device
    values, indices = [], []
    teacher.eval()
    steps = math.ceil(input_ids.shape[0] / world / batch_size)
    with torch.no_grad():
        for i in tqdm(range(steps), desc="teacher top-k", disable=rank != 0):
            rows = mine[i * batch_size : (i + 1) * batch_size]
            # every rank runs the same number of forwards (FSDP gathers in each): pad with row 0
            batch = input_ids[rows if len(rows) else torch.zeros(1, dtype=torch.int64)].to(device)
            top = teacher(input_ids=batch, use_cache=False).logits.float().topk(k, dim=-1)
            if len(rows):
                values.append(top.values.cpu())
                indices.append(top.indices.to(torch.int32).cpu())
    part = folder / f".topk-rank{rank}.safetensors"
    save_file({"rows": mine, "values": torch.cat(values), "indices": torch.cat(indices)}, str(part))
    dist.barrier()
    if rank == 0:
        n, L = input_ids.shape
        all_values = torch.empty(n, L, k, dtype=torch.float32)
        all_indices = torch.empty(n, L, k, dtype=torch.int32)
        for r in range(world):
            piece = load_file(str(folder / f".topk-rank{r}.safetensors"))
            all_values[piece["rows"]] = piece["values"]
            all_indices[piece["rows"]] = piece["indices"]
        tmp = folder / ".topk.safetensors.tmp"
        save_file({"values": all_values, "indices": all_indices}, str(tmp))
        os.replace(tmp, target)
        write_json_atomic(meta_file, meta)
        for r in range(world):
            (folder / f".topk-rank{r}.safetensors").unlink(missing_ok=True)
    dist.barrier()
    return target


def load_topk(path: Path, vocab: int) -> dict[str, torch.Tensor]:
    """The top-k cache, validated (shapes, finite values, indices inside the vocabulary)."""
    from safetensors.torch import load_file

    data = load_file(str(path))
    values, indices = data.get("values"), data.get("indices")
    if values is None or indices is None or values.shape != indices.shape or values.dim() != 3:
        raise ValueError(f"{path} is not a top-k logits file (values / indices [n, L, k])")
    if indices.numel() and (int(indices.min()) < 0 or int(indices.max()) >= vocab):
        raise ValueError(f"{path} holds token ids outside the student's vocabulary ({vocab})")
    if not bool(torch.isfinite(values).all()):
        raise ValueError(f"{path} holds non-finite logits")
    return {"values": values, "indices": indices}


def _trainable_layers(model: nn.Module) -> dict[str, nn.Module]:
    layers = dict(sparse_candidates(model))
    if not layers:
        raise ValueError("the model has no decoder-block linear layers to train")
    return layers


def _local_bytes(params: list[nn.Parameter], optimizer: torch.optim.Optimizer) -> int:
    total = 0
    for p in params:
        shard = fsdp.local(p.detach())
        total += 2 * shard.numel() * shard.element_size()  # the weight and its gradient
        for value in optimizer.state.get(p, {}).values():
            if torch.is_tensor(value) and value.dim():
                value = fsdp.local(value)
                total += value.numel() * value.element_size()
    return total


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


class _Checkpoints:
    """``torch.distributed.checkpoint`` folders of the trainable state under ``folder``."""

    def __init__(self, folder: Path, keep: int) -> None:
        self.folder, self.keep = folder, keep

    def _options(self):
        from torch.distributed.checkpoint.state_dict import StateDictOptions

        # only what trains is saved; the frozen weights come from the input model again
        return StateDictOptions(ignore_frozen_params=True, strict=False)

    def latest(self) -> Path | None:
        pointer = self.folder / "latest"
        if not pointer.is_file():
            return None
        path = self.folder / pointer.read_text().strip()
        if not (path / "trainer.json").is_file():
            raise ValueError(f"{pointer} names {path.name}, which is not a complete checkpoint")
        return path

    def save(self, step: int, model, optimizer, trainer_state: dict) -> Path:
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_state_dict

        final = self.folder / f"step-{step:08d}"
        partial = self.folder / f".step-{step:08d}.partial"
        if dist.get_rank() == 0:
            self.folder.mkdir(parents=True, exist_ok=True)
            shutil.rmtree(partial, ignore_errors=True)
        dist.barrier()
        model_state, optim_state = get_state_dict(model, optimizer, options=self._options())
        dcp.save({"model": model_state, "optimizer": optim_state}, checkpoint_id=str(partial))
        dist.barrier()
        if dist.get_rank() == 0:
            write_json_atomic(partial / "trainer.json", trainer_state)
            shutil.rmtree(final, ignore_errors=True)
            os.replace(partial, final)
            write_text_atomic(self.folder / "latest", final.name + "\n")
            kept = sorted(p for p in self.folder.glob("step-*") if p.is_dir())
            for old in kept[: -self.keep]:
                shutil.rmtree(old, ignore_errors=True)
        dist.barrier()
        return final

    def load(self, path: Path, model, optimizer) -> dict:
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

        model_state, optim_state = get_state_dict(model, optimizer, options=self._options())
        state = {"model": model_state, "optimizer": optim_state}
        dcp.load(state, checkpoint_id=str(path))
        set_state_dict(
            model,
            optimizer,
            model_state_dict=state["model"],
            optim_state_dict=state["optimizer"],
            options=self._options(),
        )
        return json.loads((path / "trainer.json").read_text())


_RESUME_KEYS = ("batch_size", "seed", "lr", "schedule", "warmup", "lora_rank", "teacher_topk")


def _check_resume(saved: dict, config: TrainConfig, input_ids: torch.Tensor) -> None:
    """Refuse a resume whose data order or optimisation would differ from the saved run's."""
    was = saved["config"]
    changed = [k for k in _RESUME_KEYS if was.get(k) != getattr(config, k)]
    if list(input_ids.shape) != saved["data_shape"]:
        changed.append(f"training data {saved['data_shape']} -> {list(input_ids.shape)}")
    if changed:
        raise ValueError(
            f"cannot resume: these differ from the saved run: {', '.join(map(str, changed))}; "
            "resume with the same settings or start a new output folder"
        )


class Trainer:
    """Prepare (densify, LoRA, shard, masks), run the steps, and hand back a plain model."""

    def __init__(
        self,
        model: nn.Module,
        input_ids: torch.Tensor,
        config: TrainConfig,
        teacher: nn.Module | None = None,
        evaluate: Callable[[nn.Module], float] | None = None,
        state_dir: str | Path | None = None,
        resume: bool = False,
        job: TrainingJob | None = None,
    ) -> None:
        self.model, self.ids, self.config, self.job = model, input_ids, config, job
        self.teacher_model, self.evaluate = teacher, evaluate
        self.state_dir = Path(state_dir) if state_dir is not None else None
        self.resume = resume
        self.world, self.rank = dist.get_world_size(), dist.get_rank()
        config.check(self.world)
        if input_ids.dim() != 2 or input_ids.shape[1] < 2:
            raise ValueError(f"input_ids must be [n, L] with L >= 2, got {tuple(input_ids.shape)}")
        if resume and self.state_dir is None:
            raise ValueError("resume needs the folder the run saved its checkpoints in")
        if (config.save_every or resume) and self.state_dir is None:
            raise ValueError("save_every needs a folder for the checkpoints (state_dir / --out)")
        if teacher is None and (config.teacher_topk or config.lm_weight):
            raise ValueError("teacher_topk and lm_weight weigh a teacher's logits: give a teacher")
        if teacher is not None and teacher.config.vocab_size != model.config.vocab_size:
            raise ValueError(
                f"teacher vocabulary ({teacher.config.vocab_size}) differs from the student's "
                f"({model.config.vocab_size})"
            )
        self.device = train_device()  # the model may sit on the CPU: its shards move there
        self.compute_dtype = self._compute_dtype()
        self.report = TrainReport(
            config.steps,
            config.lr,
            input_ids.shape[1],
            input_ids.shape[0],
            config.batch_size,
            grad_accum=config.grad_accum,
            world_size=self.world,
            precision="bf16" if self.compute_dtype == torch.bfloat16 else "fp32",
            temperature=config.temperature,
            lm_weight=config.lm_weight,
            lora_rank=config.lora_rank,
        )
        if teacher is not None:
            kind = "distill-topk" if config.teacher_topk else "distill"
            self.report.loss = f"{kind}+lm" if config.lm_weight else kind

    def _compute_dtype(self) -> torch.dtype | None:
        return compute_dtype(self.config.precision, self.device)

    # -- preparation --

    def _teacher_targets(self) -> _Teacher | None:
        teacher, config = self.teacher_model, self.config
        if teacher is None:
            return None
        teacher.eval()
        for p in teacher.parameters():
            p.requires_grad_(False)
        fsdp.shard_model(teacher, find_decoder_blocks(teacher)[1], self.compute_dtype, self.device)
        if not config.teacher_topk:
            return _Teacher(teacher, None)
        folder = (self.state_dir or Path(os.environ.get("TMPDIR", "/tmp"))) / "teacher_topk"
        path = precompute_topk(teacher, self.ids, config.teacher_topk, folder)
        fsdp.unshard_in_place(teacher)  # the caller's teacher object comes back usable
        self.teacher_model = None
        release_memory()
        return _Teacher(None, load_topk(path, self.model.config.vocab_size))

    def _prepare_student(self) -> tuple[nn.Module, dict[str, nn.Parameter]]:
        """Densify SparseLinear layers, choose what trains (LoRA or the block linears), shard."""
        model, config = self.model, self.config
        self.formats = {n: m.format for n, m in model.named_modules() if isinstance(m, SparseLinear)}
        densify(model)
        for p in model.parameters():
            p.requires_grad_(False)
        layers = _trainable_layers(model)
        blocks = list(find_decoder_blocks(model)[1])  # found before a job swaps their linears
        self.report.trained_layers = len(layers)
        sparse_names = set()
        if self.job is not None:
            if config.lora_rank:
                raise ValueError(f"{self.job.name} trains its own parameters: LoRA does not apply")
            self.wrapped = model
            self.job.prepare(model, layers)
        elif config.lora_rank:
            from .lora import add_lora, lora_config

            torch.manual_seed(config.seed)  # every rank initialises the same A matrices
            targets = config.lora_targets or tuple(layers)
            self.wrapped = add_lora(model, lora_config(config.lora_rank, targets, config.lora_alpha))
        else:
            self.wrapped = model
            for module in layers.values():
                weight = module.weight  # the parameter itself (Conv1D stores it [in, out])
                weight.requires_grad_(True)
                if bool((weight == 0).any()):
                    sparse_names.add(id(weight))
                bias = getattr(module, "bias", None)
                if bias is not None:
                    bias.requires_grad_(True)
        if config.activation_checkpointing:
            model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        before = {id(p): n for n, p in model.named_parameters()}
        fsdp.shard_model(model, blocks, self.compute_dtype, self.device)
        params = {n: p for n, p in model.named_parameters() if p.requires_grad}
        # sharding replaced the parameters: find the masked ones again by name
        masked_names = {before[i] for i in sparse_names}
        self.masks = fsdp.Masks({n: p for n, p in params.items() if n in masked_names})
        self.report.masked_weights = len(self.masks.params)
        self.report.trainable_params = sum(p.numel() for p in params.values())
        return self.wrapped, params

    # -- steps --

    def _micro_batches(self, step: int) -> list[torch.Tensor]:
        rows = step_rows(step, self.config.batch_size, self.ids.shape[0], self.config.seed)
        per_rank = self.config.batch_size // self.world
        mine = rows[self.rank * per_rank : (self.rank + 1) * per_rank]
        return list(mine.split(per_rank // self.config.grad_accum))

    def _loss(self, net: nn.Module, rows: torch.Tensor) -> torch.Tensor:
        batch = self.ids[rows].to(self.device)
        config, teacher = self.config, self.targets
        if teacher is None:
            return net(input_ids=batch, labels=batch, use_cache=False).loss
        out = net(input_ids=batch, labels=batch if config.lm_weight else None, use_cache=False)
        loss = teacher.loss(out.logits, batch, rows, config)
        return loss + config.lm_weight * out.loss if config.lm_weight else loss

    def _param_groups(self, named: dict[str, nn.Parameter]) -> list[dict]:
        """The optimizer's parameter groups: one per lr multiple the job asks for (in first-seen
        order, the same on every rank)."""
        groups: dict[float, list[nn.Parameter]] = {}
        for name, param in named.items():
            scale = 1.0 if self.job is None else float(self.job.lr_scale(name))
            if not scale > 0:
                raise ValueError(f"lr scale of {name} must be > 0, got {scale}")
            groups.setdefault(scale, []).append(param)
        return [{"params": ps, "lr_scale": scale} for scale, ps in groups.items()]

    def _step(self, net, params: list[nn.Parameter], optimizer, step: int) -> tuple[float, float, float]:
        """One optimizer step: (the task loss, the gradient norm, the job's extra loss term)."""
        lr = lr_at(step, self.config)
        for group in optimizer.param_groups:
            group["lr"] = lr * group["lr_scale"]
        micro = self._micro_batches(step)
        total = torch.zeros(2, dtype=torch.float64)  # the task loss, the job's extra term
        for i, rows in enumerate(micro):
            self.model.set_requires_gradient_sync(i == len(micro) - 1)
            if self.job is not None:
                self.job.before_step(step, self.config.steps)  # before every micro-batch's forward
            task = self._loss(net, rows)
            extra = self.job.loss_term(step, self.config.steps) if self.job is not None else None
            loss = task if extra is None else task + extra
            if not math.isfinite(loss.item()):
                raise FloatingPointError(f"loss is {loss.item()} at step {step}; lower the lr (now {lr})")
            (loss / len(micro)).backward()
            parts = (task.detach(), torch.zeros(()) if extra is None else extra.detach())
            total += torch.stack([p.double().cpu() for p in parts]) / len(micro)
        self.masks.apply_to_grads()
        limit = self.config.max_grad_norm if self.config.max_grad_norm else float("inf")
        norm = torch.nn.utils.clip_grad_norm_(params, limit)
        norm = norm.full_tensor() if hasattr(norm, "full_tensor") else norm
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        self.masks.apply_to_weights()
        if self.world > 1:
            total = total.to(self.device)
            dist.all_reduce(total)
            total = total.cpu() / self.world
        return float(total[0]), float(norm), float(total[1])

    def _log(self, record: dict) -> None:
        if self.rank == 0 and self.state_dir is not None:
            self.state_dir.mkdir(parents=True, exist_ok=True)
            with open(self.state_dir / "train_log.jsonl", "a") as f:
                f.write(json.dumps(record) + "\n")

    def _trim_log(self, upto: int) -> None:
        """On resume: drop log lines of steps after the checkpoint (the run repeats them)."""
        path = self.state_dir / "train_log.jsonl" if self.state_dir else None
        if self.rank == 0 and path is not None and path.is_file():
            lines = [ln for ln in path.read_text().splitlines() if json.loads(ln).get("step", 0) <= upto]
            write_text_atomic(path, "".join(line + "\n" for line in lines))

    def _evaluate(self, net, step: int) -> None:
        if self.evaluate is None:
            return
        net.eval()
        ppl = float(self.evaluate(self.model))
        net.train()
        self.report.evals.append((step, ppl))
        self._log({"step": step, "eval_ppl": ppl})
        log.info("step %d: eval perplexity %.3f", step, ppl)

    def _trainer_state(self, step: int) -> dict:
        return {
            "step": step,
            "config": asdict(self.config),
            "data_shape": list(self.ids.shape),
            "world_size": self.world,
            "report": self.report.to_dict(),
        }

    def run(self) -> TrainReport:
        started = time.perf_counter()
        config, report = self.config, self.report
        if self.evaluate is not None:
            report.ppl_before = float(self.evaluate(self.model))
        self.targets = self._teacher_targets()
        net, named = self._prepare_student()
        params = list(named.values())
        optimizer = torch.optim.AdamW(
            self._param_groups(named), lr=config.lr, weight_decay=config.weight_decay
        )
        checkpoints = (
            _Checkpoints(self.state_dir / "checkpoints", config.keep_checkpoints)
            if (self.state_dir is not None)
            else None
        )
        start = 0
        if self.resume and checkpoints is not None and checkpoints.latest() is not None:
            path = checkpoints.latest()
            saved = checkpoints.load(path, self.model, optimizer)
            _check_resume(saved, config, self.ids)
            start = saved["step"]
            for key in ("losses", "lrs", "grad_norms", "evals", "tokens"):
                setattr(report, key, saved["report"][key])
            report.job_losses = saved["report"].get("job_losses", [])
            report.evals = [tuple(e) for e in report.evals]
            report.resumed_from = start
            self._trim_log(start)
            log.info("resumed from %s (step %d of %d)", path, start, config.steps)
        elif self.resume:
            log.info("nothing to resume in %s: starting at step 0", self.state_dir)
        net.train()
        tokens_per_step = config.batch_size * self.ids.shape[1]
        end = config.steps if config.stop_after is None else min(config.steps, start + config.stop_after)
        bar = tqdm(range(start, end), desc="train", disable=not config.show_progress or self.rank != 0)
        run_started = time.perf_counter()
        try:
            for step in bar:
                loss, norm, extra = self._step(net, params, optimizer, step)
                report.losses.append(loss)
                report.job_losses.append(extra)
                report.grad_norms.append(norm)
                report.lrs.append(lr_at(step, config))
                report.tokens += tokens_per_step
                rate = tokens_per_step * (step + 1 - start) / (time.perf_counter() - run_started)
                bar.set_postfix(loss=f"{loss:.4f}", tok_s=f"{rate:.0f}")
                self._log(
                    {
                        "step": step + 1,
                        "loss": loss,
                        "job_loss": extra,
                        "lr": report.lrs[-1],
                        "grad_norm": norm,
                        "tokens": report.tokens,
                        "tokens_per_s": rate,
                    }
                )
                if config.log_every and ((step + 1) % config.log_every == 0 or step + 1 == end):
                    log.info(
                        "step %d/%d loss %.4f lr %.3g grad norm %.3g",
                        step + 1,
                        config.steps,
                        loss,
                        report.lrs[-1],
                        norm,
                    )
                if config.eval_every and (step + 1) % config.eval_every == 0:
                    self._evaluate(net, step + 1)
                if checkpoints is not None and (
                    (config.save_every and (step + 1) % config.save_every == 0) or step + 1 == end
                ):
                    checkpoints.save(step + 1, self.model, optimizer, self._trainer_state(step + 1))
            elapsed = max(1e-9, time.perf_counter() - run_started)
            report.tokens_per_s = tokens_per_step * (end - start) / elapsed
            report.stopped_at = end if end < config.steps else None
            report.state_mb_per_process = _local_bytes(params, optimizer) / 2**20
            report.masks_exact = self.masks.exact()
        finally:
            del optimizer
            self._finish()
        report.peak_rss_mb = _peak_rss_mb()
        if self.evaluate is not None:
            report.ppl_after = float(self.evaluate(self.model))
        report.seconds = time.perf_counter() - started
        return report

    def _finish(self) -> None:
        """The model back as a plain module: unsharded, LoRA left on ``self.wrapped`` for the caller
        to save and merged into ``self.model``, formats restored, nothing requiring grad."""
        fsdp.unshard_in_place(self.model)
        if self.targets is not None and self.targets.model is not None:
            fsdp.unshard_in_place(self.targets.model)
        if self.job is not None:
            self.job.finish(self.model)
        if self.config.activation_checkpointing:
            self.model.activation_checkpointing_disable()
        for p in self.model.parameters():
            p.grad = None
            p.requires_grad_(False)
        release_memory()

    def merge_lora(self) -> None:
        """Fold the masked LoRA update into the base weights (the model stays as sparse)."""
        if self.config.lora_rank:
            self.wrapped.merge_and_unload()

    def restore_formats(self) -> None:
        """Convert the layers that came in as SparseLinear back to their formats."""
        for name, fmt in self.formats.items():
            module = self.model.get_submodule(name)
            with torch.no_grad():
                set_submodule(self.model, name, SparseLinear.from_linear(module, format=fmt))


def train(
    model: nn.Module,
    input_ids: torch.Tensor,
    config: TrainConfig,
    teacher: nn.Module | None = None,
    evaluate: Callable[[nn.Module], float] | None = None,
    state_dir: str | Path | None = None,
    resume: bool = False,
    adapter_dir: str | Path | None = None,
    job: TrainingJob | None = None,
) -> TrainReport:
    """Train ``model`` in place on ``input_ids`` [n, L] (int64 token ids) and return the report.

    One process or ``torchrun``: a process group is created for this call when none exists.
    teacher: distil from it (frozen; sharded like the student, or top-k logits on disk with
    ``config.teacher_topk``). evaluate(model) -> perplexity, before, every ``eval_every`` steps and
    after. state_dir: checkpoints, ``train_log.jsonl`` and the top-k cache; ``resume`` continues the
    newest checkpoint there. With LoRA the unmerged adapter is written to ``adapter_dir`` (when
    given) and the masked update is merged into ``model``. SparseLinear layers come back in their
    formats, pruned weights exactly zero. job: train something else than the pruned weights
    (``TrainingJob``, e.g. MaskLLM's mask logits).
    """
    with fsdp.process_group(train_device()):
        trainer = Trainer(model, input_ids, config, teacher, evaluate, state_dir, resume, job)
        report = trainer.run()
        if config.lora_rank:
            if adapter_dir is not None and dist.get_rank() == 0:
                from .lora import save_adapter

                save_adapter(trainer.wrapped, adapter_dir)
            trainer.merge_lora()
        trainer.restore_formats()
    return report
