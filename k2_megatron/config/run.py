"""The pretraining configuration: nested dataclasses, loaded from YAML plus dotted command-line overrides.
Its defaults are the tiny CPU recipe (examples/configs/k2_tiny_cpu.yaml).

    cfg = load_config("examples/configs/k2_tiny_cpu.yaml", ["train.iters=20", "optim.peak_lr=3e-3"])

A YAML file holds the sections below (any key omitted keeps its default); an override is ``section.key=value``
with the value parsed as YAML (``train.iters=20``, ``optim.qk_clip_tau=null``, ``model.overrides.num_hidden_layers=2``).
Unknown sections or keys, wrong types and out-of-range values raise ``ConfigError`` naming the dotted key.
Checks that need the world size (batch layout, data-parallel size) run in ``PretrainConfig.layout(world_size)``.
The ``parallel`` section becomes a ``ParallelLayout`` (``ParallelSection.layout``), the ``memory`` section a
``MemoryOptions`` (``MemorySection.options``).
"""

from __future__ import annotations

import dataclasses
import datetime
import math
import os
import types
import typing
from dataclasses import dataclass, field

import yaml

from k2_megatron.config.memory import DEFAULT_DEVICE_MEMORY_GIB, DEFAULT_MUON_BUFFER_MIB, MemoryOptions
from k2_megatron.config.model import PRESETS, K2Config, get_preset
from k2_megatron.config.parallel import ParallelLayout
from k2_megatron.config.schedule import BatchLayout, WSDSchedule, YarnConfig, batch_layout


class ConfigError(ValueError):
    """An invalid pretraining configuration; the message names the dotted key."""


@dataclass
class ModelSection:
    preset: str = "k2-tiny"                 # k2_megatron.config.get_preset name: k2, k2-mini, k2-tiny
    overrides: dict = field(default_factory=dict)  # K2Config field overrides (vocab_size follows the tokenizer)
    params_dtype: str = "float32"           # float32 (CPU) or bfloat16 (GPU: bf16 weights, fp32 master + grads)
    bias_update_rate: float = 1e-2          # aux-loss-free expert-bias step per global batch (K2 scale: 1e-3)
    # RoPE of this training stage (presets are plain RoPE at their pretraining context, as K2 pretrains): null for
    # plain RoPE; a long-context stage sets YaRN's factor over yarn_original_max_position_embeddings (default: the
    # preset's context), e.g. K2's 32 over 4096 (examples/configs/k2_long_context.yaml)
    yarn_factor: float | None = None
    yarn_original_max_position_embeddings: int | None = None


@dataclass
class ParallelSection:
    tensor: int = 1
    pipeline: int = 1
    virtual_stages: int | None = None       # interleaved 1F1B when > 1
    expert: int = 1
    first_stage_layers: int | None = None   # uneven pipeline split (61 layers over 16 stages)
    last_stage_layers: int | None = None
    # uneven split over pipeline x virtual_stages chunks (megatron's pipeline_model_parallel_layout): "auto"
    # (balanced; embedding in the first chunk, output layer in the last) or a megatron layout string such as
    # "Et|(tt|)*29,t|tL" (61 layers on PP16 x 2 virtual stages); see k2_megatron.config.parallel
    pipeline_layout: str | None = None
    # EP all-to-all hidden behind computation (K2 report section 4): megatron-core's combined 1F1B runs one
    # micro-batch's dispatch/combine while another computes attention or experts (needs expert > 1, bf16, and
    # virtual_stages with pipeline > 1); delay_wgrad_compute also moves the experts' weight gradients after the
    # dispatch backward, so that it overlaps them too
    overlap_moe_expert_parallel_comm: bool = False
    delay_wgrad_compute: bool = False
    # how long a collective waits for the slowest rank before it fails (torch.distributed.init_process_group's
    # timeout and megatron-core's for its process groups): startup, checkpoint loads and saves included
    process_group_timeout_minutes: int = 30
    # megatron DDP's gradient buffers: ddp_bucket_size elements per bucket (null: one bucket per buffer; megatron
    # buckets only the first virtual stage's chunk); overlap_grad_reduce starts a bucket's reduce-scatter as soon as
    # its gradients are final in the backward; overlap_param_gather (needs overlap_grad_reduce) all-gathers the
    # updated parameters bucket by bucket ahead of the next forward instead of at the end of the optimizer step
    ddp_bucket_size: int | None = None
    overlap_grad_reduce: bool = False
    overlap_param_gather: bool = False

    def layout(self, world_size: int | None = None) -> ParallelLayout:
        """The ParallelLayout of this section (on ``world_size`` ranks when given: data_parallel derived);
        ConfigError naming the key when the sizes do not fit together."""
        try:
            layout = ParallelLayout(tensor_parallel=self.tensor, pipeline_parallel=self.pipeline,
                                    virtual_pipeline_stages=self.virtual_stages, expert_parallel=self.expert,
                                    first_stage_layers=self.first_stage_layers,
                                    last_stage_layers=self.last_stage_layers, pipeline_layout=self.pipeline_layout,
                                    labels=_PARALLEL_KEYS)
            return layout if world_size is None else layout.for_world(world_size)
        except ValueError as e:
            raise ConfigError(str(e)) from None


    def process_group_timeout(self) -> datetime.timedelta:
        return datetime.timedelta(minutes=self.process_group_timeout_minutes)


# ParallelLayout field -> the key of this section that sets it (for error messages)
_PARALLEL_KEYS = {"tensor_parallel": "parallel.tensor", "pipeline_parallel": "parallel.pipeline",
                  "virtual_pipeline_stages": "parallel.virtual_stages", "expert_parallel": "parallel.expert",
                  "first_stage_layers": "parallel.first_stage_layers",
                  "last_stage_layers": "parallel.last_stage_layers", "pipeline_layout": "parallel.pipeline_layout"}


@dataclass
class DataSection:
    tokenizer: str = "default:4096"         # default:N (BPE trained on the bundled corpus) | bpe:PATH | tiktoken:PATH
    train_prefix: list | None = None        # indexed-dataset prefixes; None: the bundled corpus
    valid_prefix: list | None = None
    seq_length: int = 128
    seed: int = 1234
    train_samples: int | None = None        # samples the training dataset is built for (None: iters x global
                                            # batch); it fixes the sample order, so set it ahead to extend a run
    # prebuilt GPT dataset indices (tools/preprocess_data.py build-index) on storage every rank sees: the run
    # loads the smallest index there covering its samples (exactly data.train_samples' when set) and builds
    # nothing; without one it stops with the build command. null: megatron builds the indices at startup
    index_dir: str | None = None
    # where megatron caches the indices it builds at startup (without index_dir): rank 0 writes, every other
    # rank reads, so every node must see it. null: <output.dir>/gpt_indices
    cache_dir: str | None = None


@dataclass
class TrainSection:
    iters: int = 200
    global_batch_tokens: int = 4096         # tokens per optimizer step over all data-parallel ranks
    micro_batch_size: int = 8               # sequences per micro-batch per data-parallel rank
    seed: int = 1234
    log_interval: int = 1
    eval_interval: int = 50                 # 0: only at the end
    eval_micro_batches: int = 8             # per data-parallel rank
    clip_grad: float = 1.0                  # global grad-norm clip (0: none; the norm is then not computed)
    max_wall_seconds: float | None = None   # stop (and checkpoint) after this long


@dataclass
class OptimSection:
    peak_lr: float = 1e-2                   # K2: 2e-4 (a 1T model); the tiny model takes much more
    min_lr: float = 1e-3
    init_lr: float = 0.0
    warmup_steps: int = 15
    stable_steps: int | None = None         # None: iters - warmup - decay
    decay_steps: int | None = None          # None: decay_fraction * iters
    decay_fraction: float = 0.2
    weight_decay: float = 0.1               # K2: 0.1, decoupled, Muon and AdamW alike
    adam_beta1: float = 0.9
    adam_beta2: float = 0.95
    adam_eps: float = 1e-8
    momentum: float = 0.95
    qk_clip_tau: float | None = 100.0       # null: plain Muon, no QK-Clip
    ns_dtype: str = "bfloat16"
    # a step whose gradients hold inf/NaN (nothing is updated): "raise" stops the run, after saving the state
    # before that step (resume repeats it); "skip" skips it, and stops as "raise" does once more than
    # max_skipped_steps steps were skipped since the run started (or resumed)
    nonfinite: str = "raise"
    max_skipped_steps: int = 10


@dataclass
class CheckpointSection:
    dir: str | None = None                  # None: <output.dir>/checkpoints
    save_interval: int = 0                  # every N steps (0: only at the end and on SIGTERM/SIGINT)
    save_at_end: bool = True
    resume: bool = True                     # continue from <dir>/latest when it exists
    load: str | None = None                 # a checkpoint (directory, or root with 'latest') to start from when
                                            # this run has none of its own yet
    load_mode: str = "resume"               # resume: everything (step, data, history); weights: model + optimizer
                                            # state only, from step 0 (a new stage, e.g. YaRN long context);
                                            # model: the model only, the optimizer starts afresh from it
    keep: int = 2                           # published checkpoints kept (older ones deleted)
    async_save: bool = True                 # a writer process per rank writes while training goes on (one save
                                            # in flight at a time; the run waits for the last one before it ends)
    # after SIGTERM / SIGINT: the save in flight and the stop's own save must be published within this many
    # seconds of the signal (the rest of the step it came in counts), else they are abandoned and `latest` keeps
    # the previous checkpoint; below the launcher's kill delay (torchrun, SLURM's KillWait: 30 s by default).
    # Synchronous saves (async_save=false) cannot be bounded.
    sigterm_grace_seconds: float = 20.0


@dataclass
class OutputSection:
    dir: str = "runs/k2-tiny"
    tensorboard: bool = True
    plot: bool = True
    progress_bar: bool = True
    gpu_peak_tflops: float = 989.0          # per GPU, for MFU (H100/H800 dense bf16)


@dataclass
class MemorySection:
    # Activation memory as in K2 (k2_megatron.megatron.activation_memory; all off by default):
    fp8_activations: bool = False           # MoE fc1 and SwiGLU inputs saved for backward as FP8 1x128 tiles
    recompute: list = field(default_factory=list)    # any of layernorm, mla_up_proj, swiglu (K2: these three),
                                                     # dense_mlp, shared_expert (whole-MLP recompute)
    cpu_offload: list = field(default_factory=list)  # megatron offload_modules (CUDA only): attn_norm, qkv_linear,
                                                     # core_attn, attn_proj, mlp_norm, expert_fc1, moe_act
    # one accelerator's memory (default an H100 80GB's, as torch reports it): the dry run refuses a layout that needs more
    device_memory_gib: float = DEFAULT_DEVICE_MEMORY_GIB
    # ZeRO-1 Muon: fp32 buffers gathering a gradient bucket's momentum for Newton-Schulz, at most this many MiB at a
    # time (k2_megatron.megatron.optimizer.MuonClipConfig.buffer_bytes; a matrix larger than this is gathered alone)
    muon_buffer_mib: int = DEFAULT_MUON_BUFFER_MIB
    # MuonClip's fp32 master weights and Muon momentum / Adam moments in pinned host memory instead of the device,
    # streamed through the device in pieces within muon_buffer_mib during the step (k2_megatron.megatron.host_state;
    # K2 report section 2.4: optimizer states offloaded to the CPU when the nodes are few)
    optimizer_state_on_host: bool = False

    def options(self) -> MemoryOptions:
        """The MemoryOptions of this section."""
        return MemoryOptions(fp8_activations=self.fp8_activations, recompute=tuple(self.recompute),
                             cpu_offload=tuple(self.cpu_offload))


@dataclass
class PretrainConfig:
    model: ModelSection = field(default_factory=ModelSection)
    parallel: ParallelSection = field(default_factory=ParallelSection)
    data: DataSection = field(default_factory=DataSection)
    train: TrainSection = field(default_factory=TrainSection)
    optim: OptimSection = field(default_factory=OptimSection)
    checkpoint: CheckpointSection = field(default_factory=CheckpointSection)
    output: OutputSection = field(default_factory=OutputSection)
    memory: MemorySection = field(default_factory=MemorySection)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    # ----- validation -----

    def validate(self) -> "PretrainConfig":
        """Checks that need no world size; raises ConfigError naming the key. Returns self."""
        m, d, t, o = self.model, self.data, self.train, self.optim
        if m.preset not in PRESETS:
            raise ConfigError(f"model.preset: unknown preset {m.preset!r}; known: {sorted(PRESETS)}")
        if m.params_dtype not in ("float32", "bfloat16"):
            raise ConfigError(f"model.params_dtype: must be 'float32' or 'bfloat16', got {m.params_dtype!r}")
        if m.yarn_factor is not None and not (isinstance(m.yarn_factor, (int, float)) and m.yarn_factor >= 1):
            raise ConfigError(f"model.yarn_factor: must be a number >= 1 or null, got {m.yarn_factor!r}")
        _positive_int("data.seq_length", d.seq_length)
        for name in ("index_dir", "cache_dir"):
            if getattr(d, name) is not None and not getattr(d, name).strip():
                raise ConfigError(f"data.{name}: must be a directory or null, got {getattr(d, name)!r}")
        _positive_int("parallel.process_group_timeout_minutes", self.parallel.process_group_timeout_minutes)
        layout = self.parallel.layout()
        self._validate_overlap()
        for name in ("iters", "global_batch_tokens", "micro_batch_size", "log_interval", "eval_micro_batches"):
            _positive_int(f"train.{name}", getattr(t, name))
        self._validate_micro_batches(layout)
        _nonneg_int("train.eval_interval", t.eval_interval)
        _nonneg_number("train.clip_grad", t.clip_grad)
        if t.max_wall_seconds is not None and not t.max_wall_seconds > 0:
            raise ConfigError(f"train.max_wall_seconds: must be > 0 or null, got {t.max_wall_seconds!r}")
        if not (isinstance(o.peak_lr, (int, float)) and o.peak_lr > 0 and math.isfinite(o.peak_lr)):
            raise ConfigError(f"optim.peak_lr: must be a finite number > 0, got {o.peak_lr!r}")
        for name in ("min_lr", "init_lr", "weight_decay", "adam_eps"):
            _nonneg_number(f"optim.{name}", getattr(o, name))
        for name in ("min_lr", "init_lr"):
            if getattr(o, name) > o.peak_lr:
                raise ConfigError(f"optim.{name}: must be <= optim.peak_lr={o.peak_lr}, got {getattr(o, name)}")
        for name in ("adam_beta1", "adam_beta2", "momentum"):
            v = getattr(o, name)
            if not (isinstance(v, (int, float)) and 0 <= v < 1):
                raise ConfigError(f"optim.{name}: must be in [0, 1), got {v!r}")
        if not (isinstance(o.decay_fraction, (int, float)) and 0 <= o.decay_fraction <= 1):
            raise ConfigError(f"optim.decay_fraction: must be in [0, 1], got {o.decay_fraction!r}")
        _nonneg_int("optim.warmup_steps", o.warmup_steps)
        for name in ("stable_steps", "decay_steps"):
            if getattr(o, name) is not None:
                _nonneg_int(f"optim.{name}", getattr(o, name))
        if o.qk_clip_tau is not None and not (isinstance(o.qk_clip_tau, (int, float)) and o.qk_clip_tau > 0):
            raise ConfigError(f"optim.qk_clip_tau: must be a number > 0 or null (no QK-Clip), got {o.qk_clip_tau!r}")
        if o.ns_dtype not in ("bfloat16", "float32"):
            raise ConfigError(f"optim.ns_dtype: must be 'bfloat16' or 'float32', got {o.ns_dtype!r}")
        if o.nonfinite not in ("raise", "skip"):
            raise ConfigError(f"optim.nonfinite: must be 'raise' or 'skip', got {o.nonfinite!r}")
        _nonneg_int("optim.max_skipped_steps", o.max_skipped_steps)
        if d.train_samples is not None:
            _positive_int("data.train_samples", d.train_samples)
        _nonneg_int("checkpoint.save_interval", self.checkpoint.save_interval)
        if self.checkpoint.load_mode not in ("resume", "weights", "model"):
            raise ConfigError("checkpoint.load_mode: must be 'resume', 'weights' or 'model', got "
                              f"{self.checkpoint.load_mode!r}")
        _positive_int("checkpoint.keep", self.checkpoint.keep)
        _nonneg_number("checkpoint.sigterm_grace_seconds", self.checkpoint.sigterm_grace_seconds)
        if not d.tokenizer or not isinstance(d.tokenizer, str) or ":" not in d.tokenizer:
            raise ConfigError(f"data.tokenizer: must be 'default:N', 'bpe:PATH' or 'tiktoken:PATH', "
                              f"got {d.tokenizer!r}")
        if (d.train_prefix is None) != (d.valid_prefix is None):
            raise ConfigError("data.train_prefix / data.valid_prefix: give both (your data) or neither "
                              "(the bundled corpus)")
        _check_model_overrides(m.overrides)
        try:
            self.k2_config(vocab_size=None)
        except ValueError as e:
            raise ConfigError(f"model: {e}") from None
        _positive_int("memory.muon_buffer_mib", self.memory.muon_buffer_mib)
        if not isinstance(self.memory.optimizer_state_on_host, bool):
            raise ConfigError(f"memory.optimizer_state_on_host: must be true or false, got "
                              f"{self.memory.optimizer_state_on_host!r}")
        if not (isinstance(self.memory.device_memory_gib, (int, float)) and self.memory.device_memory_gib > 0):
            raise ConfigError(f"memory.device_memory_gib: must be a number > 0, got {self.memory.device_memory_gib!r}")
        try:
            self.memory.options()
        except (TypeError, ValueError) as e:
            raise ConfigError(str(e)) from None
        return self

    def _validate_micro_batches(self, layout: ParallelLayout) -> None:
        """The micro-batch counts the pipeline schedule must run, as far as they are known without the world size:
        validation's per rank, and training's over all data-parallel ranks (each rank's count is that total / DP,
        checked exactly by ``layout``)."""
        t = self.train
        _check_micro_batches(layout, f"train.eval_micro_batches={t.eval_micro_batches}", t.eval_micro_batches)
        sequences, rest = divmod(t.global_batch_tokens, self.data.seq_length)
        if not rest and not sequences % t.micro_batch_size:
            _check_micro_batches(layout, f"train.global_batch_tokens={t.global_batch_tokens}",
                                 sequences // t.micro_batch_size, f"per step over all data-parallel ranks ({sequences} "
                                 f"sequences / train.micro_batch_size={t.micro_batch_size})")

    def _validate_overlap(self) -> None:
        """What megatron-core 0.19's gradient-buffer and EP all-to-all overlaps require of the rest of the config."""
        p = self.parallel
        if p.delay_wgrad_compute and not p.overlap_moe_expert_parallel_comm:
            raise ConfigError("parallel.delay_wgrad_compute: needs parallel.overlap_moe_expert_parallel_comm=true "
                              "(the weight gradients are delayed inside its schedule)")
        if p.ddp_bucket_size is not None:
            _positive_int("parallel.ddp_bucket_size", p.ddp_bucket_size)
        if p.overlap_param_gather and not p.overlap_grad_reduce:
            raise ConfigError("parallel.overlap_param_gather: needs parallel.overlap_grad_reduce=true (megatron "
                              "overlaps the parameter all-gather only together with the gradient reduce-scatter)")
        if not p.overlap_moe_expert_parallel_comm:
            return
        problems = []
        if p.expert < 2:
            problems.append(f"parallel.expert={p.expert} (needs >= 2: there is no all-to-all to hide)")
        if p.pipeline > 1 and not (p.virtual_stages or 1) > 1:
            problems.append(f"parallel.pipeline={p.pipeline} without parallel.virtual_stages (megatron overlaps "
                            "inside interleaved 1F1B only)")
        if self.model.params_dtype != "bfloat16":
            problems.append(f"model.params_dtype={self.model.params_dtype!r} (megatron requires 'bfloat16')")
        if problems:
            raise ConfigError("parallel.overlap_moe_expert_parallel_comm: " + "; ".join(problems))

    def dataset_cache_dir(self) -> str:
        """Where megatron caches the dataset indices built at startup: data.cache_dir, else <output.dir>/gpt_indices
        (a directory the run writes anyway and, for checkpoints, every node sees; per run, so no two jobs write the
        same files at once)."""
        return self.data.cache_dir or os.path.join(self.output.dir, "gpt_indices")

    def k2_config(self, vocab_size: int | None) -> K2Config:
        """The K2Config of model.preset + model.overrides (+ this stage's YaRN: model.yarn_factor), with the
        tokenizer's vocab size when model.overrides does not fix one."""
        overrides = dict(self.model.overrides)
        if vocab_size is not None:
            if "vocab_size" in overrides and overrides["vocab_size"] < vocab_size:
                raise ConfigError(f"model.overrides.vocab_size={overrides['vocab_size']} is smaller than the "
                                  f"tokenizer's vocabulary ({vocab_size})")
            overrides.setdefault("vocab_size", vocab_size)
        cfg = get_preset(self.model.preset, **overrides)
        if self.model.yarn_factor is not None:
            original = self.model.yarn_original_max_position_embeddings or (
                cfg.rope_scaling or {}).get("original_max_position_embeddings", cfg.max_position_embeddings)
            cfg = cfg.with_yarn(YarnConfig(factor=self.model.yarn_factor,
                                           original_max_position_embeddings=int(original)))
        if self.data.seq_length > cfg.max_position_embeddings:
            raise ConfigError(f"data.seq_length={self.data.seq_length} exceeds the model's max_position_embeddings="
                              f"{cfg.max_position_embeddings} (set model.yarn_factor for a long-context stage)")
        return cfg

    def layout(self, world_size: int) -> tuple[int, BatchLayout]:
        """(data-parallel size, BatchLayout) for ``world_size`` ranks; ConfigError when they do not fit."""
        layout = self.parallel.layout(world_size)
        try:
            layout.check_model(self.k2_config(None))
            bl = batch_layout(self.train.global_batch_tokens, self.data.seq_length, self.train.micro_batch_size,
                              layout.data_parallel)
        except ConfigError:
            raise
        except ValueError as e:
            raise ConfigError(f"parallel / train: {e}") from None
        _check_micro_batches(layout, f"train.global_batch_tokens={self.train.global_batch_tokens}",
                             bl.num_micro_batches, f"per step on each of {layout.data_parallel} data-parallel ranks")
        return layout.data_parallel, bl

    def schedule(self) -> WSDSchedule:
        """The WSD schedule: warm-up, then stable and decay phases that end at train.iters unless given."""
        o, iters = self.optim, self.train.iters
        warmup = min(o.warmup_steps, iters)
        decay = o.decay_steps if o.decay_steps is not None else int(round(o.decay_fraction * iters))
        decay = min(decay, iters - warmup) if o.decay_steps is None else decay
        stable = o.stable_steps if o.stable_steps is not None else max(iters - warmup - decay, 0)
        try:
            return WSDSchedule(peak_lr=float(o.peak_lr), warmup_steps=warmup, stable_steps=stable, decay_steps=decay,
                               min_lr=float(o.min_lr), init_lr=float(o.init_lr))
        except ValueError as e:
            raise ConfigError(f"optim: {e}") from None


def _check_micro_batches(layout: ParallelLayout, name: str, count: int, scope: str = "per data-parallel rank"
                         ) -> None:
    try:
        layout.check_micro_batches(name, count, scope)
    except ValueError as e:
        raise ConfigError(str(e)) from None


def _check_model_overrides(overrides: dict) -> None:
    """Every key of model.overrides must be a K2Config field (a typo would otherwise be a TypeError deep inside)."""
    import difflib

    fields = [f.name for f in dataclasses.fields(K2Config)]
    for name in overrides:
        if name not in fields:
            close = difflib.get_close_matches(str(name), fields, n=3)
            hint = f"did you mean {' or '.join(close)}?" if close else "see K2Config in k2_megatron/config/model.py"
            raise ConfigError(f"model.overrides.{name}: not a K2Config field ({hint})")


def _positive_int(key: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"{key}: must be an int >= 1, got {value!r}")


def _nonneg_int(key: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ConfigError(f"{key}: must be an int >= 0, got {value!r}")


def _nonneg_number(key: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
        raise ConfigError(f"{key}: must be a finite number >= 0, got {value!r}")


# ----- loading -----

def _check_type(key: str, value, annotation):
    """Coerce ints to floats where a float is expected; otherwise the YAML type must match."""
    hint = annotation
    options = typing.get_args(hint) if typing.get_origin(hint) in (typing.Union, types.UnionType) else ()
    allowed = options or (hint,)
    if value is None:
        if type(None) in allowed:
            return None
        raise ConfigError(f"{key}: may not be null")
    for t in allowed:
        t = typing.get_origin(t) or t
        if t is type(None):
            continue
        if t is float and isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if t is float and isinstance(value, str):  # YAML 1.1 reads "1e-3" (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        if t is int and isinstance(value, int) and not isinstance(value, bool):
            return value
        if t is bool and isinstance(value, bool):
            return value
        if t in (str, dict) and isinstance(value, t):
            return value
        if t is list and isinstance(value, (list, str)):
            return [value] if isinstance(value, str) else list(value)
    names = " or ".join(getattr(t, "__name__", str(t)) for t in allowed)
    raise ConfigError(f"{key}: expected {names}, got {type(value).__name__} {value!r}")


def _section_types(cls) -> dict:
    return typing.get_type_hints(cls)


def config_from_dict(data: dict | None) -> PretrainConfig:
    cfg = PretrainConfig()
    for section, values in (data or {}).items():
        if section not in _section_types(PretrainConfig):
            raise ConfigError(f"{section}: unknown config section; known: {sorted(_section_types(PretrainConfig))}")
        if values is None:
            continue
        if not isinstance(values, dict):
            raise ConfigError(f"{section}: must be a mapping, got {type(values).__name__}")
        for key, value in values.items():
            set_value(cfg, f"{section}.{key}", value)
    return cfg


def set_value(cfg: PretrainConfig, dotted: str, value) -> None:
    """Sets ``section.key`` (or ``model.overrides.FIELD``) with type checking."""
    parts = dotted.split(".")
    if len(parts) < 2:
        raise ConfigError(f"{dotted}: overrides are section.key=value (e.g. train.iters=20)")
    section, key = parts[0], parts[1]
    types = _section_types(PretrainConfig)
    if section not in types:
        raise ConfigError(f"{dotted}: unknown config section {section!r}; known: {sorted(types)}")
    obj = getattr(cfg, section)
    fields = _section_types(type(obj))
    if key not in fields:
        raise ConfigError(f"{dotted}: unknown key {key!r} in section {section!r}; known: {sorted(fields)}")
    if len(parts) > 2:
        if fields[key] is not dict and typing.get_origin(fields[key]) is not dict and key != "overrides":
            raise ConfigError(f"{dotted}: {section}.{key} is not a mapping")
        target = getattr(obj, key)
        for p in parts[2:-1]:
            target = target.setdefault(p, {})
        target[parts[-1]] = value
        return
    setattr(obj, key, _check_type(dotted, value, fields[key]))


def parse_override(text: str) -> tuple[str, object]:
    if "=" not in text:
        raise ConfigError(f"override {text!r}: expected section.key=value (e.g. train.iters=20)")
    key, raw = text.split("=", 1)
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError as e:
        raise ConfigError(f"{key}: cannot parse value {raw!r}: {e}") from None
    return key.strip(), value


def load_config(path: str | os.PathLike | None = None, overrides: list[str] | tuple = ()) -> PretrainConfig:
    """PretrainConfig from a YAML file (None: the defaults, which are the tiny CPU recipe) and overrides;
    validated (world-size checks are in ``layout``)."""
    data = {}
    if path is not None:
        path = os.fspath(path)
        if not os.path.isfile(path):
            raise ConfigError(f"config file {path!r} does not exist")
        with open(path, encoding="utf-8") as f:
            try:
                data = yaml.safe_load(f) or {}
            except yaml.YAMLError as e:
                raise ConfigError(f"config file {path}: invalid YAML: {e}") from None
        if not isinstance(data, dict):
            raise ConfigError(f"config file {path}: the top level must be a mapping of sections")
    cfg = config_from_dict(data)
    for text in overrides:
        key, value = parse_override(text)
        set_value(cfg, key, value)
    return cfg.validate()
