"""The training loop of ``k2-pretrain`` as an object, so that a run and its rehearsal (k2_megatron.rehearsal) execute
the same code: ``Trainer(cfg).setup()`` initialises the process groups, the data, the rank's model chunks and
MuonClip, and resumes; ``step()`` is one optimizer step; ``evaluate()`` the validation loss; ``save()`` a
checkpoint; ``run()`` the whole loop (stop signals, periodic validation and checkpoints, the plot); ``close()``
tears the process groups down.

One optimizer step: set the WSD learning rate; take the step's micro-batches (read ahead during the previous step,
only the fields this pipeline stage consumes: k2_megatron.training.prefetch) and start reading the next step's; zero
the gradient buffers; megatron-core's forward_backward_func (1F1B with pipeline parallelism, interleaved 1F1B with
virtual stages) over the step's micro-batches, whose
finalize hook reduces gradients over data-parallel ranks and updates the aux-loss-free expert biases; MuonClip
(``get_muonclip_optimizer``: Muon on hidden matrices, AdamW elsewhere, QK-Clip with global max logits, ZeRO-1
when data-parallel > 1); then the step's metrics, read on the host once (the per-layer figures at logged steps only).

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
from k2_megatron.training.prefetch import BATCH_FIELDS, StepBatches, stage_batch_fields


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
        self._check_validation_size()

    def _check_validation_size(self) -> None:
        """At startup, not at the first validation: the held-out set must hold train.eval_micro_batches."""
        from k2_megatron.data import SampleStream

        available = len(SampleStream(self.valid_ds, self.micro_batch_size, dp_rank=self.dp_rank, dp_size=self.dp))
        if self.eval_micro_batches > available:
            raise ConfigError(f"train.eval_micro_batches={self.eval_micro_batches}: the validation set holds "
                              f"{len(self.valid_ds)} samples, {available} micro-batches of train.micro_batch_size="
                              f"{self.micro_batch_size} on each of {self.dp} data-parallel ranks")

    def next_batch(self, fields: tuple[str, ...] = BATCH_FIELDS) -> dict:
        """The next training micro-batch's ``fields`` (none: the stream advances past it without reading)."""
        if not fields:
            self.stream.skip_batch()
            return {}
        return _only(self.stream.next_batch(), fields)

    def validation_batches(self, fields: tuple[str, ...] = BATCH_FIELDS) -> list:
        """The held-out micro-batches' ``fields`` (none: empty micro-batches, nothing read)."""
        from k2_megatron.data import validation_batches

        if not fields:
            return [{} for _ in range(self.eval_micro_batches)]
        return [_only(b, fields) for b in validation_batches(self.valid_ds, self.micro_batch_size,
                                                             self.eval_micro_batches, dp_rank=self.dp_rank,
                                                             dp_size=self.dp)]

    def state_dict(self) -> dict:
        return self.stream.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.stream.load_state_dict(state)

    def unigram_baseline(self) -> float:
        from k2_megatron.data import unigram_baseline

        return unigram_baseline(self.train_prefix, self.valid_prefix, self.vocab_size)


def _only(batch: dict, fields: tuple[str, ...]) -> dict:
    return {k: batch[k] for k in fields}


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
    """megatron's forward step of one micro-batch, holding the fields this pipeline stage reads
    (k2_megatron.training.prefetch.stage_batch_fields; the others are None)."""
    batch = next(data_iterator)
    dev = torch.cuda.current_device() if torch.cuda.is_available() else "cpu"
    tokens, position_ids, labels, loss_mask = (
        batch[k].to(dev, non_blocking=True) if k in batch else None for k in BATCH_FIELDS)
    loss_mask = loss_mask.float() if loss_mask is not None else None
    if return_schedule_plan:  # megatron's combined 1F1B (EP all-to-all overlap) runs the layers itself
        plan = model.build_schedule_plan(tokens, position_ids, None, labels=labels)
        return plan, partial(_loss_func, loss_mask)
    output = model(tokens, position_ids, None, labels=labels)
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
                          buffer_bytes=cfg.memory.muon_buffer_mib * 2**20, nonfinite=o.nonfinite,
                          state_on_host=cfg.memory.optimizer_state_on_host)
    return get_muonclip_optimizer(opt_config, chunks, muon)


def _routers(chunks):
    out = []
    for chunk in chunks:
        for name, m in chunk.named_modules():
            if hasattr(m, "expert_bias") and hasattr(m, "local_tokens_per_expert"):
                layer = getattr(m, "layer_number", None)
                out.append((router_name(layer - 1) if layer is not None else name, m))
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
    """SIGTERM / SIGINT: finish the current step, checkpoint, stop. Installed for the whole of ``run()``, the final
    checkpoint and validation included (a signal then only skips what is left). A second SIGINT interrupts at
    once."""

    def __init__(self):
        self.received = None
        self.received_at = None  # time.monotonic() of the first signal
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
        if self.received is None:
            self.received_at = time.monotonic()
        self.received = signal.Signals(signum).name

    def restore(self):
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)
        self.previous = {}


class Trainer:
    """The pretraining run of ``cfg`` on this process (one rank of a torchrun job, or alone); see the module.

    data: a factory ``(cfg, layout, dp, dp_rank) -> data`` with CorpusData's interface (default: CorpusData;
    ``next_batch(fields)`` and ``validation_batches(fields)`` return only ``fields``, none on a middle stage).
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
        self.checkpointer = None
        self.saved_step = None  # the step of the last save started (published or in flight)
        self.skipped_steps = 0  # steps skipped for non-finite gradients since this process started
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
        self.dp, self.layout = cfg.layout(self.world)
        self.schedule = cfg.schedule()
        self.checkpoint_root = cfg.checkpoint.dir or os.path.join(cfg.output.dir, "checkpoints")
        self.check_paths()  # first: a directory that cannot be written is named by its key
        self.run_lock = self._lock_directories()
        self.data = self._make_data(cfg, self.layout, self.dp, parallel_state.get_data_parallel_rank())
        self.k2cfg = cfg.k2_config(self.data.vocab_size)
        self.build_model()
        self.build_optimizer()
        self._install_finalize()
        self.expected_meta = {"model_config": _jsonable(dataclasses.asdict(self.k2cfg)),
                              "tokenizer": self.data.tokenizer_name, "seq_length": cfg.data.seq_length}
        resumed, mode = self._resume()
        self._start_logger()
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
        self.batch_fields = stage_batch_fields(parallel_state.is_pipeline_first_stage(ignore_virtual=True),
                                               self.pp_last)
        self.batches = self._step_batches()
        self._start_checkpointer()

    def check_paths(self) -> None:
        """Collective: the directories the run writes are writable, checked before anything is built
        (k2_megatron.training.startup)."""
        from k2_megatron.training.startup import check_paths

        check_paths(self.cfg, self.checkpoint_root)

    def _start_checkpointer(self) -> None:
        from k2_megatron.checkpoint.megatron import Checkpointer

        c = self.cfg.checkpoint
        self.checkpointer = Checkpointer(self.checkpoint_root, keep=c.keep, asynchronous=c.async_save)
        self.saved_step = self.iteration  # resumed from (or, at step 0, nothing worth saving)

    def _step_batches(self):
        """The training micro-batches of the steps, the next read ahead on a thread (k2_megatron.training.prefetch)."""
        return StepBatches(self.data, self.layout.num_micro_batches, self.batch_fields,
                           pin_device=torch.cuda.current_device() if torch.cuda.is_available() else None)

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
        mode)."""
        from k2_megatron.checkpoint.errors import CheckpointError, CheckpointMismatchError
        from k2_megatron.checkpoint.megatron import latest_checkpoint, load_checkpoint

        cfg, expected = self.cfg, self.expected_meta
        path = latest_checkpoint(self.checkpoint_root) if cfg.checkpoint.resume else None
        mode = "resume"
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
            self.iteration = meta["step"]
        elif path is not None:
            stage_independent = {"rope_scaling", "max_position_embeddings"}
            load_checkpoint(path, self.chunks, self.opt, {
                "model_config": {k: v for k, v in expected["model_config"].items() if k not in stage_independent},
                "tokenizer": expected["tokenizer"]}, ignore_model_keys=stage_independent, weights_only=mode == "model")
        return path, mode

    def _start_logger(self) -> None:
        from k2_megatron.training.logging import RunLogger

        o = self.cfg.output
        self.logger = RunLogger(o.dir, total_steps=self.cfg.train.iters, start_step=self.iteration,
                                enabled=self.rank == 0, progress_bar=o.progress_bar, tensorboard=o.tensorboard)

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
        batches = self.batches.take()
        if self.iteration + 1 < self.cfg.train.iters:  # the next step's reads overlap this one
            self.batches.prefetch()
        out = self.forward_backward(batches)
        ok, grad_norm, _ = self.optimizer_step()
        if not ok:
            self.logger.print(f"step {self.iteration}: skipped (non-finite gradients)")
        self.iteration += 1
        return self.step_metrics(out, ok, grad_norm, lr, t0)

    def global_mean(self, values: list) -> float:
        """Mean of the last stage's per-micro-batch losses over data-parallel ranks, on every rank."""
        total, count = self._loss_sum_count(values).tolist()
        return total / count

    def _loss_sum_count(self, values: list) -> torch.Tensor:
        """float64 [sum, count] of the last stage's micro-batch losses over all ranks (only last-stage ranks hold
        losses), on the device: one reduction, no host read."""
        from k2_megatron.megatron.layout import all_reduce_on_backend, collective_device

        t = torch.zeros(2, dtype=torch.float64, device=collective_device())
        if values:
            t[0] = torch.stack(values).double().sum()
            t[1] = len(values)
        return all_reduce_on_backend(t) if self.world > 1 else t

    def _layer_table(self) -> torch.Tensor:
        """float64 [layers, LAYER_COLUMNS] of the whole model on the device: each row filled by the pipeline stage
        that holds the layer (its max logit and clipped heads, its expert loads' max and mean), summed over the
        pipeline group. Every rank of a stage holds the same figures (max logits are global over data- and
        tensor-parallel ranks after QK-Clip's reduction, expert loads after the finalize hook's), so the pipeline
        group is the only one to reduce over."""
        from megatron.core import parallel_state

        from k2_megatron.megatron.layout import all_reduce_on_backend, collective_device

        table = torch.zeros(self.k2cfg.num_hidden_layers, len(LAYER_COLUMNS), dtype=torch.float64,
                            device=collective_device())
        for name, stats in self.opt.qk_clip_stats.items():
            i = _layer_index(name)
            table[i, 0] = 1.0
            table[i, 1] = stats.max_logits.max()
            table[i, 2] = stats.clipped.sum()
        for name, loads in self.loads.items():
            i = _layer_index(name)
            table[i, 3] = 1.0
            table[i, 4] = loads.max()
            table[i, 5] = loads.double().mean()
        if parallel_state.get_pipeline_model_parallel_world_size() > 1:
            table = all_reduce_on_backend(table, group=parallel_state.get_pipeline_model_parallel_group())
        return table

    def _is_logged_step(self, step: int) -> bool:
        return step % self.cfg.train.log_interval == 0 or step == self.cfg.train.iters

    def step_metrics(self, out: list, ok: bool, grad_norm, lr: float, t0: float) -> dict:
        """The step's figures (global, on every rank), read on the host in one transfer: the loss at every step; at
        logged steps (train.log_interval and the last) also the per-layer max logits, clipped heads and expert loads
        of the whole model (``_layer_table``; empty at the other steps)."""
        values = [r["lm loss"] for r in out] if self.pp_last else []
        on_device = [self._loss_sum_count(values)]
        if self._is_logged_step(self.iteration):
            on_device.append(self._layer_table().flatten())
        on_host = torch.cat(on_device).tolist()
        loss = on_host[0] / on_host[1]
        max_logits, clipped_heads, expert_load = _layer_figures(on_host[2:])
        dt = time.time() - t0
        tokens_per_s = self.layout.global_batch_tokens / dt
        mfu = (self.flops_per_token * tokens_per_s / (self.world * self.cfg.output.gpu_peak_tflops * 1e12)
               if torch.cuda.is_available() else None)
        return {"step": self.iteration, "loss": loss, "lr": lr,
                "grad_norm": None if grad_norm is None else float(grad_norm),
                "tokens_per_s": tokens_per_s, "mfu": mfu, "max_logits": max_logits,
                "max_logit": max(max_logits.values()) if max_logits else None,
                "clipped_heads": clipped_heads, "expert_load": expert_load, "skipped": not ok}

    # -- validation and checkpoints --

    def evaluate(self) -> float:
        """The validation loss (the same held-out micro-batches each time); logged at the current step."""
        for c in self.chunks:
            c.eval()
        out = self.run_microbatches(self.data.validation_batches(self.batch_fields), forward_only=True)
        for c in self.chunks:
            c.train()
        self.opt.reset_max_logits()  # evaluation forwards must not feed the next QK-Clip step
        for _, router in self.routers:  # nor the expert-bias update
            router.local_tokens_per_expert.zero_()
        loss = self.global_mean([r["lm loss"] for r in out] if self.pp_last else [])
        self.logger.log_validation(self.iteration, loss)
        return loss

    def checkpoint_meta(self) -> dict:
        """The run state of a checkpoint, its size independent of the step (the metric history is metrics.jsonl's,
        k2_megatron.training.logging)."""
        return {"data": self.batches.state_dict(), "train_samples": self.data.train_samples, "world_size": self.world,
                "config": self.cfg.to_dict(), **self.expected_meta}

    def save(self) -> str | None:
        """Starts a checkpoint of the current step (every rank). Asynchronous (checkpoint.async_save): returns None
        once this rank's state is handed to its writer process, which writes it while training goes on
        (``poll_save`` / ``finish_saves`` publish it; a save in flight is first waited for). Synchronous: returns
        the published path."""
        for chunk in self.chunks if self.cfg.parallel.overlap_param_gather else ():  # else gathered in the next forward
            chunk.start_param_sync(force_sync=True)
        path = self.checkpointer.save(self.iteration, self.chunks, self.opt, self.checkpoint_meta(),
                                      _before_publish=self._before_publish)
        self.saved_step = self.iteration
        if path is not None:
            self.logger.print(f"saved checkpoint {path}")
        return path

    def poll_save(self) -> None:
        """Publishes the save in flight if every rank's writer is done (collective while one is in flight)."""
        path = self.checkpointer.poll()
        if path is not None:
            self.logger.print(f"saved checkpoint {path}")

    def finish_saves(self, deadline: float | None = None) -> bool:
        """Collective: publishes the save in flight, waiting for it (deadline None) or until ``deadline``
        (time.monotonic()) and then abandoning it (``latest`` keeps the previous checkpoint). False when abandoned."""
        step = self.checkpointer.pending_step
        if step is None:
            return True
        path = (self.checkpointer.wait() if deadline is None
                else self.checkpointer.finish_within(max(0.0, deadline - time.monotonic())))
        if path is None:
            self.logger.print(f"the checkpoint of step {step} was not written within checkpoint.sigterm_grace_seconds="
                              f"{self.cfg.checkpoint.sigterm_grace_seconds:g} of the signal: abandoned; "
                              f"{os.path.join(self.checkpoint_root, 'latest')} names the previous checkpoint")
            return False
        self.logger.print(f"saved checkpoint {path}")
        return True

    def checkpoint_now(self, deadline: float | None = None) -> bool:
        """Collective: a published checkpoint of the current step (the save in flight first, then this step's
        unless it is the one saved), within ``deadline`` (see finish_saves). False when a save was abandoned."""
        if not self.finish_saves(deadline):
            return False
        if self.saved_step != self.iteration:
            self.save()
        return self.finish_saves(deadline)

    # -- the loop --

    def run(self) -> dict:
        """Steps until train.iters, a stop signal or train.max_wall_seconds, then the final checkpoint and
        validation. Returns (on every rank; figures are global): {"losses": [per-step train loss], "valid": [(step,
        loss)], "final_step", "stopped_by" (None, "SIGTERM", "SIGINT", "another rank" (a signal there),
        "max_wall_seconds"), "unigram_baseline", "checkpoint" (the one a resume starts from), "plot", "seconds",
        "history"}. The stop signals' handler stays installed until it returns: a signal during the final
        checkpoint or validation skips what is left of them, never the checkpoint."""
        from k2_megatron.checkpoint.megatron import latest_checkpoint

        cfg = self.cfg
        self.stop.install()
        losses, valid = [], []
        try:
            stopped_by = self._train(losses, valid)
            if stopped_by is None:
                stopped_by = self._finish(valid)
        finally:
            self.stop.restore()
        plot = self._plot() if self.rank == 0 and cfg.output.plot and stopped_by is None else None
        seconds = time.time() - self.t_start
        if self.rank == 0 and stopped_by is None:
            self._print_summary(losses, valid, seconds, plot)
        self.logger.close()
        return {"losses": losses, "valid": valid, "final_step": self.iteration, "stopped_by": stopped_by,
                "unigram_baseline": self.baseline, "checkpoint": latest_checkpoint(self.checkpoint_root),
                "plot": plot, "seconds": seconds, "history": self.logger.history if self.rank == 0 else None}

    def _train(self, losses: list, valid: list) -> str | None:
        """The steps, with periodic validation and checkpoints; returns why they stopped before train.iters (a
        checkpoint of that step saved, see _stop_reason), or None."""
        cfg = self.cfg
        while self.iteration < cfg.train.iters:
            metrics = self._checked_step()
            self.poll_save()
            step = self.iteration
            losses.append(metrics["loss"])
            self.logger.log_step(metrics, print_line=self._is_logged_step(step))
            if cfg.train.eval_interval and step % cfg.train.eval_interval == 0 and step < cfg.train.iters:
                valid.append((step, self.evaluate()))
            if self.step_callback is not None:
                self.step_callback(step, metrics)
            stopped_by, signalled = self._stop_reason()
            if stopped_by is not None:
                self.checkpoint_now(self._grace_deadline() if signalled else None)
                self._print_stopped(f"stopped by {stopped_by} after step {step}")
                return stopped_by
            if cfg.checkpoint.save_interval and step % cfg.checkpoint.save_interval == 0:
                self.save()
        return None

    def _finish(self, valid: list) -> str | None:
        """After the last step: the final checkpoint, started before the final validation (which runs while it is
        written), then waited for. A stop signal skips the validation if it has not begun and bounds the wait by
        the grace period; returns the signal when it cut something short (the validation or the checkpoint)."""
        from k2_megatron.megatron.layout import set_on_any_rank

        if self.cfg.checkpoint.save_at_end and self.saved_step != self.iteration:
            self.save()
        signalled, = set_on_any_rank(self.stop.received is not None)
        validated = not signalled
        if validated:
            valid.append((self.iteration, self.evaluate()))
            signalled, = set_on_any_rank(self.stop.received is not None)
        published = self.finish_saves(self._grace_deadline() if signalled else None)
        if validated and published:
            return None
        stopped_by = self.stop.received or "another rank"
        self._print_stopped(f"stopped by {stopped_by} after step {self.iteration} (the last), before the final "
                            f"{'validation' if published else 'checkpoint'} was done")
        return stopped_by

    def _print_stopped(self, why: str) -> None:
        """Rank 0, before the process groups go (under torchrun the first worker to exit has the others killed):
        why the run stopped, and how it resumes."""
        from k2_megatron.checkpoint.megatron import latest_checkpoint

        latest = latest_checkpoint(self.checkpoint_root)
        how = "the same command" + ("" if self.cfg.checkpoint.resume else " with checkpoint.resume=true")
        self.logger.print(f"{why}; {how} resumes it from {latest}" if latest else f"{why}; no checkpoint yet")

    def _stop_reason(self) -> tuple[str | None, bool]:
        """Collective (one all-reduce): (why the run stops now: "SIGTERM" / "SIGINT" (here), "another rank" (a
        signal there), "max_wall_seconds"; None: it goes on, whether a signal on any rank is the reason)."""
        from k2_megatron.megatron.layout import set_on_any_rank

        limit = self.cfg.train.max_wall_seconds
        signalled, over_time = set_on_any_rank(self.stop.received is not None,
                                               limit is not None and time.time() - self.t_start > limit)
        if signalled:
            return self.stop.received or "another rank", True
        return ("max_wall_seconds" if over_time else None), False

    def _grace_deadline(self) -> float:
        """When the checkpoints of a stop signal must be published: checkpoint.sigterm_grace_seconds after the
        signal came (on a rank that learnt of it from another: from now; every rank keeps to the earliest)."""
        came = self.stop.received_at if self.stop.received_at is not None else time.monotonic()
        return came + self.cfg.checkpoint.sigterm_grace_seconds

    # -- non-finite steps --

    def _checked_step(self) -> dict:
        """step() under optim.nonfinite. "raise": a step MuonClip refuses for non-finite gradients (on every rank
        together) stops the run with a checkpoint of the state before it (the data stream and the expert biases,
        which the step's gradient reduction moved, rewound: a resume repeats the step). "skip": skipped steps
        are counted; more than optim.max_skipped_steps stop the run the same way, with a checkpoint of the current
        step (a skipped step updates no weights)."""
        from k2_megatron.optim import NonFiniteGradientError

        before = self._state_before_step() if self.cfg.optim.nonfinite == "raise" else None
        try:
            metrics = self.step()
        except NonFiniteGradientError as e:  # only under "raise"
            self._rewind(before)
            raise self._stop_on_nonfinite(f"step {self.iteration + 1}: {e}") from None
        if metrics["skipped"]:
            self.skipped_steps += 1
            limit, where = self.cfg.optim.max_skipped_steps, self.opt.nonfinite_gradient
            self.logger.print(f"step {self.iteration}: non-finite gradients ({where}); {self.skipped_steps} "
                              f"step(s) skipped since the run started, at most optim.max_skipped_steps={limit}")
            if self.skipped_steps > limit:
                raise self._stop_on_nonfinite(f"step {self.iteration}: {self.skipped_steps} steps skipped for "
                                              f"non-finite gradients, more than optim.max_skipped_steps={limit} "
                                              f"(this one: {where})")
        return metrics

    def _state_before_step(self) -> tuple:
        return self.batches.state_dict(), [router.expert_bias.detach().clone() for _, router in self.routers]

    def _rewind(self, before: tuple) -> None:
        data_state, biases = before
        self.batches.load_state_dict(data_state)
        with torch.no_grad():
            for (_, router), bias in zip(self.routers, biases):
                router.expert_bias.copy_(bias)

    def _stop_on_nonfinite(self, message: str) -> Exception:
        """Collective: a published checkpoint of the current state; returns the error to raise, naming it."""
        from k2_megatron.checkpoint.megatron import latest_checkpoint
        from k2_megatron.optim import NonFiniteGradientError

        self.checkpoint_now()
        return NonFiniteGradientError(
            f"{message}. The state before it is saved: {latest_checkpoint(self.checkpoint_root)} (step "
            f"{self.iteration}); the same command resumes from it and meets the same gradients: add "
            "optim.nonfinite=skip to skip such steps, or lower optim.peak_lr")

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
        """Tears the process groups down. A save still in flight (the run failed) is not waited for: its writer is
        killed, without a collective, as the other ranks may be gone."""
        self.stop.restore()
        if self.checkpointer is not None:
            self.checkpointer.kill_writer()
        if getattr(self, "batches", None) is not None:
            self.batches.close()
        if self.run_lock is not None:  # last: nothing of this run writes into its directories any more
            self.run_lock.release()
            self.run_lock = None
        if self._initialized:
            teardown_distributed()
            self._initialized = False


# columns of Trainer._layer_table: attention present, max logit, clipped heads; MoE present, load max, load mean
LAYER_COLUMNS = ("attention", "max_logit", "clipped_heads", "moe", "load_max", "load_mean")


def _layer_figures(flat: list) -> tuple[dict, dict, dict]:
    """(max logit, clipped heads, expert load max/mean) by layer name, of a flattened ``Trainer._layer_table`` read
    on the host (empty: none)."""
    from k2_megatron.megatron.optimizer import attention_layer_name

    max_logits, clipped, load = {}, {}, {}
    width = len(LAYER_COLUMNS)
    for i in range(len(flat) // width):
        attention, max_logit, n_clipped, moe, load_max, load_mean = flat[i * width:(i + 1) * width]
        if attention:
            max_logits[attention_layer_name(i)] = max_logit
            clipped[attention_layer_name(i)] = int(n_clipped)
        if moe and load_mean > 0:
            load[router_name(i)] = load_max / load_mean
    return max_logits, clipped, load


def router_name(layer: int) -> str:
    return f"layers.{layer}"


def _layer_index(name: str) -> int:
    parts = name.split(".")
    return int(parts[1]) if len(parts) > 1 and parts[1].isdigit() else 0


def _jsonable(obj):
    return json.loads(json.dumps(obj, default=str))
