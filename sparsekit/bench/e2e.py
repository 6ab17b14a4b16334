"""End-to-end generation speed of a dense and a sparsified model: TTFT, TPOT, memory, perplexity.

TTFT is the prefill of the prompt up to the first token (argmax of the last position). TPOT is
the mean time of the decode steps themselves: a manual loop over a static KV cache (transformers
``StaticCache``, falling back to the model's own dynamic cache), each step timed between device
synchronizations, so prefill is never divided into the per-token time (``generate(N) / N`` would).
One untimed run comes first (it also triggers the compile when ``compile=True``).
"""

from __future__ import annotations

import copy
import logging
import statistics
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn

from sparsekit._env import environment
from sparsekit.bench.timing import RegionTimer, quantiles
from sparsekit.models import describe, model_bytes, model_device
from sparsekit.nn import cpu_rule

log = logging.getLogger(__name__)


@dataclass
class E2ERow:
    variant: str  # "dense" | "sparse (2:4)" ...
    ttft_ms: float  # median over repeats
    ttft_p20_ms: float
    ttft_p80_ms: float
    tpot_ms: float  # median over repeats of the mean decode-step time
    tpot_p20_ms: float  # over all decode steps of all repeats
    tpot_p80_ms: float
    prefill_tok_s: float  # batch * prompt_len / TTFT
    decode_tok_s: float  # batch / TPOT
    model_bytes: int  # parameters + buffers, shared storages once
    decode_gbps: float  # step bytes / TPOT: the weight stream a decode step implies
    peak_bytes: int  # CUDA max allocated, or the process's RSS high-water mark on the CPU
    peak_over_start_bytes: int  # the peak minus what was in use when the timed runs began
    ppl: float | None
    cache: str  # "static" | "dynamic"
    compiled: bool
    dtype: str = ""
    decode_speedup: float = float("nan")  # best dense TPOT of this dtype (eager or compiled) / this TPOT
    prefill_speedup: float = float("nan")  # the same for TTFT
    floor_ms: float = float("nan")  # step bytes / measured read bandwidth: a step's fastest weight stream
    step_bytes: int = 0  # model bytes less an input embedding that is not the head (a step reads one row)
    sparsify: dict = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    env: dict = field(default_factory=dict)


@dataclass
class E2EResult:
    env: dict
    config: dict
    rows: list[E2ERow]

    def to_dict(self) -> dict:
        return {"env": self.env, "config": self.config, "rows": [asdict(r) for r in self.rows]}


# ----------------------------------------------------------------------------- memory
def _rss_bytes(field_name: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field_name + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def reset_peak_memory(device: torch.device) -> int:
    """Reset the peak counter; return the bytes in use now (CUDA allocated, or RSS on the CPU).

    On Linux, writing 5 to /proc/self/clear_refs resets the RSS high-water mark (VmHWM).
    """
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        return torch.cuda.memory_allocated(device)
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        log.debug("cannot reset VmHWM; the CPU peak is the process's high-water mark since start")
    return _rss_bytes("VmRSS") or 0


def peak_memory(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    hwm = _rss_bytes("VmHWM")
    if hwm is None:
        import resource

        hwm = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return hwm


# ----------------------------------------------------------------------------- timing loop
class _Generator:
    """Prefill + greedy decode over a static (or dynamic) KV cache, one timed region per step."""

    def __init__(self, model: nn.Module, max_len: int, compile: bool, cache: str = "static") -> None:
        self.model, self.max_len, self.device = model, max_len, model_device(model)
        self.cache_kind = cache
        self.cache = self._static_cache() if cache == "static" else None
        self.compiled = compile
        forward = self._forward
        self.prefill_fn, self.decode_fn = forward, forward
        if compile:
            # every generator compiles the same ``_forward`` code object (prefill and decode shapes,
            # per model): past dynamo's recompile limit it would silently fall back to eager
            limit = torch._dynamo.config.recompile_limit
            torch._dynamo.config.recompile_limit = max(limit, 64)
            cuda = self.device.type == "cuda"
            # CUDA graphs (reduce-overhead) for the decode step, where launch overhead dominates
            self.decode_fn = torch.compile(forward, mode="reduce-overhead" if cuda else "default")
            self.prefill_fn = torch.compile(forward, dynamic=False)

    def _static_cache(self):
        from transformers import StaticCache

        return StaticCache(config=self.model.config, max_cache_len=self.max_len)

    def _forward(self, ids: torch.Tensor, cache_position: torch.Tensor, past) -> tuple[torch.Tensor, object]:
        out = self.model(ids, cache=past, cache_position=cache_position, use_cache=True)
        return out.logits[:, -1].argmax(-1, keepdim=True), out.cache

    def _mark_step(self) -> None:
        if self.compiled and self.device.type == "cuda":
            torch.compiler.cudagraph_mark_step_begin()

    @torch.no_grad()
    def run(self, input_ids: torch.Tensor, new_tokens: int) -> tuple[float, list[float], torch.Tensor]:
        """One generation: (TTFT ms, decode step ms list, generated tokens [B, new_tokens])."""
        prompt_len = input_ids.shape[1]
        past = self.cache
        if past is not None:
            past.reset()
        self._mark_step()
        with RegionTimer(self.device) as t:
            pos = torch.arange(prompt_len, device=self.device)
            tok, past = self.prefill_fn(input_ids, pos, past)
        ttft = t.elapsed_ms
        steps, tokens = [], [tok]
        for i in range(new_tokens - 1):
            self._mark_step()
            with RegionTimer(self.device) as t:
                pos = torch.tensor([prompt_len + i], device=self.device)
                tok, past = self.decode_fn(tok, pos, past if self.cache is None else self.cache)
                tok = tok.clone()  # a CUDA-graph output is overwritten by the next replay
            steps.append(t.elapsed_ms)
            tokens.append(tok)
        return ttft, steps, torch.cat(tokens, dim=1)


def time_generation(
    model: nn.Module,
    input_ids: torch.Tensor,
    new_tokens: int,
    compile: bool = False,
    warmup: int = 1,
    repeats: int = 3,
    cache: str = "static",
) -> dict:
    """TTFT and TPOT of greedy generation (medians over ``repeats`` after ``warmup`` untimed runs)."""
    if new_tokens < 2:
        raise ValueError(f"TPOT needs at least 2 new tokens (one decode step), got {new_tokens}")
    device = model_device(model)
    input_ids = input_ids.to(device)
    max_len = input_ids.shape[1] + new_tokens
    notes = []
    try:
        gen = _Generator(model, max_len, compile, cache)
        start = time.perf_counter()
        for _ in range(warmup):
            gen.run(input_ids, new_tokens)
    except (TypeError, ValueError, RuntimeError, ImportError, AttributeError) as exc:
        if cache != "static":
            raise
        notes.append(f"static KV cache failed ({type(exc).__name__}: {exc}); used the dynamic cache")
        log.warning(notes[-1])
        gen = _Generator(model, max_len, compile, "dynamic")
        start = time.perf_counter()
        for _ in range(warmup):
            gen.run(input_ids, new_tokens)
    warmup_s = time.perf_counter() - start
    in_use = reset_peak_memory(device)
    ttfts, tpots, all_steps = [], [], []
    for _ in range(repeats):
        ttft, steps, _ = gen.run(input_ids, new_tokens)
        ttfts.append(ttft)
        tpots.append(sum(steps) / len(steps))
        all_steps.extend(steps)
    peak = peak_memory(device)
    _, ttft_p20, ttft_p80 = quantiles(ttfts)
    _, step_p20, step_p80 = quantiles(all_steps)
    return {
        "ttft_ms": statistics.median(ttfts),
        "ttft_p20_ms": ttft_p20,
        "ttft_p80_ms": ttft_p80,
        "tpot_ms": statistics.median(tpots),
        "tpot_p20_ms": step_p20,
        "tpot_p80_ms": step_p80,
        "peak_bytes": peak,
        "peak_over_start_bytes": max(0, peak - in_use),
        "warmup_s": warmup_s,
        "cache": gen.cache_kind,
        "notes": notes,
    }


def time_generation_interleaved(
    models: dict[str, nn.Module],
    input_ids: torch.Tensor,
    new_tokens: int,
    rounds: int = 5,
    warmup: int = 1,
    cache: str = "static",
    show_progress: bool = True,
    compile: bool | dict[str, bool] = False,
) -> dict[str, dict]:
    """TTFT and TPOT of several models measured in rounds: each round runs one generation of every
    model in turn, so drift of the machine (clock, other load) hits all of them alike.
    ``compile``: torch.compile every model, or those named True in a dict (the compile happens in
    the untimed warmup).

    Returns {name: {ttft_ms, ttft_p20_ms, ttft_p80_ms, tpot_ms, tpot_p20_ms, tpot_p80_ms, rounds}}:
    medians over rounds and the 20th / 80th percentiles (TPOT spread over the per-round means).
    """
    from tqdm.auto import tqdm

    if new_tokens < 2:
        raise ValueError(f"TPOT needs at least 2 new tokens (one decode step), got {new_tokens}")
    max_len = input_ids.shape[1] + new_tokens
    gens = {}
    for name, model in models.items():
        compiled = compile.get(name, False) if isinstance(compile, dict) else compile
        try:
            gens[name] = _Generator(model, max_len, compiled, cache)
            for _ in range(max(warmup, 2 if compiled else 0)):
                gens[name].run(input_ids.to(model_device(model)), new_tokens)
        except (TypeError, ValueError, RuntimeError, AttributeError):
            if cache != "static":
                raise
            gens[name] = _Generator(model, max_len, compiled, "dynamic")
            for _ in range(max(warmup, 2 if compiled else 0)):
                gens[name].run(input_ids.to(model_device(model)), new_tokens)
    samples: dict[str, tuple[list[float], list[float]]] = {name: ([], []) for name in models}
    for _ in tqdm(range(rounds), desc="interleaved generation rounds", disable=not show_progress):
        for name, gen in gens.items():
            ttft, steps, _ = gen.run(input_ids.to(gen.device), new_tokens)
            samples[name][0].append(ttft)
            samples[name][1].append(sum(steps) / len(steps))
    out = {}
    for name, (ttfts, tpots) in samples.items():
        t_med, t20, t80 = quantiles(ttfts)
        p_med, p20, p80 = quantiles(tpots)
        out[name] = {
            "ttft_ms": t_med,
            "ttft_p20_ms": t20,
            "ttft_p80_ms": t80,
            "tpot_ms": p_med,
            "tpot_p20_ms": p20,
            "tpot_p80_ms": p80,
            "rounds": rounds,
            "cache": gens[name].cache_kind,
            "compiled": gens[name].compiled,
        }
    return out


# ----------------------------------------------------------------------------- variants
def check_cpu_rule_twins(wanted: bool, device: torch.device | str, table: str | None = None) -> None:
    """``cpu_rule_twins`` only means something on the CPU: elsewhere a twin would be a plain copy;
    ``table`` ('measure' or a table file) decides the twins, so it needs them."""
    if wanted and torch.device(device).type != "cpu":
        raise ValueError(
            f"--cpu-rule-twins compares SparseLinear's CPU rule, but the model runs on {device}; "
            "drop the option, or run with --device cpu"
        )
    if table is not None and not wanted:
        raise ValueError("--cpu-rule-table decides the rule's twins: add --cpu-rule-twins, or drop it")
    if table not in (None, "measure"):
        from sparsekit.nn.cpu_rule_table import check_table

        check_table(table)  # a missing, invalid or other machine's file fails here, before the model loads


def _decide_twins(twins: dict[str, nn.Module], table: str | None, rows: tuple[int, ...]) -> dict:
    """Pin the rule twins' decisions before timing: from the table file ``table``, or ('measure')
    timed in each twin's own forward at the M classes of ``rows`` (prefill and decode). Returns
    {twin: its measured entries} ('measure'), {'table': path} (a file) or {} (None: first call)."""
    if table is None:
        return {}
    if table != "measure":
        from sparsekit.nn.cpu_rule_table import load_table

        load_table(table)
        return {"table": table}
    from sparsekit.bench.rule_table import measure_rule_table

    classes = tuple(sorted({cpu_rule.m_class(r) for r in rows if r >= cpu_rule.MIN_M}))
    measured = {}
    for name, twin in twins.items():
        log.info("e2e: measuring %s's rule table at M %s", name, classes)
        measured[name] = measure_rule_table(twin, classes, show_progress=False).entries if classes else []
    return measured


def has_sparse_layers(model: nn.Module) -> bool:
    from sparsekit.nn import SparseLinear

    return any(isinstance(m, SparseLinear) for m in model.modules())


def pruned_copy(
    model: nn.Module,
    pattern: str = "2:4",
    method: str = "magnitude",
    calib_ids: torch.Tensor | None = None,
) -> tuple[nn.Module, dict]:
    """A deep copy pruned in place by ``method`` at ``pattern`` (zeros in plain linears).
    Wanda and SparseGPT need ``calib_ids`` [nsamples, seqlen]."""
    from sparsekit.api import prune

    if method != "magnitude" and calib_ids is None:
        raise ValueError(f"method {method!r} needs calib_ids [nsamples, seqlen]; or use method='magnitude'")
    pruned = copy.deepcopy(model)
    calib = {} if method == "magnitude" else {"calib": calib_ids}
    report = prune(pruned, method=method, sparsity=pattern, show_progress=False, **calib)
    return pruned.eval(), {"method": method, "pruned_sparsity": report.overall_sparsity}


def sparsified_copy(
    model: nn.Module,
    pattern: str = "2:4",
    pruned: bool = False,
    method: str = "magnitude",
    calib_ids: torch.Tensor | None = None,
) -> tuple[nn.Module, dict]:
    """A deep copy pruned by ``method`` at ``pattern`` (unless ``pruned``: the weights already carry
    their zeros), then ``sparsify``'d."""
    from sparsekit.nn import sparsify

    sparse, info = (copy.deepcopy(model), {}) if pruned else pruned_copy(model, pattern, method, calib_ids)
    info.update(sparsify(sparse, format="auto").to_dict())
    return sparse.eval(), info


def densified_copy(model: nn.Module) -> nn.Module:
    """A copy of a model with SparseLinear layers turned back into nn.Linear (zeros kept)."""
    from sparsekit.nn import densify

    dense = copy.deepcopy(model)
    densify(dense)
    return dense.eval()


def prompt_ids(tokenizer, batch: int, prompt_len: int, corpus: str = "dolly") -> tuple[torch.Tensor, str]:
    """[batch, prompt_len] prompts from ``corpus`` (dolly-15k), or the offline corpus when unreachable."""
    from sparsekit.hf.data import DEFAULT_CORPUS, calibration_ids

    try:
        return calibration_ids(tokenizer, corpus, batch, prompt_len, seed=1), corpus
    except (ConnectionError, ImportError) as exc:
        log.info("prompts: %s unavailable (%s); using %s", corpus, str(exc).split(";")[0], DEFAULT_CORPUS)
        return calibration_ids(tokenizer, DEFAULT_CORPUS, batch, prompt_len, seed=1), DEFAULT_CORPUS


def _dtype_name(dtype: torch.dtype) -> str:
    """torch.bfloat16 -> 'bf16' (the short names rows and labels use)."""
    return {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}.get(dtype, str(dtype))


def input_table_bytes(model: nn.Module) -> int:
    """Bytes of the input embedding table when it is not also the output head's weight (a decode step
    reads one row of it, not the table); 0 for a tied head or a model without one."""
    anatomy = describe(model)
    if anatomy.embedding is None or anatomy.tied:
        return 0
    weight = getattr(model.get_submodule(anatomy.embedding), "weight", None)
    return weight.numel() * weight.element_size() if isinstance(weight, torch.Tensor) else 0


def _cast(model: nn.Module, dtype: torch.dtype) -> nn.Module:
    return model if next(model.parameters()).dtype == dtype else copy.deepcopy(model).to(dtype)


def check_quantize(formats: tuple[str, ...]) -> tuple[str, ...]:
    """Validate ``quantize`` names before any model is built."""
    from sparsekit.nn.sparsify import check_quant_format

    return tuple(check_quant_format(f) for f in formats)


def _quantized(model: nn.Module, fmt: str, head: bool = False) -> tuple[nn.Module, dict]:
    """A quantized copy of ``model`` (``sparsekit.nn.quantize``; lm_head too with ``head``), what was done."""
    from sparsekit.nn import quantize

    out = copy.deepcopy(model)
    return out.eval(), quantize(out, fmt, head=head)


def _e2e_variants(
    model, dtypes, pattern, pruned, method, calib_ids, quantize=(), quantize_head=False
) -> dict[str, tuple]:
    """{label: (model, sparsify info, is_dense)}: dense and sparse in every dtype, the dense one
    under each of ``quantize``, and the sparse one under int8 (its 2:4 layers: 2:4-int8); with
    ``quantize_head`` each of those again with its lm_head quantized too ("+ int8 (head too)").

    A model that already holds SparseLinear layers (a sparsekit checkpoint) is the sparse variant
    and its densified copy the dense one; otherwise the sparse variant is pruned once (in the
    model's own dtype) and sparsified from a copy cast to each dtype.
    """
    from sparsekit.nn import sparsify

    if has_sparse_layers(model):
        dense_base, zeros, info, label = densified_copy(model), None, {}, "sparse (checkpoint)"
    elif pruned:
        dense_base, zeros, info, label = model, model, {}, f"sparse ({pattern}, as given)"
    else:
        dense_base = model
        zeros, info = pruned_copy(model, pattern, method, calib_ids)
        label = f"sparse ({pattern}, {method})"
    out = {}
    for dtype in dtypes:
        tag = "" if len(dtypes) == 1 else f" {_dtype_name(dtype)}"
        if zeros is None:
            sparse, layers = _cast(model, dtype), info
        else:
            sparse = copy.deepcopy(zeros).to(dtype)
            layers = {**info, **sparsify(sparse, format="auto").to_dict()}
        out[f"dense{tag}"] = (_cast(dense_base, dtype).eval(), {}, True)
        out[f"{label}{tag}"] = (sparse.eval(), layers, False)
        heads = (False, True) if quantize_head else (False,)
        for fmt in quantize:
            for head in heads:
                suffix = f" + {fmt}{' (head too)' if head else ''}{tag}"
                out[f"dense{suffix}"] = (*_quantized(out[f"dense{tag}"][0], fmt, head), False)
                if fmt == "int8":  # int4's zero points would fill the pruned zeros in (quantize refuses)
                    out[f"{label}{suffix}"] = (*_quantized(sparse, fmt, head), False)
    return out


def run_e2e(
    model: nn.Module,
    tokenizer=None,
    prompt_len: int = 128,
    new_tokens: int = 32,
    batch: int = 1,
    pattern: str = "2:4",
    pruned: bool = False,
    compile: bool = False,
    input_ids: torch.Tensor | None = None,
    eval_ids: torch.Tensor | None = None,
    eval_tokens: int = 2048,
    eval_seqlen: int = 512,
    corpus: str = "dolly",
    warmup: int = 1,
    repeats: int = 5,
    cache: str = "static",
    model_label: str = "model",
    method: str = "wanda",
    calib_ids: torch.Tensor | None = None,
    dtypes: tuple[torch.dtype, ...] | None = None,
    show_progress: bool = True,
    quantize: tuple[str, ...] = (),
    cpu_rule_twins: bool = False,
    cpu_rule_table: str | None = None,
    quantize_head: bool = False,
) -> E2EResult:
    """Dense vs sparsified generation speed, memory and perplexity of ``model`` (left unchanged).

    Variants: dense and sparse in each of ``dtypes`` (default: the model's), eager, plus their
    torch.compile'd twins with ``compile``. The sparse variant of a dense model is a copy pruned by
    ``method`` ('wanda' by default, calibrated on 8 x 256 tokens of the offline corpus; 'magnitude'
    needs no data) at ``pattern`` and swapped to SparseLinear; a sparsekit checkpoint is the sparse
    variant itself. All variants' generations are interleaved in ``repeats`` rounds (after
    ``warmup`` untimed ones); speedups are against the best dense variant of the same dtype
    (eager or compiled), and ``floor_ms`` is the bytes a step streams (model bytes less an input
    embedding that is not the head) over the measured read bandwidth.
    ``input_ids`` [batch, prompt_len] and ``eval_ids`` [1, T] replace the corpus text (needed
    when there is no tokenizer). ``quantize`` ('int8', 'int4', ...) adds, per dtype, the dense
    model weight-only quantized, and with int8 the sparse one too (its 2:4 layers: 2:4-int8);
    ``quantize_head`` adds a twin of each with its lm_head quantized too (untied from the float
    input embedding: ``sparsekit.nn.quantize_head``).
    ``cpu_rule_twins`` adds a copy of every variant with SparseLinear layers under
    ``cpu_rule='fastest'`` ("..., rule fastest"): dense on a kept copy where it measured faster,
    from 2 rows up; its MiB include the dense copies it ends up holding. ``cpu_rule_table``
    decides the twins before timing instead of on their first calls: 'measure' times each twin's
    layers in its own forward at this run's prefill and decode M classes
    (``sparsekit.bench.rule_table``), a path loads a table that ``sparsekit bench rule-table``
    wrote; the twins are then named "..., rule table".
    """
    quantize = check_quantize(tuple(quantize))
    if quantize_head and not quantize:
        raise ValueError(
            "quantize_head quantizes the quantized variants' lm_head: give quantize too (e.g. int8)"
        )
    check_cpu_rule_twins(cpu_rule_twins, model_device(model), cpu_rule_table)
    from sparsekit.bench.roofline import measure_roofline
    from sparsekit.eval.perplexity import perplexity_of_ids
    from sparsekit.hf.data import DEFAULT_CORPUS, calibration_ids, evaluation_ids

    device = model_device(model)
    env = environment()
    notes: list[str] = []
    prompt_source = "input_ids"
    if input_ids is None:
        if tokenizer is None:
            raise ValueError("run_e2e needs a tokenizer or input_ids [batch, prompt_len]")
        input_ids, prompt_source = prompt_ids(tokenizer, batch, prompt_len, corpus)
    batch, prompt_len = input_ids.shape
    if eval_ids is None and tokenizer is not None and eval_tokens > 0:
        eval_ids = evaluation_ids(tokenizer, DEFAULT_CORPUS, max_tokens=eval_tokens)
    seqlen = min(eval_seqlen, eval_ids.shape[1]) if eval_ids is not None else eval_seqlen
    needs_calib = not pruned and not has_sparse_layers(model) and method != "magnitude"
    if needs_calib and calib_ids is None:
        if tokenizer is None:
            notes.append(f"no tokenizer to calibrate {method}: pruned with magnitude")
            method = "magnitude"
        else:
            calib_ids = calibration_ids(tokenizer, DEFAULT_CORPUS, 8, 256, seed=0)
    dtypes = tuple(dtypes or (next(model.parameters()).dtype,))

    log.info("e2e: building variants (%s, %s)", method, ", ".join(_dtype_name(d) for d in dtypes))
    built = _e2e_variants(model, dtypes, pattern, pruned, method, calib_ids, quantize, quantize_head)
    twins: dict[str, nn.Module] = {}
    if cpu_rule_twins:
        suffix = "rule table" if cpu_rule_table else "rule fastest"
        for name, (variant, info, extra) in list(built.items()):
            if has_sparse_layers(variant):
                twin = copy.deepcopy(variant)
                cpu_rule.apply(twin, "fastest")
                built[f"{name}, {suffix}"] = (twin, info, extra)
                twins[f"{name}, {suffix}"] = twin
    for variant, _, _ in built.values():
        variant.to(device)
    rule_tables = _decide_twins(twins, cpu_rule_table, (batch * prompt_len, batch))
    timed = {name: m for name, (m, _, _) in built.items()}
    flags = dict.fromkeys(timed, False)
    if compile:
        for name, (m, _, _) in list(built.items()):
            timed[f"{name}, compiled"] = m
            flags[f"{name}, compiled"] = True
    log.info("e2e: timing %d variants in %d interleaved rounds", len(timed), repeats)
    timings = time_generation_interleaved(
        timed, input_ids, new_tokens, repeats, warmup, cache, show_progress, compile=flags
    )
    read_gbps = measure_roofline(str(device), torch.float32).read_gbps
    rows = []
    for name, variant in timed.items():
        base = name.removesuffix(", compiled")
        _, info, _ = built[base]
        timing = timings[name]
        in_use = reset_peak_memory(device)
        gen = _Generator(variant, prompt_len + new_tokens, False, timing["cache"])
        gen.run(input_ids.to(device), new_tokens)
        peak = peak_memory(device)
        ppl = None
        if eval_ids is not None and not flags[name]:
            ppl = perplexity_of_ids(variant, eval_ids, seqlen).ppl
        elif eval_ids is not None:
            ppl = next((r.ppl for r in rows if r.variant == base), None)
        nbytes = model_bytes(variant) + cpu_rule.dense_copy_bytes(variant)  # a rule's dense copies
        step_bytes = nbytes - input_table_bytes(variant)
        rows.append(
            E2ERow(
                variant=name,
                ttft_ms=timing["ttft_ms"],
                ttft_p20_ms=timing["ttft_p20_ms"],
                ttft_p80_ms=timing["ttft_p80_ms"],
                tpot_ms=timing["tpot_ms"],
                tpot_p20_ms=timing["tpot_p20_ms"],
                tpot_p80_ms=timing["tpot_p80_ms"],
                prefill_tok_s=batch * prompt_len / (timing["ttft_ms"] * 1e-3),
                decode_tok_s=batch / (timing["tpot_ms"] * 1e-3),
                model_bytes=nbytes,
                decode_gbps=step_bytes / (timing["tpot_ms"] * 1e-3) / 1e9,
                peak_bytes=peak,
                peak_over_start_bytes=max(0, peak - in_use),
                ppl=ppl,
                cache=timing["cache"],
                compiled=flags[name],
                dtype=_dtype_name(next(variant.parameters()).dtype),
                floor_ms=step_bytes / (read_gbps * 1e9) * 1e3,
                step_bytes=step_bytes,
                sparsify=info,
                notes=list(notes),
                env={k: env[k] for k in ("device", "torch", "commit", "time_utc") if k in env},
            )
        )
    for row in rows:
        dense = [r for r in rows if r.dtype == row.dtype and built[r.variant.removesuffix(", compiled")][2]]
        row.decode_speedup = min(r.tpot_ms for r in dense) / row.tpot_ms
        row.prefill_speedup = min(r.ttft_ms for r in dense) / row.ttft_ms
        log.info(
            "e2e: %s: TTFT %.1f ms, TPOT %.2f ms (%.2fx dense), %.1f MB, ppl %s",
            row.variant,
            row.ttft_ms,
            row.tpot_ms,
            row.decode_speedup,
            row.model_bytes / 1e6,
            f"{row.ppl:.2f}" if row.ppl is not None else "-",
        )
    config = {
        "model": model_label,
        "device": str(device),
        "dtype": ",".join(_dtype_name(d) for d in dtypes),
        "batch": batch,
        "prompt_len": prompt_len,
        "new_tokens": new_tokens,
        "pattern": pattern,
        "method": method if not pruned and not has_sparse_layers(model) else "as given",
        "pruned_input": pruned,
        "compile": compile,
        "quantize": list(quantize),
        "quantize_head": quantize_head,
        "cpu_isa": _cpu_isa(device),  # the C++ kernels' ISA level (SPARSEKIT_CPU_ISA or the CPU's best)
        "cpu_rule_default": cpu_rule.default_rule(),  # what the variants' layers run (SPARSEKIT_CPU_RULE)
        "cpu_rule_twins": cpu_rule_twins,
        "cpu_rule_table": cpu_rule_table,
        "cpu_rule_tables": rule_tables,
        "prompts": prompt_source,
        "warmup": warmup,
        "repeats": repeats,
        "read_gbps": read_gbps,
        "eval_tokens": int(eval_ids.shape[1]) if eval_ids is not None else 0,
        "eval_seqlen": seqlen,
        "timer": (
            "device-synchronized wall time per region; every variant's generations interleaved in "
            "rounds; TPOT = mean decode-step time, prefill excluded"
        ),
    }
    return E2EResult(env, config, rows)


def _cpu_isa(device: torch.device | str) -> str | None:
    """The ISA level the CPU kernels ran at (None off the CPU or without the C++ extension)."""
    from sparsekit.kernels import cpu_ext

    if torch.device(device).type != "cpu" or cpu_ext.extension() is None:
        return None
    return cpu_ext.resolve_isa(None).value


# ----------------------------------------------------------------------------- reports
def e2e_markdown(result: E2EResult) -> str:
    cfg, env = result.config, result.env
    lines = [
        f"{cfg['model']} on {env.get('device')} ({env.get('cpu')}, {env.get('cpu_threads')} threads"
        + (f", CPU kernels at {cfg['cpu_isa']}" if cfg.get("cpu_isa") else "")
        + "), "
        f"{cfg['dtype']}, batch {cfg['batch']}, prompt {cfg['prompt_len']} tokens ({cfg['prompts']}), "
        f"{cfg['new_tokens']} new tokens, {cfg['repeats']} interleaved rounds after {cfg['warmup']} untimed; "
        f"sparse variant: {cfg.get('method', '?')} {cfg['pattern']}; torch {env.get('torch')}, commit "
        f"{env.get('commit')}, {env.get('time_utc')}.",
        "",
        "| variant | TTFT ms (p20..p80) | TPOT ms (p20..p80) | decode x | prefill x | model MB | floor ms | "
        "TPOT / floor | peak MB (+ over start) | ppl |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in result.rows:
        ppl = f"{r.ppl:.2f}" if r.ppl is not None else "-"
        lines.append(
            f"| {r.variant} | {r.ttft_ms:.1f} ({r.ttft_p20_ms:.1f}..{r.ttft_p80_ms:.1f}) | "
            f"{r.tpot_ms:.2f} ({r.tpot_p20_ms:.2f}..{r.tpot_p80_ms:.2f}) | {r.decode_speedup:.2f} | "
            f"{r.prefill_speedup:.2f} | {r.model_bytes / 1e6:.1f} | {r.floor_ms:.2f} | "
            f"{r.tpot_ms / r.floor_ms:.2f}x | {r.peak_bytes / 1e6:.0f} "
            f"(+{r.peak_over_start_bytes / 1e6:.0f}) | {ppl} |"
        )
    peak_kind = (
        "CUDA max allocated"
        if cfg["device"].startswith("cuda")
        else "process RSS high-water mark (on the CPU every variant is resident, so this is the "
        "process's peak, not the variant's: bench/sparse_memory.py measures one model at a time)"
    )
    lines += [
        "",
        "decode x / prefill x: the best dense variant of the same dtype (eager or compiled) over this "
        "one. floor: the bytes a decode step streams (model bytes less an input embedding that is not the "
        "head: a step reads one row of it) / the measured read bandwidth "
        f"({cfg.get('read_gbps', float('nan')):.1f} GB/s), the fastest a decode step can stream the weights; "
        "TPOT / floor says how much of a step "
        f"is not bytes. Peak memory: {peak_kind} during one generation of that variant (+ the rise over "
        f"what was resident before it); perplexity on {cfg['eval_tokens']} held-out tokens in windows of "
        f"{cfg['eval_seqlen']}.",
    ]
    notes = sorted(
        {n for r in result.rows for n in r.notes}
        | ({cfg["threads_note"]} if cfg.get("threads_note") else set())
    )
    if notes:
        lines.append("Notes: " + "; ".join(notes))
    return "\n".join(lines) + "\n"


def write_e2e_report(result: E2EResult, out: str | Path, stem: str = "e2e") -> dict[str, Path]:
    """Write ``<stem>.json``, ``<stem>.md`` and ``<stem>.png`` (TTFT/TPOT bars) to ``out``."""
    from sparsekit.bench.plots import plot_e2e, write_report

    rows = [asdict(r) for r in result.rows]
    plot = lambda path: plot_e2e(rows, path, title=result.config["model"])
    return write_report(out, stem, result.to_dict(), e2e_markdown(result), plot)
