"""K2 pretraining on megatron-core: the entry point behind ``k2-pretrain`` and ``examples/pretrain_k2.py``.

    python examples/pretrain_k2.py                                  # k2-tiny on the bundled corpus, this CPU
    python examples/pretrain_k2.py --config examples/configs/k2_mini_1gpu.yaml train.iters=2000
    torchrun --nproc-per-node 2 examples/pretrain_k2.py train.iters=20     # several processes (gloo on CPU)
    python examples/pretrain_k2.py --config examples/configs/k2_full.yaml --dry-run   # per-rank memory plan

One optimizer step: set the WSD learning rate; zero the gradient buffers; megatron-core's forward_backward_func
(1F1B with pipeline parallelism, interleaved 1F1B with virtual stages) over the step's micro-batches, whose
finalize hook reduces gradients over data-parallel ranks and updates the aux-loss-free expert biases; MuonClip
(``get_muonclip_optimizer``: Muon on hidden matrices, AdamW elsewhere, QK-Clip with global max logits, ZeRO-1
when data-parallel > 1). Then metrics, periodic validation, checkpoints (every N steps, at the end, on
SIGTERM/SIGINT) and, at the end, the plot.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import signal
import sys
import time
from functools import partial

os.environ.setdefault("TORCHDYNAMO_DISABLE", "1")  # megatron's jit_fuser is torch.compile: a cold compile costs

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

from k2_megatron.config import ConfigError, PretrainConfig, load_config  # noqa: E402


# ----- distributed setup -----

def _initialize(cfg: PretrainConfig) -> None:
    layout = cfg.parallel.layout()
    if torch.cuda.is_available():
        from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed

        from k2_megatron.megatron import initialize_model_parallel

        local_rank = int(os.environ.get("LOCAL_RANK", 0))
        torch.cuda.set_device(local_rank)
        if not dist.is_initialized():
            if "MASTER_ADDR" not in os.environ:
                os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=os.environ.get("MASTER_PORT", "29511"),
                                  RANK="0", WORLD_SIZE="1")
            dist.init_process_group("nccl")
        initialize_model_parallel(layout)
        torch.manual_seed(cfg.train.seed)
        model_parallel_cuda_manual_seed(cfg.train.seed)
    else:
        from k2_megatron.megatron import init_distributed_cpu

        init_distributed_cpu(layout, seed=cfg.train.seed)


def _teardown() -> None:
    if torch.cuda.is_available():
        from megatron.core import parallel_state

        parallel_state.destroy_model_parallel()
        if dist.is_initialized():
            dist.destroy_process_group()
    else:
        from k2_megatron.megatron import teardown_distributed_cpu

        teardown_distributed_cpu()


# ----- data -----

def _prepare_data(cfg: PretrainConfig):
    """(tokenizer, train prefixes, valid prefixes); rank 0 builds the cached corpus data first."""
    from k2_megatron.data import load_tokenizer, prepare_corpus_data

    d = cfg.data
    rank = dist.get_rank()
    result = None
    for turn in (0, 1):  # rank 0 builds (train the BPE, tokenise), then the others read the cache
        if (rank == 0) == (turn == 0):
            tok = load_tokenizer(d.tokenizer)
            if d.train_prefix is None:
                prepared = prepare_corpus_data(tok)
                result = (tok, [prepared.train_prefix], [prepared.valid_prefix])
            else:
                result = (tok, list(d.train_prefix), list(d.valid_prefix))
        dist.barrier()
    return result


def _forward_step(data_iterator, model, return_schedule_plan: bool = False):
    batch = next(data_iterator)
    dev = torch.cuda.current_device() if torch.cuda.is_available() else "cpu"
    tokens = batch["tokens"].to(dev, non_blocking=True)
    labels = batch["labels"].to(dev, non_blocking=True)
    loss_mask = batch["loss_mask"].to(dev, non_blocking=True).float()
    if return_schedule_plan:  # megatron's combined 1F1B (EP all-to-all overlap) runs the layers itself
        plan = model.build_schedule_plan(tokens, batch["position_ids"].to(dev), None, labels=labels)
        return plan, partial(_loss_func, loss_mask)
    output = model(tokens, batch["position_ids"].to(dev), None, labels=labels)
    return output, partial(_loss_func, loss_mask)


def _loss_func(loss_mask, output_tensor):
    loss = (output_tensor.float() * loss_mask).sum() / loss_mask.sum()
    return loss, {"lm loss": loss.detach().clone()}  # megatron divides `loss` in place by num_microbatches


# ----- model -----

def _build_model(cfg: PretrainConfig, k2cfg):
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig

    from k2_megatron.megatron import activation_memory, build_k2_model, to_transformer_config

    layout = cfg.parallel.layout()
    dtype = torch.bfloat16 if cfg.model.params_dtype == "bfloat16" else torch.float32
    memory = cfg.memory.options()
    try:
        activation_memory.check_supported(memory)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    overlap = cfg.parallel
    tc = to_transformer_config(k2cfg, layout, params_dtype=dtype, bias_update_rate=cfg.model.bias_update_rate,
                               overlap_moe_expert_parallel_comm=overlap.overlap_moe_expert_parallel_comm,
                               delay_wgrad_compute=overlap.delay_wgrad_compute,
                               **activation_memory.transformer_config_overrides(memory))
    # Always megatron's DistributedOptimizer (ZeRO-1; at DP=1 nothing is sharded): one code path for every
    # data-parallel size, and each matrix's Newton-Schulz done once per data-parallel group.
    ddp_config = DistributedDataParallelConfig(use_distributed_optimizer=True, grad_reduce_in_fp32=True,
                                               overlap_grad_reduce=False, bucket_size=None,
                                               delay_wgrad_compute=overlap.delay_wgrad_compute)
    chunks = []
    vpp = layout.virtual_stages if layout.virtual_stages > 1 else None
    for vp in range(vpp or 1):
        model = build_k2_model(k2cfg, tc, vp_stage=vp if vpp else None)
        activation_memory.apply_activation_memory(model, memory)
        if dtype == torch.bfloat16:
            from megatron.core.transformer.module import Float16Module

            model = Float16Module(tc, model)
        if torch.cuda.is_available():
            model.cuda(torch.cuda.current_device())
        chunks.append(DistributedDataParallel(config=tc, ddp_config=ddp_config, module=model,
                                              disable_bucketing=len(chunks) > 0))
    return tc, chunks


def _routers(chunks):
    out = []
    for chunk in chunks:
        for name, m in chunk.named_modules():
            if hasattr(m, "expert_bias") and hasattr(m, "local_tokens_per_expert"):
                layer = getattr(m, "layer_number", None)
                out.append((f"layers.{layer - 1}" if layer is not None else name, m))
    return out


def _parameter_counts(chunks, k2cfg) -> tuple[int, int]:
    """(total, activated per token) parameters of the whole model (summed over pipeline/expert ranks)."""
    from megatron.core import parallel_state

    total = active = 0
    frac = k2cfg.num_experts_per_tok / max(k2cfg.n_routed_experts, 1)
    for chunk in chunks:
        for name, param in chunk.module.named_parameters():
            n = param.numel()
            is_expert = not getattr(param, "allreduce", True)
            if is_expert:
                # local experts: scale to all experts over EP, activated fraction k/E
                total += n * parallel_state.get_expert_model_parallel_world_size()
                active += n * parallel_state.get_expert_model_parallel_world_size() * frac
            else:
                total += n
                active += n
    t = torch.tensor([float(total), float(active)], dtype=torch.float64)
    if parallel_state.get_pipeline_model_parallel_world_size() > 1:
        dist.all_reduce(t, group=parallel_state.get_pipeline_model_parallel_group())
    tp = parallel_state.get_tensor_model_parallel_world_size()
    return int(t[0]) * tp, int(t[1]) * tp  # approximately: TP shards most weights


# ----- the run -----

class _StopSignal:
    """SIGTERM / SIGINT: finish the current step, checkpoint, stop. A second SIGINT interrupts at once."""

    def __init__(self):
        self.received = None
        self.previous = {}

    def install(self):
        for sig in (signal.SIGTERM, signal.SIGINT):
            try:
                self.previous[sig] = signal.signal(sig, self._handler)
            except ValueError:  # not the main thread
                pass

    def _handler(self, signum, frame):
        if self.received is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.received = signal.Signals(signum).name

    def restore(self):
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)


def _any_rank(flag: bool) -> bool:
    if dist.get_world_size() == 1:
        return flag
    t = torch.tensor([1.0 if flag else 0.0], device="cuda" if torch.cuda.is_available() else "cpu")
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def pretrain(cfg: PretrainConfig, *, step_callback=None, _before_publish=None) -> dict:
    """Runs the pretraining described by ``cfg`` on this process (one rank of a torchrun job, or alone).

    Returns (on every rank; figures are global): {"losses": [per-step train loss], "valid": [(step, loss)],
    "final_step", "stopped_by" (None, "SIGTERM", "SIGINT", "max_wall_seconds"), "unigram_baseline",
    "checkpoint", "plot", "seconds"}. ``step_callback(step, metrics)`` is called after each step (tests)."""
    from megatron.core import parallel_state
    from megatron.core.distributed.finalize_model_grads import finalize_model_grads
    from megatron.core.optimizer import OptimizerConfig
    from megatron.core.pipeline_parallel import get_forward_backward_func

    from k2_megatron.checkpoint.errors import CheckpointError, CheckpointMismatchError
    from k2_megatron.checkpoint.megatron import latest_checkpoint, load_checkpoint, save_checkpoint
    from k2_megatron.data import SampleStream, build_pretraining_datasets, unigram_baseline, validation_batches
    from k2_megatron.megatron.optimizer import MuonClipConfig, get_muonclip_optimizer
    from k2_megatron.training.logging import RunLogger, plot_history
    from k2_megatron.training.schedule import set_lr

    t_start = time.time()
    cfg.validate()
    stop = _StopSignal()
    _initialize(cfg)
    try:
        world = dist.get_world_size()
        rank = dist.get_rank()
        dp, layout = cfg.layout(world)
        sched = cfg.schedule()
        tok, train_prefix, valid_prefix = _prepare_data(cfg)
        k2cfg = cfg.k2_config(tok.vocab_size)
        seq, mbs = cfg.data.seq_length, cfg.train.micro_batch_size
        train_samples = cfg.data.train_samples or cfg.train.iters * layout.global_batch_size
        if train_samples < cfg.train.iters * layout.global_batch_size:
            raise ConfigError(f"data.train_samples={train_samples} is fewer than train.iters x global batch = "
                              f"{cfg.train.iters} x {layout.global_batch_size}")
        train_ds, valid_ds = build_pretraining_datasets(tok, seq, train_prefix, valid_prefix,
                                                        train_samples=train_samples, seed=cfg.data.seed)
        dp_rank = parallel_state.get_data_parallel_rank()
        stream = SampleStream(train_ds, mbs, dp_rank=dp_rank, dp_size=dp)

        tc, chunks = _build_model(cfg, k2cfg)
        routers = _routers(chunks)
        o = cfg.optim
        opt_config = OptimizerConfig(optimizer="adam", lr=o.peak_lr, min_lr=o.min_lr, weight_decay=o.weight_decay,
                                     adam_beta1=o.adam_beta1, adam_beta2=o.adam_beta2, adam_eps=o.adam_eps,
                                     bf16=cfg.model.params_dtype == "bfloat16", params_dtype=tc.params_dtype,
                                     use_distributed_optimizer=True, clip_grad=cfg.train.clip_grad)
        muon = MuonClipConfig(momentum=o.momentum, qk_clip_tau=o.qk_clip_tau,
                              ns_dtype=getattr(torch, o.ns_dtype))
        opt = get_muonclip_optimizer(opt_config, chunks, muon)

        # finalize hook: gradient reduction + expert-bias update (megatron), with the expert loads read first
        loads: dict[str, torch.Tensor] = {}

        def finalize(model, num_tokens=None, **kwargs):
            loads.clear()
            if routers:
                stacked = torch.stack([r.local_tokens_per_expert.detach().float().clone() for _, r in routers])
                if dp > 1:
                    dist.all_reduce(stacked, group=parallel_state.get_data_parallel_group(with_context_parallel=True))
                for (name, _), row in zip(routers, stacked):
                    loads[name] = row
            finalize_model_grads(model, num_tokens)

        tc.finalize_model_grads_func = finalize
        if dp > 1 and len(chunks) > 1:
            tc.no_sync_func = [c.no_sync for c in chunks]
        elif dp > 1:
            tc.no_sync_func = chunks[0].no_sync

        # resume: this run's own latest checkpoint first (a restarted job continues where it stopped); else
        # checkpoint.load, fully ("resume") or as the start of a new stage ("weights": model + optimizer state,
        # step 0, fresh data stream; the rope settings may change, e.g. a YaRN long-context stage)
        expected = {"model_config": _jsonable(dataclasses.asdict(k2cfg)),
                    "tokenizer": tok.name, "seq_length": seq}
        ckpt_root = cfg.checkpoint.dir or os.path.join(cfg.output.dir, "checkpoints")
        start_step, history = 0, None
        path = latest_checkpoint(ckpt_root) if cfg.checkpoint.resume else None
        mode = "resume"
        if path is None and cfg.checkpoint.load:
            path, mode = latest_checkpoint(cfg.checkpoint.load), cfg.checkpoint.load_mode
            if path is None:
                raise CheckpointError(f"checkpoint.load={cfg.checkpoint.load!r}: no checkpoint there (no 'latest' "
                                      "pointer and no k2_meta.json)")
        if path is not None and mode == "resume":
            meta = load_checkpoint(path, chunks, opt, expected)
            try:
                stream.load_state_dict(meta["data"])
            except ValueError as e:
                saved = meta.get("train_samples")
                hint = (f" Its training dataset was built for data.train_samples={saved}, this run's for "
                        f"{train_samples} (train.iters changed?), and the sample order depends on it: resume with "
                        f"data.train_samples={saved} and train.iters <= {saved // layout.global_batch_size}, or "
                        "set a larger data.train_samples from the start of runs that may be extended."
                        if saved and saved != train_samples else "")
                raise CheckpointMismatchError(f"checkpoint {path}: {e}.{hint}") from None
            start_step, history = meta["step"], meta.get("history")
        elif path is not None:
            stage_independent = {"rope_scaling", "max_position_embeddings"}
            load_checkpoint(path, chunks, opt, {
                "model_config": {k: v for k, v in expected["model_config"].items() if k not in stage_independent},
                "tokenizer": tok.name}, ignore_model_keys=stage_independent)
        logger = RunLogger(cfg.output.dir, total_steps=cfg.train.iters, start_step=start_step, enabled=rank == 0,
                           progress_bar=cfg.output.progress_bar, tensorboard=cfg.output.tensorboard, history=history)
        if path is not None:
            logger.print(f"resumed from {path} at step {start_step}" if mode == "resume" else
                         f"loaded weights and optimizer state from {path}; starting a new stage at step 0")
        baseline = unigram_baseline(train_prefix, valid_prefix, tok.vocab_size) if rank == 0 else None
        logger.history["unigram_baseline"] = baseline
        n_total, n_active = _parameter_counts(chunks, k2cfg)
        logger.print(f"k2-pretrain: {cfg.model.preset} ({n_total / 1e6:.2f}M parameters, {n_active / 1e6:.2f}M "
                     f"activated) | world {world} = TP{cfg.parallel.tensor} x PP{cfg.parallel.pipeline}"
                     f"{f' (x{cfg.parallel.virtual_stages} virtual)' if cfg.parallel.virtual_stages else ''} x "
                     f"DP{dp} (EP{cfg.parallel.expert}{', ZeRO-1' if dp > 1 else ''}) | "
                     f"{layout.global_batch_tokens} tokens/step = {layout.global_batch_size} x {seq} "
                     f"({layout.num_micro_batches} micro-batches of {mbs} per rank) | {cfg.train.iters} steps | "
                     f"tokenizer {tok.name} | unigram baseline {baseline:.4f} nats/token"
                     if rank == 0 else "")

        fb = get_forward_backward_func()
        n_micro = layout.num_micro_batches
        flops_per_token = 6 * n_active + 6 * k2cfg.num_hidden_layers * seq * k2cfg.num_attention_heads * (
            k2cfg.qk_nope_head_dim + k2cfg.qk_rope_head_dim + k2cfg.v_head_dim) / 2
        pp_last = parallel_state.is_pipeline_last_stage(ignore_virtual=True)

        def run_microbatches(batches, forward_only):
            iters = iter(batches) if len(chunks) == 1 else [iter(list(batches)) for _ in chunks]
            return fb(forward_step_func=_forward_step, data_iterator=iters,
                      model=chunks if len(chunks) > 1 else chunks[0], num_microbatches=len(batches),
                      seq_length=seq, micro_batch_size=mbs, forward_only=forward_only)

        def global_mean(values: list) -> float:
            """Mean of the last stage's per-micro-batch losses over data-parallel ranks, on every rank."""
            t = torch.tensor([float(sum(float(v) for v in values)), float(len(values))], dtype=torch.float64)
            if world > 1:
                dist.all_reduce(t)  # only last-stage ranks contribute
            return float(t[0] / t[1])

        def validate(step):
            for c in chunks:
                c.eval()
            batches = list(validation_batches(valid_ds, mbs, cfg.train.eval_micro_batches, dp_rank=dp_rank,
                                              dp_size=dp))
            out = run_microbatches(batches, forward_only=True)
            for c in chunks:
                c.train()
            opt.reset_max_logits()  # evaluation forwards must not feed the next QK-Clip step
            for _, router in routers:  # nor the expert-bias update
                router.local_tokens_per_expert.zero_()
            loss = global_mean([r["lm loss"] for r in out] if pp_last else [])
            logger.log_validation(step, loss)
            return loss

        def save(step):
            meta = {"data": stream.state_dict(), "train_samples": train_samples, "world_size": world,
                    "config": cfg.to_dict(),
                    "history": logger.history if rank == 0 else None, **expected}
            path = save_checkpoint(ckpt_root, step, chunks, opt, meta, keep=cfg.checkpoint.keep,
                                   _before_publish=_before_publish)
            logger.print(f"saved checkpoint {path}")
            return path

        stop.install()
        losses, valid = [], []
        saved_path, stopped_by, last_saved = None, None, start_step
        step = start_step
        while step < cfg.train.iters:
            t0 = time.time()
            lr = set_lr(opt, sched, step)
            batches = [stream.next_batch() for _ in range(n_micro)]
            for c in chunks:
                c.zero_grad_buffer()
            opt.zero_grad()
            out = run_microbatches(batches, forward_only=False)
            ok, grad_norm, _ = opt.step()
            if not ok:
                logger.print(f"step {step}: skipped (non-finite gradients)")
            # per layer: max logit over the global batch and all heads, clipped heads (0 without QK-Clip)
            stats = {name: (float(s.max_logit), s.num_clipped) for name, s in opt.qk_clip_stats.items()}
            loss = global_mean([r["lm loss"] for r in out] if pp_last else [])
            if world > 1:  # stats/loads of all pipeline stages to rank 0
                gathered = [None] * world
                dist.all_gather_object(gathered, (stats, {k: v.tolist() for k, v in loads.items()}))
                stats, load_lists = {}, {}
                for s, l in gathered:
                    stats.update(s)
                    load_lists.update(l)
            else:
                load_lists = {k: v.tolist() for k, v in loads.items()}
            step += 1
            dt = time.time() - t0
            expert_load = {k: max(v) / (sum(v) / len(v)) for k, v in sorted(load_lists.items()) if sum(v) > 0}
            max_logits = {k: v[0] for k, v in sorted(stats.items(), key=lambda kv: _layer_index(kv[0]))}
            clipped = {k: v[1] for k, v in sorted(stats.items(), key=lambda kv: _layer_index(kv[0]))}
            tokens_per_s = layout.global_batch_tokens / dt
            mfu = (flops_per_token * tokens_per_s / (world * cfg.output.gpu_peak_tflops * 1e12)
                   if torch.cuda.is_available() else None)
            metrics = {"step": step, "loss": loss, "lr": lr,
                       "grad_norm": None if grad_norm is None else float(grad_norm),
                       "tokens_per_s": tokens_per_s, "mfu": mfu, "max_logits": max_logits,
                       "max_logit": max(max_logits.values()) if max_logits else None,
                       "clipped_heads": clipped, "expert_load": expert_load, "skipped": not ok}
            losses.append(loss)
            logger.log_step(metrics, print_line=step % cfg.train.log_interval == 0 or step == cfg.train.iters)
            if cfg.train.eval_interval and step % cfg.train.eval_interval == 0 and step < cfg.train.iters:
                valid.append((step, validate(step)))
            if step_callback is not None:
                step_callback(step, metrics)
            over_time = (cfg.train.max_wall_seconds is not None
                         and time.time() - t_start > cfg.train.max_wall_seconds)
            signalled = _any_rank(stop.received is not None or over_time)
            if signalled:
                stopped_by = stop.received or ("max_wall_seconds" if over_time else "another rank")
                saved_path = save(step)
                last_saved = step
                logger.print(f"stopped by {stopped_by} after step {step}; resume with the same command")
                break
            if cfg.checkpoint.save_interval and step % cfg.checkpoint.save_interval == 0:
                saved_path = save(step)
                last_saved = step
        stop.restore()
        if stopped_by is None:
            valid.append((step, validate(step)))
            if cfg.checkpoint.save_at_end and last_saved != step:
                saved_path = save(step)
        plot = None
        if rank == 0 and cfg.output.plot and stopped_by is None:
            plot = plot_history(logger.history, os.path.join(cfg.output.dir, "pretrain.png"), tau=o.qk_clip_tau,
                                title=f"{cfg.model.preset} pretraining (MuonClip, tau={o.qk_clip_tau})")
        seconds = time.time() - t_start
        if rank == 0 and stopped_by is None:
            final_valid = valid[-1][1] if valid else float("nan")
            previous = logger.history["train"]  # a run resumed at its last step trains no more
            final_train = losses[-1] if losses else previous[-1]["loss"] if previous else float("nan")
            logger.print(f"done: {step} steps in {seconds:.0f} s | final train loss {final_train:.4f}"
                         f" | validation loss {final_valid:.4f} | unigram baseline {baseline:.4f} "
                         f"({abs(baseline - final_valid):.3f} nats {'better' if final_valid < baseline else 'worse'})")
            if plot:
                logger.print(f"plot: {os.path.abspath(plot)}")
            tb_dir = os.path.abspath(os.path.join(cfg.output.dir, "tensorboard"))
            logger.print(f"TensorBoard: tensorboard --logdir {tb_dir}")
        logger.close()
        return {"losses": losses, "valid": valid, "final_step": step, "stopped_by": stopped_by,
                "unigram_baseline": baseline, "checkpoint": saved_path, "plot": plot, "seconds": seconds,
                "history": logger.history if rank == 0 else None}
    finally:
        stop.restore()
        _teardown()


def _layer_index(name: str) -> int:
    parts = name.split(".")
    return int(parts[1]) if len(parts) > 1 and parts[1].isdigit() else 0


def _jsonable(obj):
    return json.loads(json.dumps(obj, default=str))


# ----- command line -----

def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="k2-pretrain", description="Pretrain a K2 model on megatron-core with MuonClip. With no arguments: "
        "k2-tiny on the bundled Shakespeare corpus, on this machine, in a few minutes.",
        epilog="overrides: section.key=value, e.g. train.iters=20 optim.peak_lr=3e-3 parallel.pipeline=2 "
               "optim.qk_clip_tau=null model.overrides.num_hidden_layers=2")
    parser.add_argument("--config", default=None, help="YAML config (default: the tiny CPU recipe, "
                        "examples/configs/k2_tiny_cpu.yaml)")
    parser.add_argument("--dry-run", action="store_true", help="print the per-rank parameter and memory plan of "
                        "the config on a simulated world, build nothing real, then exit")
    parser.add_argument("--world-size", type=int, default=None, help="simulated world size for --dry-run "
                        "(default: the config's plan.world_size, else WORLD_SIZE)")
    parser.add_argument("overrides", nargs="*", help="section.key=value")
    return parser


def _quiet_libraries() -> None:
    """megatron-core and torch.distributed.checkpoint warn about optional packages (Transformer Engine, Apex) and
    deprecations on every rank; the command line keeps the console for the run's own output."""
    import logging
    import warnings

    for module in ("megatron", "torch.distributed", "torch.utils.cpp_extension"):
        warnings.filterwarnings("ignore", module=module.replace(".", r"\."))
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    # megatron reads .grad of non-leaf fp32 master views under cpu_compat's device mode (harmless)
    warnings.filterwarnings("ignore", message="The .grad attribute of a Tensor that is not a leaf")
    for name in ("megatron", "torch.distributed.checkpoint", "torch.utils.cpp_extension"):
        logging.getLogger(name).setLevel(logging.ERROR)


def main(argv: list[str] | None = None) -> int:
    """Console entry point (``k2-pretrain``)."""
    args = build_parser().parse_args(argv)
    _quiet_libraries()
    try:
        cfg = load_config(args.config, args.overrides)
    except ConfigError as e:
        print(f"k2-pretrain: config error: {e}", file=sys.stderr)
        return 2
    if args.dry_run:
        from k2_megatron.training.plan import dry_run

        return dry_run(cfg, world_size=args.world_size)
    from k2_megatron.checkpoint.errors import CheckpointError

    try:
        pretrain(cfg)
    except (ConfigError, CheckpointError) as e:
        print(f"k2-pretrain: {type(e).__name__}: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
