"""One K2 training step (forward + backward + optimizer step) with our layer spec against megatron-core's local spec.

    python -m benchmarks.train_step [--preset k2-mini] [--seq 1024] [--micro-batch 8] [--json out.json]
    python -m benchmarks.train_step --preset k2-tiny --device cpu --steps 2     # CPU smoke run (the test)

Both models are megatron-core GPTModels of the same MLATransformerConfig, built, wrapped and trained the way
k2-pretrain does (Float16Module for bf16, DistributedDataParallel + megatron's distributed optimizer with
MuonClip inside, megatron's forward_backward_func, finalize_model_grads), one after the other in one process
(both at once would not fit k2-mini on one 80 GB GPU), on the same random token batch:
  k2 spec         k2_megatron.megatron.spec: our MLA core attention (mla_attention + max logits), grouped-GEMM
                  experts, our router and token permutation; QK-Clip on (it reads the kernel's max logits)
  megatron local  megatron-core's get_gpt_decoder_block_spec(use_transformer_engine=False): local linears and
                  norms, SequentialMLP experts (a loop over experts), TopKRouter and MoELayer, and its unfused
                  DotProductAttention (baddbmm, softmax, bmm) as the core attention; QK-Clip off (the local
                  attention records no max logits). megatron-core 0.19's DotProductAttention refuses MLA's
                  k_channels / v_channels arguments, so LocalMLADotProductAttention below takes and checks
                  them and runs it unchanged: its maths needs only kv_channels = v_head_dim (our configs)
                  and MLA's softmax_scale, both of which it already gets.
The optimizer (MuonClip: Muon with the batched Newton-Schulz op for matrices, AdamW for the rest) is the same
code for both. Reported per spec: median ms of the whole step, of forward + backward and of the optimizer step
(CUDA events on a GPU, wall clock on the CPU), over --steps timed steps after --warmup steps; "speedup" is
megatron local / k2 spec for the whole step. Target on an H100 (issue 9): k2-mini step >= 2x megatron local.
On the CPU the figures are the reference ops on a CPU, printed as such: they say nothing about GPU speed.
"""

from __future__ import annotations

import argparse
import gc
import math
import os
import statistics
import sys
import time

# megatron's jit_fuser is torch.compile: its compile time does not fit a short benchmark (minutes on a CPU); both
# specs run its fused elementwise helpers eagerly.
os.environ.setdefault("TORCHDYNAMO_DISABLE", "1")

import torch

from benchmarks.common import print_table, run_metadata, write_json

SPECS = ("k2 spec", "megatron local")
TARGET_SPEEDUP = 2.0


def _init(device: str) -> None:
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed

    if device == "cpu":
        from k2_megatron.megatron import init_distributed_cpu

        init_distributed_cpu()
        return
    torch.cuda.set_device(0)
    if not torch.distributed.is_initialized():
        import tempfile

        torch.distributed.init_process_group("nccl", rank=0, world_size=1,
                                             init_method=f"file://{tempfile.mkstemp(prefix='k2_bench_')[1]}")
    if not parallel_state.model_parallel_is_initialized():
        parallel_state.initialize_model_parallel()
    torch.manual_seed(0)
    model_parallel_cuda_manual_seed(0)


def _teardown(device: str) -> None:
    from megatron.core import parallel_state

    if device == "cpu":
        from k2_megatron.megatron import teardown_distributed_cpu

        teardown_distributed_cpu()
        return
    parallel_state.destroy_model_parallel()
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def local_mla_core_attention():
    """megatron-core's DotProductAttention accepting the k_channels / v_channels that MLASelfAttention passes."""
    from megatron.core.transformer.dot_product_attention import DotProductAttention

    class LocalMLADotProductAttention(DotProductAttention):
        def __init__(self, config, layer_number, attn_mask_type, attention_type, attention_dropout=None,
                     softmax_scale=None, k_channels=None, v_channels=None, cp_comm_type=None, pg_collection=None):
            # q.k may be wider than v (192 vs 128): the baddbmm takes any q.k width, the output reshape uses
            # config.kv_channels, which must be the value width.
            if v_channels is not None and v_channels != config.kv_channels:
                raise ValueError(f"LocalMLADotProductAttention: v_channels={v_channels} must equal "
                                 f"config.kv_channels={config.kv_channels}")
            if softmax_scale is None and k_channels is not None:
                softmax_scale = 1.0 / math.sqrt(k_channels)
            super().__init__(config, layer_number, attn_mask_type, attention_type, attention_dropout=attention_dropout,
                             softmax_scale=softmax_scale, cp_comm_type=cp_comm_type, pg_collection=pg_collection)

    return LocalMLADotProductAttention


def megatron_local_block_spec(tc):
    """megatron-core's local (no Transformer Engine) decoder block spec, with the MLA-capable core attention."""
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_decoder_block_spec

    block = get_gpt_decoder_block_spec(tc, use_transformer_engine=False, normalization="RMSNorm")
    core = local_mla_core_attention()
    for layer in block.layer_specs:
        layer.submodules.self_attention.submodules.core_attention = core
    return block


def build(spec: str, cfg, dtype: torch.dtype, device: str):
    """(DDP-wrapped model, MuonClip optimizer) of ``cfg`` with ``spec`` ("k2 spec" or "megatron local")."""
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
    from megatron.core.distributed.finalize_model_grads import finalize_model_grads
    from megatron.core.models.gpt import GPTModel
    from megatron.core.optimizer import OptimizerConfig
    from megatron.core.transformer.module import Float16Module

    from k2_megatron.megatron import build_k2_model, to_transformer_config
    from k2_megatron.megatron.optimizer import MuonClipConfig, get_muonclip_optimizer

    tc = to_transformer_config(cfg, params_dtype=dtype)
    torch.manual_seed(0)
    if spec == "k2 spec":
        model = build_k2_model(cfg, tc)
    elif spec == "megatron local":
        model = GPTModel(config=tc, transformer_layer_spec=megatron_local_block_spec(tc), vocab_size=cfg.vocab_size,
                         max_sequence_length=cfg.max_position_embeddings, pre_process=True, post_process=True,
                         share_embeddings_and_output_weights=cfg.tie_word_embeddings, position_embedding_type="none")
    else:
        raise ValueError(f"spec must be one of {SPECS}, got {spec!r}")
    if dtype != torch.float32:
        model = Float16Module(tc, model)
    if device == "cuda":
        model.cuda(torch.cuda.current_device())
    ddp_config = DistributedDataParallelConfig(use_distributed_optimizer=True, grad_reduce_in_fp32=True,
                                               overlap_grad_reduce=False, bucket_size=None)
    model = DistributedDataParallel(config=tc, ddp_config=ddp_config, module=model)
    tc.finalize_model_grads_func = finalize_model_grads
    opt_config = OptimizerConfig(optimizer="adam", lr=2e-4, weight_decay=0.1, bf16=dtype == torch.bfloat16,
                                 params_dtype=dtype, use_distributed_optimizer=True, clip_grad=1.0)
    muon = MuonClipConfig(qk_clip_tau=100.0 if spec == "k2 spec" else None)
    return model, get_muonclip_optimizer(opt_config, [model], muon)


def make_batch(cfg, micro_batch: int, seq: int, device: str, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, cfg.vocab_size, (micro_batch, seq + 1), generator=g)
    return {"tokens": tokens[:, :-1].contiguous().to(device), "labels": tokens[:, 1:].contiguous().to(device),
            "position_ids": torch.arange(seq, device=device)[None].expand(micro_batch, seq)}


def _loss_func(output_tensor):
    loss = output_tensor.float().mean()
    return loss, {"lm loss": loss.detach().clone()}  # megatron divides `loss` in place


def _forward_step(data_iterator, model):
    batch = next(data_iterator)
    return model(batch["tokens"], batch["position_ids"], None, labels=batch["labels"]), _loss_func


class _Clock:
    """Elapsed milliseconds between marks: CUDA events on a GPU (GPU time), perf_counter on the CPU."""

    def __init__(self, device: str):
        self.cuda = device == "cuda"

    def mark(self):
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            return event
        return time.perf_counter()

    def ms(self, start, end) -> float:
        if self.cuda:
            end.synchronize()
            return start.elapsed_time(end)
        return (end - start) * 1e3


def time_steps(model, opt, batch: dict, seq: int, micro_batch: int, warmup: int, steps: int, device: str) -> dict:
    """Median ms of the whole step, of forward + backward and of the optimizer step; the last loss."""
    from megatron.core.pipeline_parallel import get_forward_backward_func

    fb = get_forward_backward_func()
    clock = _Clock(device)
    step_ms, fb_ms, opt_ms, loss = [], [], [], float("nan")
    for i in range(warmup + steps):
        model.zero_grad_buffer()
        opt.zero_grad()
        t0 = clock.mark()
        out = fb(forward_step_func=_forward_step, data_iterator=iter([batch]), model=model, num_microbatches=1,
                 seq_length=seq, micro_batch_size=micro_batch, forward_only=False)
        t1 = clock.mark()
        ok, _, _ = opt.step()
        t2 = clock.mark()
        if not ok:
            raise RuntimeError(f"optimizer step {i} was skipped (non-finite gradients)")
        loss = float(out[0]["lm loss"])
        if i >= warmup:
            fb_ms.append(clock.ms(t0, t1))
            opt_ms.append(clock.ms(t1, t2))
            step_ms.append(clock.ms(t0, t2))
    return {"step_ms": statistics.median(step_ms), "fwd_bwd_ms": statistics.median(fb_ms),
            "optimizer_ms": statistics.median(opt_ms), "loss": loss}


def run(args) -> dict:
    from k2_megatron.config import get_preset

    device = args.device
    overrides = {"vocab_size": args.vocab} if args.vocab else {}
    cfg = get_preset(args.preset, **overrides)
    dtype = getattr(torch, args.dtype)
    _init(device)
    try:
        meta = run_metadata()
        batch = make_batch(cfg, args.micro_batch, args.seq, device)
        rows = []
        for spec in args.specs:
            model, opt = build(spec, cfg, dtype, device)
            params = sum(p.numel() for p in model.parameters())
            if device == "cuda":
                torch.cuda.reset_peak_memory_stats()
            timing = time_steps(model, opt, batch, args.seq, args.micro_batch, args.warmup, args.steps, device)
            row = {"spec": spec, **timing, "params_M": params / 1e6,
                   "tokens_per_s": args.micro_batch * args.seq / timing["step_ms"] * 1e3}
            if device == "cuda":
                row["peak_GiB"] = torch.cuda.max_memory_allocated() / 2**30
            rows.append(row)
            del model, opt
            gc.collect()
            if device == "cuda":
                torch.cuda.empty_cache()
    finally:
        _teardown(device)
    by_spec = {r["spec"]: r for r in rows}
    speedup = (by_spec["megatron local"]["step_ms"] / by_spec["k2 spec"]["step_ms"]
               if len(by_spec) == 2 else None)
    return {"benchmark": "train_step", **meta, "measured_on": device, "gpu_figures": device == "cuda",
            "preset": args.preset, "vocab_size": cfg.vocab_size, "seq": args.seq, "micro_batch": args.micro_batch,
            "dtype": args.dtype, "warmup": args.warmup, "steps": args.steps, "rows": rows,
            "speedup_vs_megatron_local": speedup, "target_speedup": TARGET_SPEEDUP}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="k2-mini", help="model preset (default k2-mini; k2-tiny for a CPU run)")
    parser.add_argument("--vocab", type=int, default=None,
                        help="vocabulary size override (k2-mini's is K2's 163840; its 1-GPU recipe trains 16384)")
    parser.add_argument("--seq", type=int, default=1024, help="tokens per sequence (default 1024)")
    parser.add_argument("--micro-batch", type=int, default=8, help="sequences per step (default 8)")
    parser.add_argument("--dtype", choices=["bfloat16", "float32"], default="bfloat16")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--steps", type=int, default=5, help="timed steps per spec (median reported)")
    parser.add_argument("--specs", nargs="+", choices=SPECS, default=list(SPECS))
    parser.add_argument("--device", choices=["cuda", "cpu"], default=None,
                        help="default: cuda if available; without a GPU it says so and exits 0 unless --device cpu")
    parser.add_argument("--json", metavar="PATH", help="write the rows (and the environment) to this file")
    args = parser.parse_args(argv)
    if args.device is None:
        if not torch.cuda.is_available():
            print("benchmarks.train_step: needs a CUDA GPU (none visible); nothing measured "
                  "(--device cpu --preset k2-tiny runs the CPU smoke version).")
            return 0
        args.device = "cuda"
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA GPU visible")
    for name in ("seq", "micro_batch", "steps"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.warmup < 0:
        parser.error(f"--warmup must be >= 0, got {args.warmup}")

    result = run(args)
    where = (f"{result['device']}" if result["gpu_figures"] else
             "CPU (reference ops on a CPU: NOT GPU figures, say nothing about kernel speed)")
    print(f"train step, {args.preset} (vocab {result['vocab_size']}), {args.micro_batch} x {args.seq} tokens, "
          f"{args.dtype} -- {where}, torch {result['torch']}, commit {result['commit']}")
    print(f"k2 ops: {result['kernels']}")
    print_table(result["rows"], ["spec", "step_ms", "fwd_bwd_ms", "optimizer_ms", "tokens_per_s", "loss", "params_M"]
                + (["peak_GiB"] if result["gpu_figures"] else []))
    speedup = result["speedup_vs_megatron_local"]
    if speedup is not None and math.isfinite(speedup):
        print(f"speedup (megatron local step / k2 spec step): {speedup:.2f}x; target on an H100: "
              f">= {TARGET_SPEEDUP}x" + ("" if result["gpu_figures"] else " (CPU run: not comparable)"))
    write_json(args.json, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
