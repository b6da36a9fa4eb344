"""The training loop of ``k2-pretrain`` as an object, so that a run and its rehearsal (k2_megatron.rehearsal) execute
the same code: ``Trainer(cfg).setup()`` initialises the process groups, the data, the rank's model chunks and
MuonClip, and resumes; ``step()`` is one optimizer step; ``evaluate()`` the validation loss; ``save()`` a
checkpoint; ``run()`` the whole loop (stop signals, periodic validation and checkpoints, the plot); ``close()``
tears the process groups down.

One optimizer step: set the WSD learning rate; zero the gradient buffers; megatron-core's forward_backward_func
(1F1B with pipeline parallelism, interleaved 1F1B with virtual stages) over the step's micro-batches, whose
finalize hook reduces gradients over data-parallel ranks and updates the aux-loss-free expert biases; MuonClip
(``get_muonclip_optimizer``: Muon on hidden matrices, AdamW elsewhere, QK-Clip with global max logits, ZeRO-1
when data-parallel > 1); then the step's metrics, read on the host once.

Every value the loop reduces over ranks goes through ``all_reduce_on_backend`` (k2_megatron.megatron.layout), on the
device of the group's backend: NCCL refuses host tensors.
"""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import time
from functools import partial

import torch
import torch.distributed as dist

from k2_megatron.config import ConfigError, PretrainConfig


# ----- distributed setup -----

def initialize_distributed(cfg: PretrainConfig) -> None:
    """The process groups of ``cfg``'s layout on this rank (NCCL on a GPU, gloo on a CPU) and the seeds. The layout
    is checked against the world size first (ConfigError naming the key, before megatron's initialize_model_parallel
    would raise on every rank); anything set up before a failure is torn down."""
    layout = cfg.parallel.layout()
    cfg.layout(_launch_world_size())
    if not torch.cuda.is_available():
        from k2_megatron.megatron import init_distributed_cpu

        init_distributed_cpu(layout, seed=cfg.train.seed, timeout_minutes=cfg.parallel.process_group_timeout_minutes)
        return
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed

    from k2_megatron.megatron import initialize_model_parallel

    created_group = not dist.is_initialized()
    try:
        local_rank = int(os.environ.get("LOCAL_RANK", 0))
        torch.cuda.set_device(local_rank)
        if created_group:
            if "MASTER_ADDR" not in os.environ:
                os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=os.environ.get("MASTER_PORT", "29511"),
                                  RANK="0", WORLD_SIZE="1")
            dist.init_process_group("nccl", timeout=cfg.parallel.process_group_timeout())
        initialize_model_parallel(layout, timeout_minutes=cfg.parallel.process_group_timeout_minutes)
    except BaseException:
        parallel_state.destroy_model_parallel()
        if created_group and dist.is_initialized():
            dist.destroy_process_group()
        raise
    torch.manual_seed(cfg.train.seed)
    model_parallel_cuda_manual_seed(cfg.train.seed)


def _launch_world_size() -> int:
    """The world size of this job: the process group's, or the one it will have (torchrun's WORLD_SIZE; 1 alone)."""
    return dist.get_world_size() if dist.is_initialized() else int(os.environ.get("WORLD_SIZE", 1))


def teardown_distributed() -> None:
    if torch.cuda.is_available():
        from megatron.core import parallel_state

        parallel_state.destroy_model_parallel()
        if dist.is_initialized():
            dist.destroy_process_group()
    else:
        from k2_megatron.megatron import teardown_distributed_cpu

        teardown_distributed_cpu()


# ----- data -----

class CorpusData:
    """The run's tokens: the tokenizer, this data-parallel rank's training sample stream and the held-out set
    (rank 0 builds the cached corpus data first, the others then read it)."""

    def __init__(self, cfg: PretrainConfig, layout, dp: int, dp_rank: int):
        from k2_megatron.data import SampleStream, pretraining_datasets

        tok, self.train_prefix, self.valid_prefix = _prepare_tokens(cfg)
        self.vocab_size, self.tokenizer_name = tok.vocab_size, tok.name
        self.train_samples = cfg.data.train_samples or cfg.train.iters * layout.global_batch_size
        if self.train_samples < cfg.train.iters * layout.global_batch_size:
            raise ConfigError(f"data.train_samples={self.train_samples} is fewer than train.iters x global batch = "
                              f"{cfg.train.iters} x {layout.global_batch_size}")
        train_ds, self.valid_ds, self.train_samples = pretraining_datasets(
            tok, cfg.data.seq_length, self.train_prefix, self.valid_prefix, train_samples=self.train_samples,
            seed=cfg.data.seed, index_dir=cfg.data.index_dir, cache_dir=cfg.dataset_cache_dir(),
            built_samples=cfg.data.train_samples)
        self.micro_batch_size, self.eval_micro_batches = cfg.train.micro_batch_size, cfg.train.eval_micro_batches
        self.dp, self.dp_rank = dp, dp_rank
        self.stream = SampleStream(train_ds, self.micro_batch_size, dp_rank=dp_rank, dp_size=dp)

    def next_batch(self) -> dict:
        return self.stream.next_batch()

    def validation_batches(self) -> list:
        from k2_megatron.data import validation_batches

        return list(validation_batches(self.valid_ds, self.micro_batch_size, self.eval_micro_batches,
                                       dp_rank=self.dp_rank, dp_size=self.dp))

    def state_dict(self) -> dict:
        return self.stream.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.stream.load_state_dict(state)

    def unigram_baseline(self) -> float:
        from k2_megatron.data import unigram_baseline

        return unigram_baseline(self.train_prefix, self.valid_prefix, self.vocab_size)


def _prepare_tokens(cfg: PretrainConfig):
    """(tokenizer, train prefixes, valid prefixes); rank 0 builds the cached corpus data first."""
    from k2_megatron.data import load_tokenizer, prepare_corpus_data, resolve_blend

    d = cfg.data
    rank = dist.get_rank()
    result = None
    for turn in (0, 1):  # rank 0 builds (train the BPE, tokenise), then the others read the cache
        if (rank == 0) == (turn == 0):
            tok = _input_or_config_error("data.tokenizer", d.tokenizer, load_tokenizer, d.tokenizer)
            if d.train_prefix is None:
                prepared = prepare_corpus_data(tok)
                result = (tok, [prepared.train_prefix], [prepared.valid_prefix])
            else:
                result = (tok, list(d.train_prefix), list(d.valid_prefix))
                for key, prefixes in (("data.train_prefix", d.train_prefix), ("data.valid_prefix", d.valid_prefix)):
                    _input_or_config_error(key, prefixes, resolve_blend, key, prefixes, weighted=False)
        dist.barrier()
    return result


def _input_or_config_error(key: str, value, read, *args, **kwargs):
    """``read(*args, **kwargs)`` of an input the config names (a tokenizer, dataset prefixes); a missing or
    unreadable one is a ConfigError naming ``key`` and its value."""
    try:
        return read(*args, **kwargs)
    except (OSError, ValueError) as e:
        message = str(e) if str(e).startswith(key) else f"{key}={value!r}: {e}"
        raise ConfigError(message) from None


def forward_step(data_iterator, model, return_schedule_plan: bool = False):
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


# ----- model and optimizer -----

def build_model(cfg: PretrainConfig, k2cfg):
    """(TransformerConfig, this rank's model chunks wrapped in megatron's DistributedDataParallel)."""
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
                                               overlap_grad_reduce=overlap.overlap_grad_reduce,
                                               overlap_param_gather=overlap.overlap_param_gather,
                                               bucket_size=overlap.ddp_bucket_size,
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


def build_optimizer(cfg: PretrainConfig, tc, chunks):
    """MuonClip over the model chunks (ZeRO-1 through megatron's DistributedOptimizer)."""
    from megatron.core.optimizer import OptimizerConfig

    from k2_megatron.megatron.optimizer import MuonClipConfig, get_muonclip_optimizer

    o = cfg.optim
    opt_config = OptimizerConfig(optimizer="adam", lr=o.peak_lr, min_lr=o.min_lr, weight_decay=o.weight_decay,
                                 adam_beta1=o.adam_beta1, adam_beta2=o.adam_beta2, adam_eps=o.adam_eps,
                                 bf16=cfg.model.params_dtype == "bfloat16", params_dtype=tc.params_dtype,
                                 use_distributed_optimizer=True, clip_grad=cfg.train.clip_grad)
    muon = MuonClipConfig(momentum=o.momentum, qk_clip_tau=o.qk_clip_tau, ns_dtype=getattr(torch, o.ns_dtype),
                          buffer_bytes=cfg.memory.muon_buffer_mib * 2**20)
    return get_muonclip_optimizer(opt_config, chunks, muon)


def _routers(chunks):
    out = []
    for chunk in chunks:
        for name, m in chunk.named_modules():
            if hasattr(m, "expert_bias") and hasattr(m, "local_tokens_per_expert"):
                layer = getattr(m, "layer_number", None)
                out.append((f"layers.{layer - 1}" if layer is not None else name, m))
    return out


def parameter_counts(chunks, k2cfg) -> tuple[int, int]:
    """(total, activated per token) parameters of the whole model (summed over pipeline/expert ranks)."""
    from megatron.core import parallel_state

    from k2_megatron.megatron.layout import all_reduce_on_backend

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
    counts = [float(total), float(active)]
    if parallel_state.get_pipeline_model_parallel_world_size() > 1:
        counts = all_reduce_on_backend(torch.tensor(counts, dtype=torch.float64),
                                       group=parallel_state.get_pipeline_model_parallel_group()).tolist()
    tp = parallel_state.get_tensor_model_parallel_world_size()
    return int(counts[0]) * tp, int(counts[1]) * tp  # approximately: TP shards most weights


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
        self.previous = {}


def _any_rank(flag: bool) -> bool:
    from k2_megatron.megatron.layout import all_reduce_on_backend

    if dist.get_world_size() == 1:
        return flag
    return bool(all_reduce_on_backend(torch.tensor([1.0 if flag else 0.0]), op=dist.ReduceOp.MAX).item())


class Trainer:
    """The pretraining run of ``cfg`` on this process (one rank of a torchrun job, or alone); see the module.

    data: a factory ``(cfg, layout, dp, dp_rank) -> data`` with CorpusData's interface (default: CorpusData).
    step_callback(step, metrics): called after each step of run() (tests). _before_publish: passed to
    save_checkpoint (tests)."""

    def __init__(self, cfg: PretrainConfig, *, data=CorpusData, step_callback=None, _before_publish=None):
        self.cfg = cfg
        self._make_data = data
        self.step_callback = step_callback
        self._before_publish = _before_publish
        self.t_start = time.time()
        self.stop = _StopSignal()
        self.iteration = 0
        self._initialized = False
        self.run_lock = None

    # -- setup --

    def setup(self) -> None:
        from megatron.core import parallel_state
        from megatron.core.pipeline_parallel import get_forward_backward_func

        cfg = self.cfg
        cfg.validate()
        initialize_distributed(cfg)
        self._initialized = True
        self.world, self.rank = dist.get_world_size(), dist.get_rank()
        self.run_lock = self._lock_directories()
        self.dp, self.layout = cfg.layout(self.world)
        self.schedule = cfg.schedule()
        self.data = self._make_data(cfg, self.layout, self.dp, parallel_state.get_data_parallel_rank())
        self.k2cfg = cfg.k2_config(self.data.vocab_size)
        self.build_model()
        self.build_optimizer()
        self._install_finalize()
        self.expected_meta = {"model_config": _jsonable(dataclasses.asdict(self.k2cfg)),
                              "tokenizer": self.data.tokenizer_name, "seq_length": cfg.data.seq_length}
        self.checkpoint_root = cfg.checkpoint.dir or os.path.join(cfg.output.dir, "checkpoints")
        resumed, mode, history = self._resume()
        self._start_logger(history)
        if resumed is not None:
            loaded = "weights and optimizer state" if mode == "weights" else "weights (fresh optimizer)"
            self.logger.print(f"resumed from {resumed} at step {self.iteration}" if mode == "resume" else
                              f"loaded {loaded} from {resumed}; starting a new stage at step 0")
        self.baseline = self.data.unigram_baseline() if self.rank == 0 else None
        self.logger.history["unigram_baseline"] = self.baseline
        n_total, n_active = parameter_counts(self.chunks, self.k2cfg)
        self._print_header(n_total, n_active)
        self.forward_backward_func = get_forward_backward_func()
        k = self.k2cfg
        self.flops_per_token = 6 * n_active + 6 * k.num_hidden_layers * cfg.data.seq_length * \
            k.num_attention_heads * (k.qk_nope_head_dim + k.qk_rope_head_dim + k.v_head_dim) / 2
        self.pp_last = parallel_state.is_pipeline_last_stage(ignore_virtual=True)

    def _lock_directories(self):
        """One run at a time in output.dir and checkpoint.dir (k2_megatron.training.run_lock): rank 0 locks them
        before anything is written there; every rank stops if another run holds them."""
        from k2_megatron.training.run_lock import locked_directories, take_run_lock

        return take_run_lock(locked_directories(self.cfg.output.dir, self.cfg.checkpoint.dir), rank=self.rank,
                             world=self.world)

    def build_model(self) -> None:
        self.tc, self.chunks = build_model(self.cfg, self.k2cfg)
        self.routers = _routers(self.chunks)

    def build_optimizer(self) -> None:
        self.opt = build_optimizer(self.cfg, self.tc, self.chunks)

    def _install_finalize(self) -> None:
        """megatron's finalize hook (gradient reduction + expert-bias update), with the expert loads read first."""
        from megatron.core import parallel_state
        from megatron.core.distributed.finalize_model_grads import finalize_model_grads

        from k2_megatron.megatron.layout import all_reduce_on_backend

        self.loads: dict[str, torch.Tensor] = {}
        routers, dp, loads = self.routers, self.dp, self.loads

        def finalize(model, num_tokens=None, **kwargs):
            loads.clear()
            if routers:
                stacked = torch.stack([r.local_tokens_per_expert.detach().float().clone() for _, r in routers])
                if dp > 1:
                    stacked = all_reduce_on_backend(
                        stacked, group=parallel_state.get_data_parallel_group(with_context_parallel=True))
                for (name, _), row in zip(routers, stacked):
                    loads[name] = row
            finalize_model_grads(model, num_tokens)

        self.tc.finalize_model_grads_func = finalize
        if dp > 1 and len(self.chunks) > 1:
            self.tc.no_sync_func = [c.no_sync for c in self.chunks]
        elif dp > 1:
            self.tc.no_sync_func = self.chunks[0].no_sync

    def _resume(self):
        """This run's own latest checkpoint first (a restarted job continues where it stopped); else
        checkpoint.load, fully ("resume") or as the start of a new stage ("weights": model + optimizer state, step
        0, fresh data stream; the rope settings may change, e.g. a YaRN long-context stage). Returns (path or None,
        mode, saved history)."""
        from k2_megatron.checkpoint.errors import CheckpointError, CheckpointMismatchError
        from k2_megatron.checkpoint.megatron import latest_checkpoint, load_checkpoint

        cfg, expected = self.cfg, self.expected_meta
        path = latest_checkpoint(self.checkpoint_root) if cfg.checkpoint.resume else None
        mode, history = "resume", None
        if path is None and cfg.checkpoint.load:
            path, mode = latest_checkpoint(cfg.checkpoint.load), cfg.checkpoint.load_mode
            if path is None:
                raise CheckpointError(f"checkpoint.load={cfg.checkpoint.load!r}: no checkpoint there (no 'latest' "
                                      "pointer and no k2_meta.json)")
        if path is not None and mode == "resume":
            meta = load_checkpoint(path, self.chunks, self.opt, expected)
            try:
                self.data.load_state_dict(meta["data"])
            except ValueError as e:
                saved, ours = meta.get("train_samples"), self.data.train_samples
                hint = (f" Its training dataset was built for data.train_samples={saved}, this run's for "
                        f"{ours} (train.iters changed?), and the sample order depends on it: resume with "
                        f"data.train_samples={saved} and train.iters <= {saved // self.layout.global_batch_size}, "
                        "or set a larger data.train_samples from the start of runs that may be extended."
                        if saved and saved != ours else "")
                raise CheckpointMismatchError(f"checkpoint {path}: {e}.{hint}") from None
            self.iteration, history = meta["step"], meta.get("history")
        elif path is not None:
            stage_independent = {"rope_scaling", "max_position_embeddings"}
            load_checkpoint(path, self.chunks, self.opt, {
                "model_config": {k: v for k, v in expected["model_config"].items() if k not in stage_independent},
                "tokenizer": expected["tokenizer"]}, ignore_model_keys=stage_independent, weights_only=mode == "model")
        return path, mode, history

    def _start_logger(self, history) -> None:
        from k2_megatron.training.logging import RunLogger

        o = self.cfg.output
        self.logger = RunLogger(o.dir, total_steps=self.cfg.train.iters, start_step=self.iteration,
                                enabled=self.rank == 0, progress_bar=o.progress_bar, tensorboard=o.tensorboard,
                                history=history)

    def _print_header(self, n_total: int, n_active: int) -> None:
        if self.rank != 0:
            return
        cfg, layout, p = self.cfg, self.layout, self.cfg.parallel
        self.logger.print(
            f"k2-pretrain: {cfg.model.preset} ({n_total / 1e6:.2f}M parameters, {n_active / 1e6:.2f}M activated) | "
            f"world {self.world} = TP{p.tensor} x PP{p.pipeline}"
            f"{f' (x{p.virtual_stages} virtual)' if p.virtual_stages else ''} x DP{self.dp} "
            f"(EP{p.expert}{', ZeRO-1' if self.dp > 1 else ''}) | {layout.global_batch_tokens} tokens/step = "
            f"{layout.global_batch_size} x {cfg.data.seq_length} ({layout.num_micro_batches} micro-batches of "
            f"{cfg.train.micro_batch_size} per rank) | {cfg.train.iters} steps | tokenizer {self.data.tokenizer_name}"
            f" | unigram baseline {self.baseline:.4f} nats/token")

    # -- one step --

    def run_microbatches(self, batches: list, forward_only: bool) -> list:
        """megatron's forward_backward_func over ``batches`` (1F1B / interleaved with pipeline parallelism)."""
        chunks = self.chunks
        iters = iter(batches) if len(chunks) == 1 else [iter(list(batches)) for _ in chunks]
        return self.forward_backward_func(
            forward_step_func=forward_step, data_iterator=iters, model=chunks if len(chunks) > 1 else chunks[0],
            num_microbatches=len(batches), seq_length=self.cfg.data.seq_length,
            micro_batch_size=self.cfg.train.micro_batch_size, forward_only=forward_only)

    def forward_backward(self, batches: list) -> list:
        """Zeroes the gradient buffers and accumulates the gradients of the step's micro-batches."""
        for c in self.chunks:
            c.zero_grad_buffer()
        self.opt.zero_grad()
        return self.run_microbatches(batches, forward_only=False)

    def optimizer_step(self):
        """(ok, grad norm, zeros) of MuonClip's step."""
        return self.opt.step()

    def step(self) -> dict:
        """One optimizer step; returns its metrics (global figures, on every rank)."""
        from k2_megatron.training.schedule import set_lr

        t0 = time.time()
        lr = set_lr(self.opt, self.schedule, self.iteration)
        batches = [self.data.next_batch() for _ in range(self.layout.num_micro_batches)]
        out = self.forward_backward(batches)
        ok, grad_norm, _ = self.optimizer_step()
        if not ok:
            self.logger.print(f"step {self.iteration}: skipped (non-finite gradients)")
        self.iteration += 1
        return self.step_metrics(out, ok, grad_norm, lr, t0)

    def global_mean(self, values: list) -> float:
        """Mean of the last stage's per-micro-batch losses over data-parallel ranks, on every rank."""
        from k2_megatron.megatron.layout import all_reduce_on_backend

        t = torch.tensor([float(sum([float(v) for v in values])), float(len(values))], dtype=torch.float64)
        if self.world > 1:
            t = all_reduce_on_backend(t)  # only last-stage ranks contribute
        total, count = t.tolist()
        return total / count

    def step_metrics(self, out: list, ok: bool, grad_norm, lr: float, t0: float) -> dict:
        """The step's figures, read on the host once per step (the losses, the max logits, the expert loads)."""
        # per layer: max logit over the global batch and all heads, clipped heads (0 without QK-Clip)
        stats = {name: (float(s.max_logit), s.num_clipped) for name, s in self.opt.qk_clip_stats.items()}
        loss = self.global_mean([r["lm loss"] for r in out] if self.pp_last else [])
        load_lists = {k: v.tolist() for k, v in self.loads.items()}
        if self.world > 1:  # stats/loads of all pipeline stages to rank 0
            gathered = [None] * self.world
            dist.all_gather_object(gathered, (stats, load_lists))
            stats, load_lists = {}, {}
            for s, loads in gathered:
                stats.update(s)
                load_lists.update(loads)
        dt = time.time() - t0
        by_layer = sorted(stats.items(), key=lambda kv: _layer_index(kv[0]))
        max_logits = {k: v[0] for k, v in by_layer}
        tokens_per_s = self.layout.global_batch_tokens / dt
        mfu = (self.flops_per_token * tokens_per_s / (self.world * self.cfg.output.gpu_peak_tflops * 1e12)
               if torch.cuda.is_available() else None)
        return {"step": self.iteration, "loss": loss, "lr": lr,
                "grad_norm": None if grad_norm is None else float(grad_norm),
                "tokens_per_s": tokens_per_s, "mfu": mfu, "max_logits": max_logits,
                "max_logit": max(max_logits.values()) if max_logits else None,
                "clipped_heads": {k: v[1] for k, v in by_layer},
                "expert_load": {k: max(v) / (sum(v) / len(v)) for k, v in sorted(load_lists.items()) if sum(v) > 0},
                "skipped": not ok}

    # -- validation and checkpoints --

    def evaluate(self) -> float:
        """The validation loss (the same held-out micro-batches each time); logged at the current step."""
        for c in self.chunks:
            c.eval()
        out = self.run_microbatches(self.data.validation_batches(), forward_only=True)
        for c in self.chunks:
            c.train()
        self.opt.reset_max_logits()  # evaluation forwards must not feed the next QK-Clip step
        for _, router in self.routers:  # nor the expert-bias update
            router.local_tokens_per_expert.zero_()
        loss = self.global_mean([r["lm loss"] for r in out] if self.pp_last else [])
        self.logger.log_validation(self.iteration, loss)
        return loss

    def checkpoint_meta(self) -> dict:
        return {"data": self.data.state_dict(), "train_samples": self.data.train_samples, "world_size": self.world,
                "config": self.cfg.to_dict(), "history": self.logger.history if self.rank == 0 else None,
                **self.expected_meta}

    def save(self) -> str:
        """A checkpoint of the current step; returns its path."""
        from k2_megatron.checkpoint.megatron import save_checkpoint

        for chunk in self.chunks if self.cfg.parallel.overlap_param_gather else ():  # else gathered in the next forward
            chunk.start_param_sync(force_sync=True)
        path = save_checkpoint(self.checkpoint_root, self.iteration, self.chunks, self.opt, self.checkpoint_meta(),
                               keep=self.cfg.checkpoint.keep, _before_publish=self._before_publish)
        self.logger.print(f"saved checkpoint {path}")
        return path

    # -- the loop --

    def run(self) -> dict:
        """Steps until train.iters, a stop signal or train.max_wall_seconds. Returns (on every rank; figures are
        global): {"losses": [per-step train loss], "valid": [(step, loss)], "final_step", "stopped_by" (None,
        "SIGTERM", "SIGINT", "max_wall_seconds"), "unigram_baseline", "checkpoint", "plot", "seconds", "history"}."""
        cfg = self.cfg
        self.stop.install()
        losses, valid = [], []
        saved_path, stopped_by, last_saved = None, None, self.iteration
        while self.iteration < cfg.train.iters:
            metrics = self.step()
            step = self.iteration
            losses.append(metrics["loss"])
            self.logger.log_step(metrics, print_line=step % cfg.train.log_interval == 0 or step == cfg.train.iters)
            if cfg.train.eval_interval and step % cfg.train.eval_interval == 0 and step < cfg.train.iters:
                valid.append((step, self.evaluate()))
            if self.step_callback is not None:
                self.step_callback(step, metrics)
            over_time = (cfg.train.max_wall_seconds is not None
                         and time.time() - self.t_start > cfg.train.max_wall_seconds)
            if _any_rank(self.stop.received is not None or over_time):
                stopped_by = self.stop.received or ("max_wall_seconds" if over_time else "another rank")
                saved_path, last_saved = self.save(), step
                self.logger.print(f"stopped by {stopped_by} after step {step}; resume with the same command")
                break
            if cfg.checkpoint.save_interval and step % cfg.checkpoint.save_interval == 0:
                saved_path, last_saved = self.save(), step
        self.stop.restore()
        if stopped_by is None:
            valid.append((self.iteration, self.evaluate()))
            if cfg.checkpoint.save_at_end and last_saved != self.iteration:
                saved_path = self.save()
        plot = self._plot() if self.rank == 0 and cfg.output.plot and stopped_by is None else None
        seconds = time.time() - self.t_start
        if self.rank == 0 and stopped_by is None:
            self._print_summary(losses, valid, seconds, plot)
        self.logger.close()
        return {"losses": losses, "valid": valid, "final_step": self.iteration, "stopped_by": stopped_by,
                "unigram_baseline": self.baseline, "checkpoint": saved_path, "plot": plot, "seconds": seconds,
                "history": self.logger.history if self.rank == 0 else None}

    def _plot(self):
        from k2_megatron.training.logging import plot_history

        tau = self.cfg.optim.qk_clip_tau
        return plot_history(self.logger.history, os.path.join(self.cfg.output.dir, "pretrain.png"), tau=tau,
                            title=f"{self.cfg.model.preset} pretraining (MuonClip, tau={tau})")

    def _print_summary(self, losses, valid, seconds, plot) -> None:
        final_valid = valid[-1][1] if valid else float("nan")
        previous = self.logger.history["train"]  # a run resumed at its last step trains no more
        final_train = losses[-1] if losses else previous[-1]["loss"] if previous else float("nan")
        baseline, log = self.baseline, self.logger.print
        log(f"done: {self.iteration} steps in {seconds:.0f} s | final train loss {final_train:.4f} | validation loss "
            f"{final_valid:.4f} | unigram baseline {baseline:.4f} ({abs(baseline - final_valid):.3f} nats "
            f"{'better' if final_valid < baseline else 'worse'})")
        if plot:
            log(f"plot: {os.path.abspath(plot)}")
        log(f"TensorBoard: tensorboard --logdir {os.path.abspath(os.path.join(self.cfg.output.dir, 'tensorboard'))}")

    def close(self) -> None:
        self.stop.restore()
        if self.run_lock is not None:
            self.run_lock.release()
            self.run_lock = None
        if self._initialized:
            teardown_distributed()
            self._initialized = False


def _layer_index(name: str) -> int:
    parts = name.split(".")
    return int(parts[1]) if len(parts) > 1 and parts[1].isdigit() else 0


def _jsonable(obj):
    return json.loads(json.dumps(obj, default=str))
