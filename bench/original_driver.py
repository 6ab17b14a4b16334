"""Run one prune with the papers' original code (locuslab/wanda, luuyin/OWL, CASIA-IVA-Lab/FLAP,
icip-cas/ShortGPT) on a local checkout.

Called by ``bench/vs_llmcompressor.py --original`` in a subprocess of sparsekit's own venv, so the
compatibility shims below never touch the process that runs sparsekit. The original code is
imported from ``--code`` (a git checkout the caller fetched); nothing of it is vendored here.

    python bench/original_driver.py --code CHECKOUT --impl wanda --model DIR --calib calib.pt \
        --method sparsegpt --sparsity 2:4 --out pruned.safetensors --report result.json

``--impl wanda``: ``lib.prune.prune_wanda`` / ``prune_sparsegpt`` of locuslab/wanda;
``--impl owl``: ``lib.prune_all.prune_wanda_outlier`` / ``prune_sparsegpt_outlier`` of luuyin/OWL
(``--method wanda+owl`` / ``sparsegpt+owl``, M ``--owl-m`` and lambda ``--owl-lamda``);
``--impl shortgpt``: the ``ShortGPT`` class of icip-cas/ShortGPT (the authors' lab; its
``shortgpt/shortgpt.py``, ``--method shortgpt``, ``--sparsity`` the share of decoder blocks, rounded
to a block count as its ``n_prune_layers``) run as its ``run_shortgpt.py`` does: ``eval_importance``
on each calibration window (a batch of one, ``stride`` the window length, no generation), then
``remove_layers`` and the renumbered ``layer_idx``; the report lists the removed blocks;
``--impl flap``: ``lib.prune.prune_flap`` (``--method flap``: its defaults, WIFV scores, the AL-AM
adaptive structure, bias compensation) / ``prune_wanda_sp`` (``--method wanda-sp``) of
CASIA-IVA-Lab/FLAP, ``--sparsity`` its pruning ratio. The calibration windows are the caller's ids
(the code's own C4 / WikiText loader is replaced); everything else is the original functions as
written. Shims, each for an API the 2023 code predates:

- transformers 5 decoder layers take ``position_embeddings`` (cos, sin) from the model's rotary
  module instead of computing them; a forward pre-hook on each decoder layer computes them from
  the ``position_ids`` the original code passes (transformers' own call already has them).
- ``model.hf_device_map`` (set by accelerate's ``device_map=``) is read unconditionally: an empty
  map, the single-device case; ``model.seqlen``: the calibration window length.
- ``torch.cuda.synchronize`` is a no-op where torch has no CUDA (the SparseGPT class calls it
  for its timer).

ShortGPT's shims: its ``__init__`` (a hub download in fp16 with ``device_map="auto"``) is replaced
by setting the attributes it sets (``model``, ``layers`` at ``model.layers``, ``n_prune_layers``,
``importances``) on the fp32 model; its tokenizer by one that returns the calibration window as
``input_ids`` (attention mask all ones), in a tensor type whose ``.to("cuda")`` stays on the CPU
(the class moves its inputs to "cuda" unconditionally). transformers' last hidden state is the final
norm's output, as in the 2024 transformers the code ran on, so the last block's influence compares
its input with the normed output, as the authors' code does.

FLAP's code runs its own LLaMA-1 modeling file (``models/hf_llama``, biases on o_proj and
down_proj, head_dim fixed at 128), so ``--impl flap`` builds that model from ``--model``'s weights,
which must be multi-head with 128-channel heads (``bench/mha_head128.py`` re-expresses SmolLM2
so). Its shims:
- the model is built from the config and loaded from the safetensors with the two biases zero, as
  its ``get_llm`` does, in fp32 (its ``get_llm`` loads fp16 for a GPU);
- its rotary module is rebuilt with the config's ``rope_theta`` (the file fixes base 10000; it
  takes the base as an argument), and the built model must give the transformers model's logits
  (relative 1e-4) before the prune starts;
- ``Tensor.cuda()`` returns the tensor where torch has no CUDA (it sorts scores on the GPU);
- its mean inputs, stored in fp16, are cast back to the weight's dtype where ``compress`` multiplies
  them with the weight (fp16 @ fp32 is an error on the CPU; the fp16 rounding is kept);
- ``unstr=True``, the code's own mask-only mode (its scripts pass ``--unstr``): cut heads and
  channels are zeroed in place, and the compensation goes to the biases; the shapes stay, so the
  caller can load the result. ``prune_wanda_sp`` asks for 128 C4 windows and reads ``nsamples`` of
  them: it gets the caller's windows and reads all of them.
"""

from __future__ import annotations

import contextlib
import importlib
import os
import subprocess
import sys
import time
from types import SimpleNamespace

ENTRY = {  # (impl, method) -> (module, entry point)
    ("shortgpt", "shortgpt"): ("shortgpt", "ShortGPT"),
    ("wanda", "wanda"): ("lib.prune", "prune_wanda"),
    ("wanda", "sparsegpt"): ("lib.prune", "prune_sparsegpt"),
    ("owl", "wanda+owl"): ("lib.prune_all", "prune_wanda_outlier"),
    ("owl", "sparsegpt+owl"): ("lib.prune_all", "prune_sparsegpt_outlier"),
    ("flap", "flap"): ("lib.prune", "prune_flap"),
    ("flap", "wanda-sp"): ("lib.prune", "prune_wanda_sp"),
}


def _pattern(sparsity: str) -> tuple[float, int, int]:
    """'0.5' -> (0.5, 0, 0); '2:4' -> (0.5, 2, 4): the original code's (ratio, prune_n, prune_m)."""
    if ":" in sparsity:
        n, m = (int(v) for v in sparsity.split(":"))
        return 1 - n / m, n, m
    return float(sparsity), 0, 0


def _rope_hook(rotary):
    """A forward pre-hook adding ``position_embeddings`` from ``position_ids`` when the call lacks it."""
    import torch

    def hook(module, args, kwargs):
        if kwargs.get("position_embeddings") is not None:
            return None
        hidden = args[0] if args else kwargs["hidden_states"]
        positions = kwargs.get("position_ids")
        if positions is None:
            positions = torch.arange(hidden.shape[1], device=hidden.device).unsqueeze(0)
        kwargs["position_embeddings"] = rotary(hidden, position_ids=positions)
        return args, kwargs

    return hook


def _calibration_loader(ids, all_windows: bool = False):
    """The original ``get_loaders`` replaced: (list of (input [1, L], target [1, L]), None).
    ``all_windows``: every window of ``ids`` whatever the count asked for (FLAP's ``prune_wanda_sp``
    asks for 128 and reads its ``nsamples``)."""

    def get_loaders(name, nsamples=128, seed=0, seqlen=2048, tokenizer=None):
        if all_windows:
            nsamples = ids.shape[0]
        if nsamples > ids.shape[0]:
            raise SystemExit(f"the original code asked for {nsamples} windows; the file has {ids.shape[0]}")
        windows = []
        for row in ids[:nsamples]:
            target = row.unsqueeze(0).clone()
            target[:, :-1] = -100
            windows.append((row.unsqueeze(0), target))
        return windows, None

    return get_loaders


def _window_tokenizer(ids):
    """ShortGPT's tokenizer replaced: its prompts are window indices into ``ids`` [n, L]; the ids come
    back in a tensor type whose ``.to("cuda")`` returns a plain CPU tensor."""
    import torch

    class HostTensor(torch.Tensor):
        def to(self, *args, **kwargs):
            if args and str(args[0]).startswith("cuda"):
                return self.as_subclass(torch.Tensor)
            return super().to(*args, **kwargs)

    def tokenize(prompts, **kwargs):
        rows = ids[list(prompts)]
        mask = torch.ones_like(rows)
        return SimpleNamespace(
            input_ids=rows.as_subclass(HostTensor), attention_mask=mask.as_subclass(HostTensor)
        )

    return tokenize


def _run_shortgpt(module, model, ids, sparsity: str) -> list[int]:
    """The authors' ShortGPT on ``model`` over the windows of ``ids``, as its ``run_shortgpt.py``
    drives it -> the removed block indices (the model's blocks are deleted in place)."""
    fraction = float(sparsity)
    layers = model.model.layers
    short = object.__new__(module.ShortGPT)  # its __init__ loads a hub model in fp16 on a GPU
    short.model, short.layers, short.tokenizer = model, layers, _window_tokenizer(ids)
    short.n_prune_layers = round(fraction * len(layers))
    short.importances = [0 for _ in layers]
    for index in range(ids.shape[0]):
        short.eval_importance(prompts=[index], stride=ids.shape[1], max_gen_len=0)
    removed = short.remove_layers()
    for layer_idx, layer in enumerate(short.layers):
        layer.self_attn.layer_idx = layer_idx
    return sorted(removed)


def _flap_model(model_dir: str, window):
    """FLAP's own LlamaForCausalLM (its ``models/hf_llama``, importable from the checkout) holding
    the weights in ``model_dir``, checked against the transformers model on ``window`` [1, L]."""
    import torch
    from safetensors.torch import load_file
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(model_dir)
    if config.num_key_value_heads != config.num_attention_heads or config.head_dim != 128:
        raise SystemExit(
            f"FLAP's code needs multi-head attention with head_dim 128; {model_dir} has "
            f"{config.num_attention_heads} query / {config.num_key_value_heads} KV heads of "
            f"{config.head_dim}: re-express it with bench/mha_head128.py"
        )
    from models.hf_llama.modeling_llama import LlamaForCausalLM, LlamaRotaryEmbedding

    model = LlamaForCausalLM(config)
    state = load_file(os.path.join(model_dir, "model.safetensors"))
    missing, unexpected = model.load_state_dict(state, strict=False)
    rebuilt = [m for m in missing if m.endswith(("o_proj.bias", "down_proj.bias", "rotary_emb.inv_freq"))]
    if unexpected or set(missing) - set(rebuilt) - {"lm_head.weight"}:
        raise SystemExit(f"the weights do not fit FLAP's model: {unexpected[:3]} {missing[:3]}")
    if "lm_head.weight" in missing:
        model.lm_head.weight = model.model.embed_tokens.weight
    theta = config.rope_parameters["rope_theta"]
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.o_proj.bias.zero_()
            layer.mlp.down_proj.bias.zero_()
            layer.self_attn.rotary_emb = LlamaRotaryEmbedding(
                128, max_position_embeddings=config.max_position_embeddings, base=theta
            )
        model.eval()
        reference = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
        ours, theirs = model(window).logits, reference(window).logits
    gap = float((ours - theirs).abs().max() / theirs.abs().max())
    if gap > 1e-4:
        raise SystemExit(
            f"FLAP's model built from {model_dir} differs from transformers' by {gap:.1e} (relative)"
        )
    return model


def _flap_shims(module) -> None:
    """``Tensor.cuda`` a no-op without CUDA; ``compress`` given its fp16 mean inputs in the weight's dtype."""
    import torch

    if not torch.cuda.is_available():
        torch.Tensor.cuda = lambda self, *a, **k: self
    compress = module.compress

    def compress_same_dtype(layer, attn_mask, mlp_mask, attn_mean_inp, mlp_mean_inp, *args, **kwargs):
        dtype = layer.mlp.down_proj.weight.dtype
        attn_mean_inp = attn_mean_inp.to(dtype) if attn_mean_inp is not None else None
        mlp_mean_inp = mlp_mean_inp.to(dtype) if mlp_mean_inp is not None else None
        return compress(layer, attn_mask, mlp_mask, attn_mean_inp, mlp_mean_inp, *args, **kwargs)

    module.compress = compress_same_dtype


def _options(args, ids):
    """The ``args`` namespace the original entry point reads."""
    if args.impl == "flap":
        return SimpleNamespace(
            nsamples=ids.shape[0], seed=0, pruning_ratio=float(args.sparsity), remove_heads=-1,
            metrics="WIFV", structure="AL-AM", unstr=True,
        )  # fmt: skip
    return SimpleNamespace(
        nsamples=ids.shape[0], seed=0, sparsity_ratio=_pattern(args.sparsity)[0], use_variant=False,
        Hyper_m=args.owl_m, Lamda=args.owl_lamda, model=args.model,
    )  # fmt: skip


def _commit(code: str) -> str:
    done = subprocess.run(["git", "-C", code, "rev-parse", "HEAD"], capture_output=True, text=True)
    return done.stdout.strip() or "unknown (not a git checkout)"


def main() -> int:
    from driver_io import driver_arguments, load_calibration_ids, write_outputs

    p = driver_arguments(__doc__.splitlines()[0])
    p.add_argument(
        "--code",
        required=True,
        help="a checkout of locuslab/wanda, luuyin/OWL, CASIA-IVA-Lab/FLAP or icip-cas/ShortGPT",
    )
    p.add_argument("--impl", required=True, choices=("wanda", "owl", "flap", "shortgpt"))
    p.add_argument("--owl-m", type=float, default=5.0)
    p.add_argument("--owl-lamda", type=float, default=0.08)
    args = p.parse_args()
    if (args.impl, args.method) not in ENTRY:
        known = sorted(m for i, m in ENTRY if i == args.impl)
        p.error(f"--impl {args.impl} has no method {args.method!r}: {known}")
    package = "shortgpt" if args.impl == "shortgpt" else "lib"
    if not os.path.isdir(os.path.join(args.code, package)):
        p.error(f"--code {args.code} has no {package}/ folder: pass a checkout of the original repository")
    if args.impl in ("flap", "shortgpt") and ":" in args.sparsity:
        p.error(f"{args.impl}'s code removes a ratio of structures, not {args.sparsity}: give e.g. 0.2")

    import torch
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(args.threads)
    ids = load_calibration_ids(args.calib)
    if not torch.cuda.is_available():
        torch.cuda.synchronize = lambda *a, **k: None
    sys.path.insert(0, os.path.abspath(os.path.join(args.code, package if args.impl == "shortgpt" else "")))
    module_name, function = ENTRY[(args.impl, args.method)]
    module = importlib.import_module(module_name)
    module.get_loaders = _calibration_loader(ids, all_windows=args.impl == "flap")

    report = {"code": f"{args.impl}@{_commit(args.code)[:12]}", "entry": f"{module_name}.{function}"}
    if args.impl == "shortgpt":  # the whole model runs (its own rotary); no decoder-layer shims
        model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32).eval()
        start = time.perf_counter()
        report["removed_blocks"] = _run_shortgpt(module, model, ids, args.sparsity)
        report |= {"prune_s": time.perf_counter() - start, "torch": torch.__version__}
        write_outputs(model, args.out, args.report, report)
        return 0
    if args.impl == "flap":
        _flap_shims(module)
        model = _flap_model(args.model, ids[:1])
    else:
        model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)
        model.eval()
        for layer in model.model.layers:
            layer.register_forward_pre_hook(_rope_hook(model.model.rotary_emb), with_kwargs=True)
    model.seqlen = ids.shape[1]
    model.hf_device_map = {}
    call = {}
    if args.impl != "flap":  # FLAP's entry points take no N:M arguments
        _, prune_n, prune_m = _pattern(args.sparsity)
        call = {"prune_n": prune_n, "prune_m": prune_m}
    start = time.perf_counter()
    with contextlib.redirect_stdout(sys.stderr):  # the original prints per layer: kept, off stdout
        getattr(module, function)(_options(args, ids), model, None, torch.device("cpu"), **call)
    seconds = time.perf_counter() - start

    report |= {"prune_s": seconds, "torch": torch.__version__}
    write_outputs(model, args.out, args.report, report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
