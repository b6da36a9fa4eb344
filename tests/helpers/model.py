"""Shared helpers of the K2 model tests (not collected): random reference models and a megatron train step."""

from __future__ import annotations

import os

os.environ.setdefault("TORCHDYNAMO_DISABLE", "1")  # megatron's jit_fuser is torch.compile: seconds on a CPU

from functools import partial

import torch

from k2_megatron.config import K2Config, YarnConfig, config_to_hf, get_preset

# The K2 release's RoPE at toy scale: YaRN factor 32 over k2-tiny's 128-token pretraining context.
TINY_RELEASE_YARN = YarnConfig(factor=32.0, original_max_position_embeddings=128)


def k2_like_tiny_config(**overrides) -> K2Config:
    """K2-like at toy scale, configured as the release is: dense first layer, MoE + shared expert, sigmoid routing,
    YaRN (unless ``rope_scaling`` is overridden), q/kv LoRA, q.k head dim 24 and v head dim 16 (the 192/128 ratio)."""
    cfg = get_preset("k2-tiny", **overrides)
    return cfg if "rope_scaling" in overrides else cfg.with_yarn(TINY_RELEASE_YARN)


def make_hf_model(cfg: K2Config, seed: int = 0):
    """A transformers DeepseekV3ForCausalLM of ``cfg`` with random weights (norm weights near 1) and a
    non-zero e_score_correction_bias, in float32, eager attention."""
    from transformers import DeepseekV3Config, DeepseekV3ForCausalLM

    hf_config = DeepseekV3Config(**config_to_hf(cfg, "deepseek_v3"))
    hf_config._attn_implementation = "eager"
    torch.manual_seed(seed)
    model = DeepseekV3ForCausalLM(hf_config).float()
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1 + 0.1 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(0.08 * torch.randn(p.shape, generator=g))
        for name, b in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                b.copy_(0.1 * torch.randn(b.shape, generator=g))
    return model.eval()


def full_megatron_state_dict(cfg: K2Config, seed: int = 0) -> dict:
    from k2_megatron.checkpoint import hf_to_megatron

    return {k: v.clone() for k, v in hf_to_megatron(make_hf_model(cfg, seed).state_dict(), cfg).items()}


def loaded_k2_model(cfg: K2Config, full: dict, **build_kwargs):
    """This rank's build_k2_model(cfg, **build_kwargs) loaded with the whole state dict ``full``, router biases frozen
    (their update follows the load balance, which a reference computation does not repeat)."""
    from k2_megatron.checkpoint import load_megatron_state_dict
    from k2_megatron.megatron import build_k2_model
    from k2_megatron.megatron.moe import K2Router

    model = build_k2_model(cfg, **build_kwargs)
    load_megatron_state_dict(model, full)
    for m in model.modules():
        if isinstance(m, K2Router):
            m.freeze_bias()
    return model


def make_batches(cfg: K2Config, num: int, micro_batch: int, seq: int, seed: int = 7):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(num):
        tokens = torch.randint(0, cfg.vocab_size, (micro_batch, seq + 1), generator=g)
        out.append({"tokens": tokens[:, :-1].contiguous(), "labels": tokens[:, 1:].contiguous()})
    return out


def _loss_func(loss_mask, output_tensor):
    losses = output_tensor.float()
    loss = (losses * loss_mask).sum() / loss_mask.sum()
    return loss, {"lm loss": loss.detach().clone()}  # megatron divides `loss` in place


def _forward_step(data_iterator, model, return_schedule_plan: bool = False):
    batch = next(data_iterator)
    tokens, labels = batch["tokens"], batch["labels"]
    position_ids = torch.arange(tokens.shape[1])[None].expand_as(tokens)
    loss = partial(_loss_func, torch.ones_like(labels, dtype=torch.float32))
    if return_schedule_plan:  # megatron's combined 1F1B (overlap_moe_expert_parallel_comm)
        return model.build_schedule_plan(tokens, position_ids, None, labels=labels), loss
    return model(tokens, position_ids, None, labels=labels), loss


def train_step_losses(model, batches, seq: int, micro_batch: int) -> list[float]:
    """megatron-core forward_backward_func over ``batches`` (one microbatch each); per-microbatch losses
    (on the last pipeline stage; [] elsewhere). Gradients accumulate in the parameters' .grad."""
    from megatron.core.pipeline_parallel import get_forward_backward_func

    models = model if isinstance(model, list) else [model]
    for m in models:
        m.zero_grad(set_to_none=True)
    fb = get_forward_backward_func()
    out = fb(forward_step_func=_forward_step, data_iterator=iter(batches) if len(models) == 1
             else [iter(batches) for _ in models],
             model=model, num_microbatches=len(batches), seq_length=seq, micro_batch_size=micro_batch,
             forward_only=False)
    return [float(r["lm loss"]) for r in out]


def require_no_cuda() -> None:
    """The in-process model tests run megatron on the CPU (cpu_compat), which applies only without CUDA."""
    import pytest

    if torch.cuda.is_available():
        pytest.skip("CPU test of megatron-core (cpu_compat is inactive when CUDA is available); the gloo tests in "
                    "test_model_distributed.py hide the GPU from their worker processes and still run")


def teardown_megatron() -> None:
    """Undo init_distributed_cpu (so test modules that run after ours see a plain torch)."""
    from k2_megatron.megatron import teardown_distributed_cpu

    teardown_distributed_cpu()


def torchrun_pretrain(out_dir, nproc: int, overrides: list[str], *, timeout: float = 300) -> tuple[str, list[float]]:
    """examples/pretrain_k2.py under ``torchrun --nproc-per-node nproc`` on the CPU (gloo) with ``overrides``:
    (its stdout, the per-step training losses from out_dir/metrics.jsonl); fails the test if it fails."""
    import json
    import socket
    import subprocess
    import sys

    from tests.helpers import REPO_ROOT

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    env = dict(os.environ, OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="", TORCHDYNAMO_DISABLE="1")
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc),
                           "--master-addr", "127.0.0.1", "--master-port", str(port),
                           str(REPO_ROOT / "examples" / "pretrain_k2.py"), f"output.dir={out_dir}", *overrides],
                          env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    with open(os.path.join(out_dir, "metrics.jsonl"), encoding="utf-8") as f:
        rows = [json.loads(line) for line in f]
    return proc.stdout, [r["loss"] for r in rows if r["kind"] == "train"]


def report_to_parent(body, result_path: str, *args) -> None:
    """A spawned worker's entry (see run_gloo_bodies): ``body(*args)`` with TorchDynamo off and one thread, its result
    dict (or the error it raised) saved to ``result_path`` for the parent."""
    os.environ["TORCHDYNAMO_DISABLE"] = "1"
    torch.set_num_threads(1)
    try:
        out = body(*args)
    except BaseException as exc:  # the parent fails the test with it
        import traceback

        out = {"error": "".join(traceback.format_exception(exc))}
    torch.save(out, result_path)


def run_gloo_bodies(body, world: int, args_for_rank, *, timeout: float = 300) -> list[dict]:
    """run_gloo_workers for a ``body(*args_for_rank(rank))`` that returns its rank's result dict (a module-level
    function: spawned processes import it)."""
    return run_gloo_workers(report_to_parent, world, lambda r, path: (body, path, *args_for_rank(r)),
                            timeout=timeout)


def run_gloo_workers(target, world: int, args_for_rank, *, timeout: float = 300) -> list[dict]:
    """Runs ``target(*args_for_rank(rank, result_path))`` in ``world`` spawned processes on the CPU (CUDA hidden:
    gloo + cpu_compat even on a GPU machine), waits for them and returns each rank's result dict, which the
    target saves to ``result_path``; fails the test on a missing result, a reported "error" or a bad exit code."""
    import multiprocessing
    import tempfile

    ctx = multiprocessing.get_context("spawn")
    tmp = tempfile.mkdtemp(prefix="k2_gloo_results_")
    paths = [os.path.join(tmp, f"rank{r}.pt") for r in range(world)]
    procs = [ctx.Process(target=target, args=args_for_rank(r, paths[r])) for r in range(world)]
    hidden = os.environ.get("CUDA_VISIBLE_DEVICES")
    os.environ["CUDA_VISIBLE_DEVICES"] = ""
    try:
        for p in procs:
            p.start()
    finally:
        if hidden is None:
            del os.environ["CUDA_VISIBLE_DEVICES"]
        else:
            os.environ["CUDA_VISIBLE_DEVICES"] = hidden
    for p in procs:
        p.join(timeout=timeout)
    for p in procs:
        if p.is_alive():
            p.kill()
            p.join()
    results = [torch.load(p, weights_only=False) if os.path.exists(p) else {"error": "no result file"} for p in paths]
    for r, res in enumerate(results):
        assert "error" not in res, f"rank {r}: {res['error']}"
        assert procs[r].exitcode == 0, f"rank {r} exit code {procs[r].exitcode}"
    return results
