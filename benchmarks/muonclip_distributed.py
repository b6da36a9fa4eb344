"""Distributed Muon optimizer step: time and bytes communicated per step, on a small K2 model.

    python -m benchmarks.muonclip_distributed [--world 2] [--steps 6] [--json out.json]

Compares, in the same data-parallel world (gloo on CPU here; the same script runs on GPUs with NCCL when
launched with torchrun on a CUDA machine):
- k2 ZeRO-1:       get_muonclip_optimizer with megatron's DistributedOptimizer (each matrix orthogonalised once,
                   on its owner rank; momentum sharded);
- k2 replicated:   get_muonclip_optimizer without the distributed optimizer (every rank orthogonalises every
                   matrix: the baseline the ZeRO-1 scheme divides by DP);
- megatron muon:   megatron-core's own Muon with its layer-wise distributed optimizer (needs the optional
                   `emerging_optimizers` package; reported as unavailable otherwise).
Per variant: median optimizer.step() time, bytes this rank sends in collectives during step() (grad reduction
excluded) and during the gradient synchronisation, and the Newton-Schulz matrices it orthogonalised per step.
"""

import argparse
import os
import statistics
import sys
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

# The model: k2-tiny's structure at a width where Newton-Schulz costs something.
MODEL = dict(hidden_size=256, moe_intermediate_size=128, intermediate_size=512, num_attention_heads=8,
             q_lora_rank=128, kv_lora_rank=64, qk_nope_head_dim=32, qk_rope_head_dim=16, v_head_dim=32)
SEQ, MICRO_BATCH = 64, 2
COLLECTIVES = ("all_reduce", "all_gather_into_tensor", "reduce_scatter_tensor", "all_gather", "broadcast",
               "all_to_all_single", "_reduce_scatter_base", "_all_gather_base")


class _ByteCounter:
    """Counts the bytes this rank contributes to torch.distributed collectives while ``active``."""

    def __init__(self):
        self.bytes, self.active = 0, False

    def install(self):
        from megatron.core.distributed import param_and_grad_buffer

        targets = [(dist, name) for name in COLLECTIVES if hasattr(dist, name)]
        # megatron's gradient buffers bind their reduce-scatter / all-gather at import time
        targets += [(param_and_grad_buffer, n) for n in ("dist_all_gather_func", "dist_reduce_scatter_func")]
        for owner, name in targets:
            setattr(owner, name, self._wrap(getattr(owner, name)))

    def _wrap(self, fn):
        def counted(*args, **kwargs):
            if self.active:
                tensors = [a for a in args[:2] if torch.is_tensor(a)] or [kwargs.get("tensor")]
                t = tensors[-1] if len(tensors) > 1 else tensors[0]  # the input of (output, input) collectives
                if torch.is_tensor(t):
                    self.bytes += t.numel() * t.element_size()
            return fn(*args, **kwargs)

        return counted


def _variant(name, cfg, counter, steps):
    from tests.helpers.model import make_batches, train_step_losses
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig, finalize_model_grads
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer

    from k2_megatron.megatron import build_k2_model
    from k2_megatron.megatron.optimizer import MuonClipConfig, get_muonclip_optimizer

    distributed = name == "k2 ZeRO-1"
    model = build_k2_model(cfg, params_dtype=torch.float32)
    model.config.finalize_model_grads_func = finalize_model_grads
    ddp = DistributedDataParallel(model.config, DistributedDataParallelConfig(
        use_distributed_optimizer=distributed, grad_reduce_in_fp32=True, overlap_grad_reduce=False,
        bucket_size=None), model)
    base = dict(lr=1e-3, weight_decay=0.1, bf16=False, clip_grad=0.0)
    if name == "megatron muon":
        opt = get_megatron_optimizer(OptimizerConfig(optimizer="muon", use_layer_wise_distributed_optimizer=True,
                                                     use_distributed_optimizer=False, **base), [ddp])
    else:
        opt = get_muonclip_optimizer(OptimizerConfig(use_distributed_optimizer=distributed, **base), [ddp],
                                     MuonClipConfig(ns_dtype=torch.float32))
    rank, world = dist.get_rank(), dist.get_world_size()
    times, step_bytes, sync_bytes = [], [], []
    for step in range(steps):
        batches = make_batches(cfg, 2 * world, MICRO_BATCH, SEQ, seed=step)[rank::world]
        ddp.zero_grad_buffer()
        opt.zero_grad()
        counter.bytes, counter.active = 0, True
        train_step_losses(ddp, batches, SEQ, MICRO_BATCH)  # includes the gradient reduction
        sync_bytes.append(counter.bytes)
        counter.bytes = 0
        dist.barrier()
        start = time.perf_counter()
        opt.step()
        times.append(time.perf_counter() - start)
        step_bytes.append(counter.bytes)
        counter.active = False
    work = opt.newton_schulz_work() if hasattr(opt, "newton_schulz_work") else {}
    warm = slice(2, None)  # the first steps allocate state
    return {"step_ms": 1e3 * statistics.median(times[warm]), "step_MB": statistics.median(step_bytes[warm]) / 2**20,
            "grad_sync_MB": statistics.median(sync_bytes[warm]) / 2**20,
            "matrices_per_step": work.get("matrices", float("nan")) / steps if work else float("nan")}


def _worker(rank, world, port, steps, out_path):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      TORCHDYNAMO_DISABLE="1")
    torch.set_num_threads(1)
    from k2_megatron.megatron import init_distributed_cpu
    from k2_megatron.config import get_preset

    init_distributed_cpu()
    counter = _ByteCounter()
    counter.install()
    cfg = get_preset("k2-tiny", **MODEL)
    results = {}
    for name in ("k2 ZeRO-1", "k2 replicated", "megatron muon"):
        try:
            results[name] = _variant(name, cfg, counter, steps)
        except Exception as exc:  # e.g. emerging_optimizers missing: reported, not fatal
            results[name] = {"error": f"{type(exc).__name__}: {str(exc).splitlines()[0][:160]}"}
        dist.barrier()
    gathered = [None] * world
    dist.all_gather_object(gathered, results)
    if rank == 0:
        torch.save(gathered, out_path)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--world", type=int, default=2)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--json")
    args = parser.parse_args()
    sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
    from benchmarks.common import print_table, run_metadata, write_json

    out_path = f"/tmp/k2_muonclip_bench_{os.getpid()}.pt"
    os.environ["CUDA_VISIBLE_DEVICES"] = ""  # gloo on CPU
    mp.spawn(_worker, args=(args.world, 29900 + os.getpid() % 50, args.steps, out_path), nprocs=args.world)
    per_rank = torch.load(out_path)
    os.remove(out_path)
    rows = []
    for name in per_rank[0]:
        for rank, res in enumerate(per_rank):
            rows.append({"optimizer": name, "rank": rank, **res[name]})
    meta = run_metadata()
    print(f"MuonClip optimizer step, DP{args.world} on {meta['device']} (gloo), model {MODEL}, commit {meta['commit']}")
    print_table(rows, ["optimizer", "rank", "step_ms", "step_MB", "grad_sync_MB", "matrices_per_step", "error"])
    write_json(args.json, {"benchmark": "muonclip_distributed", "world": args.world, "model": MODEL, **meta,
                           "rows": rows})


if __name__ == "__main__":
    main()
