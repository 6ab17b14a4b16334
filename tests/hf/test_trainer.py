"""The FSDP2 trainer: exact masks (50% and 2:4) for fine-tuning and masked LoRA, a resumed run
equal to an uninterrupted one, top-k distillation, bf16 with activation checkpointing, and
2 processes (Gloo) against 1 at equal global batch."""

import copy
import json
import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from sparsekit.hf.trainer import TrainConfig, distill_loss, step_rows, topk_distill_loss, train
from sparsekit.models import find_decoder_blocks, linear_weight
from sparsekit.nn import SparseLinear, sparsify
from sparsekit.nn.sparsify import sparse_candidates
from sparsekit.pruning import PruneConfig, prune_model
from tests.conftest import tiny_model

ROOT = Path(__file__).resolve().parents[2]


def _pruned(sparsity="0.5", arch="llama"):
    torch.manual_seed(0)
    model = tiny_model(arch)
    prune_model(model, None, PruneConfig(method="magnitude", sparsity=sparsity, show_progress=False))
    return model


def _ids(n=16, seqlen=32):
    return torch.randint(0, 128, (n, seqlen), generator=torch.Generator().manual_seed(3))


def _zeros(model):
    return {n: linear_weight(m).detach() == 0 for n, m in sparse_candidates(model).items()}


def _cfg(**kw):
    base = dict(steps=4, lr=3e-3, batch_size=4, precision="fp32", show_progress=False, log_every=0)
    return TrainConfig(**{**base, **kw})


def test_data_order_depends_on_seed_and_step_only_and_covers_each_epoch():
    first = torch.cat([step_rows(s, 4, 10, seed=1) for s in range(5)])  # 20 rows = 2 epochs of 10
    assert sorted(first[:10].tolist()) == list(range(10)) and sorted(first[10:].tolist()) == list(range(10))
    assert torch.equal(step_rows(3, 4, 10, seed=1), first[12:16])
    assert not torch.equal(step_rows(0, 4, 10, seed=2), first[:4])


@pytest.mark.parametrize("sparsity", ["0.5", "2:4"])
@pytest.mark.parametrize("lora", [0, 4])
def test_every_pruned_weight_stays_zero_and_the_kept_ones_train(sparsity, lora):
    model = _pruned(sparsity)
    before = {n: linear_weight(m).detach().clone() for n, m in sparse_candidates(model).items()}
    report = train(model, _ids(), _cfg(lora_rank=lora, steps=6))
    assert report.masks_exact and report.losses[-1] < report.losses[0]
    assert report.trainable_params > 0 and (report.masked_weights > 0) == (lora == 0)
    for name, module in sparse_candidates(model).items():
        w = linear_weight(module).detach()
        zero = before[name] == 0
        assert torch.equal(w == 0, zero), name  # pruned stay zero, kept ones stay nonzero
        assert not torch.equal(w[~zero], before[name][~zero]), name  # and they trained
    assert type(model).__name__ == "LlamaForCausalLM"
    assert all(not p.requires_grad and type(p) is torch.nn.Parameter for p in model.parameters())
    assert not any(m._forward_pre_hooks or m._forward_hooks for m in model.modules())


def test_sparse_linear_layers_come_back_in_their_formats():
    model = _pruned("2:4")
    sparsify(model)
    masks = {n: m.mask().clone() for n, m in model.named_modules() if isinstance(m, SparseLinear)}
    report = train(model, _ids(), _cfg())
    after = {n: m for n, m in model.named_modules() if isinstance(m, SparseLinear)}
    assert report.masks_exact and set(after) == set(masks)
    assert {m.format for m in after.values()} == {"2:4"}
    assert all(torch.equal(m.mask(), masks[n]) for n, m in after.items())


def test_resumed_run_reaches_the_uninterrupted_weights(tmp_path):
    cfg = dict(steps=6, grad_accum=2, schedule="cosine", warmup=1, save_every=2, max_grad_norm=1.0)
    whole = _pruned()
    report = train(whole, _ids(), _cfg(**cfg), state_dir=tmp_path / "whole")
    part = _pruned()
    stopped = train(part, _ids(), _cfg(**cfg, stop_after=3), state_dir=tmp_path / "part")
    assert stopped.stopped_at == 3 and len(stopped.losses) == 3
    assert (tmp_path / "part/checkpoints/latest").read_text().strip() == "step-00000003"
    resumed_model = _pruned()  # a fresh process would reload the input model
    resumed = train(resumed_model, _ids(), _cfg(**cfg), state_dir=tmp_path / "part", resume=True)
    assert resumed.resumed_from == 3 and resumed.losses == pytest.approx(report.losses, rel=1e-6)
    for (name, a), (_, b) in zip(whole.state_dict().items(), resumed_model.state_dict().items(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7, msg=name)
    lines = (tmp_path / "part/train_log.jsonl").read_text().splitlines()
    steps = [json.loads(line)["step"] for line in lines]
    assert steps == list(range(1, 7))  # the steps after the checkpoint were not logged twice
    kept = sorted(p.name for p in (tmp_path / "part/checkpoints").glob("step-*"))
    assert kept == ["step-00000004", "step-00000006"]  # keep_checkpoints=2, no partial folder left
    assert not list((tmp_path / "part/checkpoints").glob(".step-*"))


def test_resume_refuses_a_different_data_order(tmp_path):
    train(_pruned(), _ids(), _cfg(steps=2, save_every=1), state_dir=tmp_path)
    with pytest.raises(ValueError, match="batch_size"):
        train(_pruned(), _ids(), _cfg(steps=4, batch_size=8), state_dir=tmp_path, resume=True)


def test_bad_settings_fail_before_any_work():
    with pytest.raises(ValueError, match="not divisible"):
        train(_pruned(), _ids(), _cfg(batch_size=4, grad_accum=3))
    with pytest.raises(ValueError, match="schedule"):
        train(_pruned(), _ids(), _cfg(schedule="linear"))
    with pytest.raises(ValueError, match="give a teacher"):
        train(_pruned(), _ids(), _cfg(teacher_topk=8))


def test_topk_distillation_equals_full_kl_at_full_vocabulary_and_trains(tmp_path):
    s, t = torch.randn(2, 5, 11), torch.randn(2, 5, 11)
    top = t.topk(11, dim=-1)
    torch.testing.assert_close(topk_distill_loss(s, top.values, top.indices, 2.0), distill_loss(s, t, 2.0))
    teacher = tiny_model("llama")
    student = _pruned()
    report = train(student, _ids(), _cfg(steps=6, teacher_topk=16), teacher=teacher, state_dir=tmp_path)
    assert report.loss == "distill-topk" and report.losses[-1] < report.losses[0] and report.masks_exact
    from safetensors.torch import load_file

    cache = load_file(str(tmp_path / "teacher_topk/topk.safetensors"))
    assert cache["values"].shape == cache["indices"].shape == (16, 32, 16)
    assert type(teacher).__name__ == "LlamaForCausalLM" and teacher(_ids(1)).logits.isfinite().all()


def test_bf16_compute_with_activation_checkpointing_trains():
    model = _pruned()
    report = train(model, _ids(), _cfg(steps=6, precision="bf16", activation_checkpointing=True))
    assert report.precision == "bf16" and report.masks_exact and report.losses[-1] < report.losses[0]
    assert all(p.dtype == torch.float32 for p in model.parameters())  # the master weights stay fp32
    assert not model.is_activation_checkpointing


def test_lora_adapter_loads_in_peft_and_reproduces_the_merged_model(tmp_path):
    peft = pytest.importorskip("peft")
    from sparsekit.hf.lora import load_adapter

    base = _pruned("0.5")
    model = copy.deepcopy(base)
    train(model, _ids(), _cfg(steps=4, lora_rank=4), adapter_dir=tmp_path / "adapter")
    assert (tmp_path / "adapter/adapter_config.json").is_file()
    again = load_adapter(copy.deepcopy(base), tmp_path / "adapter").merge_and_unload()
    for (name, a), (_, b) in zip(model.state_dict().items(), again.state_dict().items(), strict=True):
        torch.testing.assert_close(a, b, msg=name)
    plain = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "adapter").merge_and_unload()
    zeros = lambda m: sum(int(v.sum()) for v in _zeros(m).values())  # noqa: E731
    assert zeros(model) == zeros(base) and zeros(plain) < zeros(base) // 2  # plain LoRA densifies


# --- 2 processes (Gloo) against 1 -----------------------------------------------------------------

WORKER = textwrap.dedent(
    """
    import json, sys, torch
    torch.set_num_threads(1)
    sys.path.insert(0, {root!r})
    from tests.hf.test_trainer import JOBS, run_job
    import torch.distributed as dist
    out = sys.argv[1]
    dist.init_process_group("gloo")
    for job in JOBS:
        model, report = run_job(job, out)
        if dist.get_rank() == 0:
            torch.save(model.state_dict(), f"{{out}}/{{job}}.pt")
            json.dump(report.to_dict(), open(f"{{out}}/{{job}}.json", "w"))
    dist.destroy_process_group()
    """
)

JOBS = ("finetune", "distill", "lora", "resume", "maskllm")


def run_job(job: str, out: str):
    """One short job of the trainer on a tiny 50%-sparse llama, the same on any world size."""
    cfg = _cfg(steps=3, batch_size=4, grad_accum=1)
    model = _pruned()
    if job == "finetune":
        return model, train(model, _ids(), cfg)
    if job == "distill":
        torch.manual_seed(1)
        return model, train(model, _ids(), cfg, teacher=tiny_model("llama"))
    if job == "lora":
        cfg.lora_rank = 4
        return model, train(model, _ids(), cfg)
    if job == "maskllm":  # learned 2:4 masks from the dense model (Gumbel noise differs per rank)
        from sparsekit.hf.maskllm import learn_masks

        model = tiny_model("llama")
        return model, learn_masks(model, _ids(), cfg, prior="wanda")
    cfg.steps, cfg.save_every, cfg.stop_after = 4, 2, 2
    train(model, _ids(), cfg, state_dir=f"{out}/resume-state")
    cfg.stop_after = None
    model = _pruned()
    return model, train(model, _ids(), cfg, state_dir=f"{out}/resume-state", resume=True)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_match_one_at_equal_global_batch(tmp_path):
    script = tmp_path / "worker.py"
    script.write_text(WORKER.format(root=str(ROOT)))
    port, procs = _free_port(), []
    for rank in range(2):
        env = {
            **os.environ,
            "RANK": str(rank),
            "WORLD_SIZE": "2",
            "LOCAL_RANK": str(rank),
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(port),
            "OMP_NUM_THREADS": "1",
        }
        procs.append(
            subprocess.Popen(
                [sys.executable, str(script), str(tmp_path)],
                env=env,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
            )
        )
    outs = [p.communicate(timeout=600)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs[0][-3000:] + outs[1][-3000:]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        dual = json.loads((tmp_path / "maskllm.json").read_text())
        assert dual["train"]["world_size"] == 2 and len(dual["train"]["losses"]) == 3
        state = torch.load(tmp_path / "maskllm.pt", weights_only=True)
        learned = [v for k, v in state.items() if k.endswith("proj.weight")]
        assert len(learned) == 14
        assert all(((w != 0).view(w.shape[0], -1, 4).sum(-1) <= 2).all() for w in learned)
        for job in JOBS[:-1]:
            model, single = run_job(job, str(tmp_path / "single"))
            dual = json.loads((tmp_path / f"{job}.json").read_text())
            assert dual["world_size"] == 2 and single.world_size == 1
            assert dual["masks_exact"] and single.masks_exact
            assert dual["losses"] == pytest.approx(single.losses, rel=1e-4), job
            state = torch.load(tmp_path / f"{job}.pt", weights_only=True)
            for name, value in model.state_dict().items():
                torch.testing.assert_close(state[name], value, rtol=1e-4, atol=1e-5, msg=f"{job}: {name}")
            # each rank holds half of the parameter, gradient and optimizer shards
            assert dual["state_mb_per_process"] == pytest.approx(single.state_mb_per_process / 2, rel=0.05)
    finally:
        torch.set_num_threads(threads)
    assert find_decoder_blocks(model)[1] is not None


def test_evaluation_every_n_steps_runs_on_the_sharded_model(tmp_path):
    from sparsekit.eval.perplexity import perplexity_of_ids

    held_out = _ids(1, 64)

    def evaluate(m):
        return perplexity_of_ids(m, held_out, seqlen=32).ppl

    report = train(_pruned(), _ids(), _cfg(steps=4, eval_every=2), evaluate=evaluate, state_dir=tmp_path)
    assert [s for s, _ in report.evals] == [2, 4] and all(p > 1 for _, p in report.evals)
    assert report.ppl_after == pytest.approx(report.evals[-1][1], rel=1e-5)  # the same weights, unsharded
    logged = [json.loads(x) for x in (tmp_path / "train_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in logged if "eval_ppl" in r] == [2, 4]


def test_a_model_trains_twice_in_one_process():
    model = _pruned()
    first = train(model, _ids(), _cfg(steps=2))
    second = train(model, _ids(), _cfg(steps=2))  # sharded again after being turned back
    assert first.masks_exact and second.masks_exact
    assert second.losses[0] < first.losses[0]  # it starts from the first run's weights
